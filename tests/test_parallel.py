"""--parallel: one shard process per device, parts joined; a dying shard is run again,
and what it never finished is still written (from its journal, else empty)."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
import torch

import hpa_kernel.run.parallel as parallel
from hpa_kernel.run.parallel import ParallelResult, Shard, join_parts, part_path, plan_devices
from hpa_kernel.run.parallel import launch_process, run_parallel
from hpa_kernel.run.options import build_parser
from hpa_kernel.formats.submission import read_submission, validate_submission
from hpa_kernel.run.journal import Journal
from hpa_kernel.submit import main


def gpus(n):
    return lambda: [f"cuda:{i}" for i in range(n)]


@pytest.mark.parametrize(
    "device, par, n_gpus, want",
    [
        ("auto", "auto", 2, ["cuda:0", "cuda:1"]),  # Kaggle's T4 x2
        ("cuda", "auto", 2, ["cuda:0", "cuda:1"]),
        ("auto", "auto", 1, ["auto"]),  # one GPU: one process, as before
        ("auto", "auto", 0, ["auto"]),
        ("cpu", "auto", 2, ["cpu"]),  # the CPU asked for: the GPUs are not looked at
        ("auto", 3, 2, ["cuda:0", "cuda:1", "cuda:0"]),
        ("auto", 2, 0, ["cpu", "cpu"]),
        ("cpu", 2, 2, ["cpu", "cpu"]),
        ("cuda:1", 2, 2, ["cuda:1", "cuda:1"]),
        ("auto", 1, 2, ["auto"]),
    ],
)
def test_plan_devices(device, par, n_gpus, want):
    assert plan_devices(device, par, gpus=gpus(n_gpus)) == want


def test_plan_devices_refuses_zero():
    with pytest.raises(ValueError):
        plan_devices("cpu", 0, gpus=gpus(0))


def test_part_paths_sit_next_to_the_output(tmp_path):
    assert part_path(tmp_path / "submission.csv", 1, 2) == tmp_path / "submission.part1of2.csv"


def test_rows_done_reads_the_journal_incrementally(tmp_path):
    s = Shard(0, 2, "cpu", tmp_path / "p.csv", ["a", "b", "c"])
    assert s.rows_done() == 0  # no journal yet
    with open(s.journal, "w") as f:
        f.write(json.dumps({"fingerprint": "x"}) + "\n" + json.dumps({"id": "a"}) + "\n" + '{"id": "b"')
    assert s.rows_done() == 1  # the cut line is not counted yet
    with open(s.journal, "a") as f:
        f.write("}\n")
    assert s.rows_done() == 2
    s.rc = 0
    assert s.rows_done() == 3


def test_join_takes_a_dead_shards_journal_and_fills_the_rest(tmp_path):
    out = tmp_path / "submission.csv"
    ok = Shard(0, 2, "cpu", part_path(out, 0, 2), ["a", "c"], rc=0)
    dead = Shard(1, 2, "cpu", part_path(out, 1, 2), ["b", "d"], rc=3)
    ok.out.write_text("ID,ImageWidth,ImageHeight,PredictionString\na,10,10,0 1 eNoLAAA=\nc,10,10,\n")
    journal = Journal(dead.journal, "x", resume=False)  # the dead shard finished b
    journal.add("b", 20, 20, "5 0.5 eNoLAAA=", None)
    journal.close(remove=False)
    result = ParallelResult([ok, dead])
    join_parts(result, ["a", "b", "c", "d"], out, fallback_size=lambda i: (30, 40))
    rows = read_submission(out)
    assert list(rows) == ["a", "b", "c", "d"]
    assert rows["b"] == (20, 20, "5 0.5 eNoLAAA=") and rows["d"] == (30, 40, "")
    assert result.filled == ["d"]
    assert not ok.out.exists() and dead.journal.exists()  # the failed shard's journal is kept
    assert "written empty" in result.format() and "failed twice" in result.format()


def _single(small_dataset, tiny_manifest, out):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the shard processes get OMP_NUM_THREADS=1: same float order
    try:
        return main(["--data-dir", str(small_dataset), "--weights", str(tiny_manifest), "--out", str(out),
                     "--device", "cpu", "--parallel", "1", "--no-progress", "-q"])
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def single_run(small_dataset, tiny_manifest, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "submission.csv"
    assert _single(small_dataset, tiny_manifest, out) == 0
    return out


def _parallel(small_dataset, tiny_manifest, out, *extra):
    return main(["--data-dir", str(small_dataset), "--weights", str(tiny_manifest), "--out", str(out),
                 "--device", "cpu", "--parallel", "2", "--no-progress", "-q", *extra])


def _parallel_with(launch, small_dataset, tiny_manifest, out, *extra):
    """The same run as :func:`_parallel`, its shard processes started by ``launch``."""
    args = build_parser().parse_args(["--data-dir", str(small_dataset), "--weights", str(tiny_manifest),
                                      "--out", str(out), "--device", "cpu", "--parallel", "2",
                                      "--no-progress", "-q", *extra])
    return run_parallel(args, ["cpu", "cpu"], small_dataset, out, None, launch=launch)


def test_two_processes_write_the_same_file_as_one(monkeypatch, small_dataset, tiny_manifest, single_run, tmp_path, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "new" / "submission.csv"  # a folder that does not exist yet
    assert _parallel(small_dataset, tiny_manifest, out) == 0
    assert out.read_bytes() == single_run.read_bytes()
    assert sorted(p.name for p in out.parent.iterdir()) == ["submission.csv"]  # parts and logs removed
    text = capsys.readouterr().out
    assert "== shard 0/2 (cpu)" in text and "== shard 1/2 (cpu)" in text and "validation: OK" in text


def test_a_shard_that_dies_is_run_again(monkeypatch, small_dataset, tiny_manifest, single_run, tmp_path, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    calls = []

    def flaky(cmd, env, stdout):
        calls.append(list(cmd))
        if "1/2" in cmd and sum("1/2" in c for c in calls) == 1:  # shard 1's first attempt dies
            return subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])
        return launch_process(cmd, env, stdout)

    out = tmp_path / "submission.csv"
    assert _parallel_with(flaky, small_dataset, tiny_manifest, out, "--no-resume") == 0
    assert out.read_bytes() == single_run.read_bytes()
    assert len(calls) == 3
    assert "--no-resume" in calls[0] and "--no-resume" not in calls[2]  # the rerun resumes
    assert "failed and were run again" in capsys.readouterr().out


def test_a_shard_that_dies_twice_still_leaves_every_row(monkeypatch, small_dataset, tiny_manifest, single_run, tmp_path, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    def broken(cmd, env, stdout):
        if "1/2" in cmd:  # shard 1 finishes one image, then dies, every time
            one = [*cmd, "--max-images", "1"]
            return subprocess.Popen(["sh", "-c", '"$@"; exit 3', "sh", *one], env=env)
        return launch_process(cmd, env, stdout)

    out = tmp_path / "submission.csv"
    assert _parallel_with(broken, small_dataset, tiny_manifest, out) == 1
    sample = small_dataset / "sample_submission.csv"
    assert validate_submission(out, sample) == []
    got, want = read_submission(out), read_submission(single_run)
    ids = list(pd.read_csv(sample)["ID"])
    assert list(got) == ids
    lost = ids[1::2][1:]  # shard 1's images after its first
    assert all(got[i] == want[i] for i in ids if i not in lost)
    assert all(got[i][2] == "" and got[i][:2] == want[i][:2] for i in lost)
    assert "written empty" in capsys.readouterr().out


def test_parallel_and_shard_do_not_mix(small_dataset, tiny_manifest, tmp_path, capsys):
    rc = main(["--data-dir", str(small_dataset), "--weights", str(tiny_manifest), "--out", str(tmp_path / "s.csv"),
               "--device", "cpu", "--parallel", "2", "--shard", "0/2", "-q"])
    assert rc == 2 and "do not go together" in capsys.readouterr().err


def test_a_shard_process_ends_with_its_parent(tmp_path):
    """The parent is SIGKILLed: its shard child (here a sleeper that called
    die_with_parent) gets SIGTERM instead of running on unattended."""
    import os
    import signal
    import time

    pid_file = tmp_path / "child.pid"
    child = (
        "import os, time, hpa_kernel.run.parallel as p; "
        f"assert p.die_with_parent(); open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    )
    parent = (
        "import os, subprocess, sys, time; "
        f"env = dict(os.environ, {parallel.PARENT_ENV}=str(os.getpid())); "
        f"subprocess.Popen([sys.executable, '-c', {child!r}], env=env); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", parent])
    deadline = time.monotonic() + 30
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline, "the child never started"
        time.sleep(0.1)
    child_pid = int(pid_file.read_text())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while True:
        try:
            os.kill(child_pid, 0)
        except ProcessLookupError:
            break  # gone
        try:  # a zombie (reaped by init later) also counts as ended
            with open(f"/proc/{child_pid}/stat") as f:
                if f.read().split(")")[-1].split()[0] == "Z":
                    break
        except FileNotFoundError:
            break
        assert time.monotonic() < deadline, "the shard process outlived its parent"
        time.sleep(0.1)


def test_die_with_parent_only_in_a_shard_process(monkeypatch):
    monkeypatch.delenv(parallel.PARENT_ENV, raising=False)
    assert parallel.die_with_parent() is False


def test_usable_cuda_devices_skips_the_ones_torch_cannot_run(monkeypatch, caplog):
    """Three cards faked at torch's CUDA API: cuda:1 is a P100 this (cu128) torch has no kernels for."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Tesla P100" if i == 1 else "Tesla T4")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (6, 0) if i == 1 else (7, 5))
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_70", "sm_75", "sm_80", "sm_90"])
    real_ones = torch.ones
    monkeypatch.setattr(torch, "ones", lambda *a, device=None, **kw: real_ones(*a, **kw))  # the test convolution
    assert parallel.usable_cuda_devices() == ["cuda:0", "cuda:2"]
    assert "not using cuda:1: Tesla P100 (compute capability 6.0) is not supported" in caplog.text
    assert plan_devices("auto", "auto") == ["cuda:0", "cuda:2"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert parallel.usable_cuda_devices() == []


def test_a_device_no_shard_could_use_stops_the_run_at_once(small_dataset, tiny_manifest, tmp_path, capsys):
    rc = main(["--data-dir", str(small_dataset), "--weights", str(tiny_manifest), "--out", str(tmp_path / "s.csv"),
               "--device", "tpu", "--parallel", "2", "-q"])
    assert rc == 2 and "not a device torch knows" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
