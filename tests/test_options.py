"""Every option of ``python -m hpa_kernel.submit`` survives the one serialisation, and so
reaches the ``--parallel`` shards (hpa_kernel.run.options)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from hpa_kernel.run.options import SHARD_SET, add_options, build_parser, shard_argv, to_argv

#: a non-default value for every option that takes one; a new option needs one here
SAMPLES = {
    "data_dir": "some/data",
    "weights": "w/manifest.json",
    "out": "o.csv",
    "device": "cuda:1",
    "batch_size": "3",
    "workers": "5",
    "max_images": "7",
    "shard": "1/3",
    "parallel": "2",
    "time_budget": "90m",
    "save_overlays": "overlays",
    "max_pixels": "1000",
    "save_cells": "cells",
}


def _options() -> list[argparse.Action]:
    """Every option of submit but --help / --version (the module's own list)."""
    return add_options(argparse.ArgumentParser(add_help=False))


def everything_set() -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """Parsed options with every option at a value that is not its default."""
    parser = build_parser()
    argv, seen = [], set()
    for action in _options():
        if action.dest in seen:  # the other flag of a mutually exclusive pair (--fp16/--no-fp16)
            continue
        seen.add(action.dest)
        if action.nargs == 0:
            argv.append(action.option_strings[-1])
        else:
            assert action.dest in SAMPLES, f"test_options.SAMPLES needs a value for {action.option_strings[-1]}"
            argv += [action.option_strings[-1], SAMPLES[action.dest]]
    args, defaults = parser.parse_args(argv), parser.parse_args([])
    for dest in seen:
        assert getattr(args, dest) != getattr(defaults, dest), f"sample for {dest} is its default"
    return parser, args


def test_every_option_survives_the_round_trip():
    parser, args = everything_set()
    assert set(vars(args)) == {a.dest for a in _options()}  # no option of the parser outside the list
    assert parser.parse_args(to_argv(args)) == args
    assert parser.parse_args(to_argv(parser.parse_args([]))) == parser.parse_args([])
    for fp16 in (True, False, None):
        args.fp16 = fp16
        assert parser.parse_args(to_argv(args)).fp16 is fp16


@pytest.mark.parametrize("rerun", [False, True])
def test_every_option_reaches_a_shard(rerun):
    parser, args = everything_set()
    argv = shard_argv(args, Path("resolved/data"), (1, 4), "cuda:3", Path("out.part1of4.csv"), 123.4, rerun=rerun)
    child = parser.parse_args(argv)
    for action in _options():
        if action.dest not in SHARD_SET:
            assert getattr(child, action.dest) == getattr(args, action.dest), f"{action.option_strings[-1]} lost"
    assert (child.data_dir, child.out, child.device, child.shard) == (
        Path("resolved/data"), Path("out.part1of4.csv"), "cuda:3", (1, 4))
    assert child.time_budget == 123.0 and child.parallel == 1 and child.no_progress
    assert child.no_resume is (not rerun)  # a rerun resumes its own journal
    assert parser.parse_args(shard_argv(args, Path("d"), (0, 2), "cpu", Path("o"), None, False)).time_budget is None
