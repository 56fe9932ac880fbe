"""Issue 21 ("The house, part 2"), helper y: one shard join, the team merge's own name.

Through the command lines and the public join: ``python -m hpa_kernel.submit merge`` joins
shard parts (strict :func:`hpa_kernel.run.join.join_shards`); the team merge by cell
(``python -m hpa_kernel.team_merge``, old name ``hpa_kernel.merge``) refuses them.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from hpa_kernel.formats.rle import encode_mask
from hpa_kernel.formats.submission import read_submission, write_submission
from hpa_kernel.run.join import join_shards
from hpa_kernel.submit import main as submit_main
from hpa_kernel.team_merge import main as team_merge_main

SIZE = 32
IDS = ["a", "b", "c", "d"]


def _rows(ids):
    m = np.zeros((SIZE, SIZE), bool)
    m[4:20, 6:22] = True
    return {i: (SIZE, SIZE, f"{IDS.index(i)} 0.5 {encode_mask(m)}") for i in ids}


@pytest.fixture
def parts(tmp_path):
    """A sample and the two parts of a ``--shard I/2`` run (every other ID each)."""
    sample = write_submission({i: (SIZE, SIZE, "") for i in IDS}, IDS, tmp_path / "sample.csv")
    p0 = write_submission(_rows(IDS[0::2]), IDS[0::2], tmp_path / "s.part0of2.csv")
    p1 = write_submission(_rows(IDS[1::2]), IDS[1::2], tmp_path / "s.part1of2.csv")
    return sample, p0, p1


def test_team_merge_refuses_shard_parts_and_names_the_shard_join(parts, tmp_path, capsys):
    """Given disjoint shard parts, the team merge wrote a half-empty file with exit 0."""
    sample, p0, p1 = parts
    out = tmp_path / "merged.csv"
    rc = team_merge_main([str(p0), str(p1), "--sample", str(sample), "--out", str(out), "--no-progress", "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and not out.exists()
    assert len(err) == 1 and "share no image ID" in err[0] and "python -m hpa_kernel.submit merge" in err[0]
    assert submit_main(["merge", str(p0), str(p1), "--sample", str(sample), "--out", str(out)]) == 0
    assert read_submission(out) == _rows(IDS)


def test_the_old_merge_command_still_works_with_a_notice(parts, tmp_path):
    sample, p0, p1 = parts
    full = write_submission(_rows(IDS), IDS, tmp_path / "full.csv")
    out = tmp_path / "merged.csv"
    r = subprocess.run([sys.executable, "-m", "hpa_kernel.merge", str(full), str(full), "--sample", str(sample),
                        "--out", str(out), "--no-progress", "-q"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip().splitlines() == ["notice: python -m hpa_kernel.merge is now python -m hpa_kernel.team_merge"]
    assert set(read_submission(out)) == set(IDS)


def test_strict_join_refuses_a_repeated_or_missing_id(parts, tmp_path):
    _, p0, p1 = parts
    with pytest.raises(ValueError, match="ID a is also in"):
        join_shards([p0, p0], IDS, tmp_path / "o.csv")
    with pytest.raises(ValueError, match="1 ID.s. in no part"):
        join_shards([p0, p1], IDS + ["e"], tmp_path / "o.csv")
    assert not (tmp_path / "o.csv").exists()


def test_lenient_join_fills_what_no_part_has(parts, tmp_path):
    _, p0, _ = parts
    out = tmp_path / "o.csv"
    assert join_shards([p0, tmp_path / "gone.csv"], IDS, out, strict=False, fallback_size=lambda i: (7, 9)) == ["b", "d"]
    rows = read_submission(out)
    assert list(rows) == IDS and rows["b"] == (7, 9, "") and rows["a"] == _rows(IDS)["a"]


@pytest.mark.parametrize("weights", [[1.0, -1.0], [float("nan"), 1.0], [0.0, 0.0], [1.0]])
def test_one_weight_rule_for_models_team_merge_and_cell_match(weights):
    """Weights were checked three times with three messages; now by ``check_weights`` alone."""
    from hpa_kernel.run.team_merge import MergeOptions
    from hpa_kernel.stages.cellmatch import combine_scores
    from hpa_kernel.stages.ensemble import check_weights, combine_models

    with pytest.raises(ValueError) as rule:
        check_weights(weights, 2)
    calls = [lambda: combine_models([np.zeros((1, 19))] * 2, weights),
             lambda: combine_scores(np.zeros((1, 2, 19)), np.ones((1, 2), bool), weights),
             lambda: MergeOptions(weights=tuple(weights)).check(2)]
    for call in calls:
        with pytest.raises(ValueError) as e:
            call()
        assert str(e.value).split(" for ")[0] == str(rule.value).split(" for ")[0]
        assert str(e.value).startswith("weights: ")
