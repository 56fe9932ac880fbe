"""Packaging: build_wheel.sh, the Kaggle kernel script, and an offline install that runs.

The slow end-to-end test builds the wheel with ``build_wheel.sh --no-wheelhouse``, makes
a fresh virtual environment with ``--system-site-packages`` and installs the wheel with
``pip --no-index`` (``PIP_NO_INDEX=1``, pip's configuration files ignored). The system
site-packages (torch, timm, opencv, ...) stand in for the Kaggle image's preinstalled
stack; the wheel itself must bring everything else. The kernel script then runs
``python -m hpa_kernel.submit`` with the venv's python from an unrelated working
directory, and ``python -m hpa_kernel.tools.validate`` checks the CSV.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from types import ModuleType

import pytest

import hpa_kernel

REPO = Path(__file__).resolve().parent.parent
BUILD = REPO / "build_wheel.sh"
KERNEL = REPO / "submission" / "kernel.py"
WHEEL = f"hpa_kernel-{hpa_kernel.__version__}-py3-none-any.whl"


def load_kernel() -> ModuleType:
    spec = importlib.util.spec_from_file_location("hpa_submission_kernel", KERNEL)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a subprocess: offline pip, no configuration, no repo on the path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "HPA_")) and k != "PYTHONPATH"}
    env.update(PIP_NO_INDEX="1", PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHON=sys.executable)
    env.update(extra)
    return env


def run_build(*args: str, env: dict[str, str] | None = None, script: Path = BUILD) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(script), *args],
        env=env or clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )


def make_weights(folder: Path, data: bytes = b"not really a checkpoint") -> Path:
    """A weights folder with a manifest naming one classifier, sizes and sha256 recorded."""
    from hpa_kernel.integrity import update_manifest

    (folder / "demo").mkdir(parents=True)
    (folder / "demo" / "model.pt").write_bytes(data)
    (folder / "manifest.json").write_text(
        json.dumps({"segmentation": {"method": "classic"}, "classifiers": [{"path": "demo/model.pt"}]})
    )
    update_manifest(folder / "manifest.json")
    return folder


def tree_digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def snapshot(dest: Path) -> Path:
    """A copy of what the build needs, outside git (the script's non-git path)."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "--", "setup.py", "README.md", "hpa_kernel",
         "build_wheel.sh", "submission"],  # fmt: skip
        cwd=REPO, stdout=subprocess.PIPE, text=True, check=True,
    ).stdout.split("\n")  # fmt: skip
    for f in filter(None, files):
        if (REPO / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, dest / f)
    return dest


# ------------------------------------------------------------------ kernel metadata


def test_kernel_metadata_gpu_on_internet_off() -> None:
    meta = json.loads((REPO / "submission" / "kernel-metadata.json").read_text())
    assert meta["enable_gpu"] is True and meta["enable_internet"] is False
    # without machine_shape a push gets the P100, which the current image's torch cannot use
    assert meta["machine_shape"] == "NvidiaTeslaT4"
    assert meta["kernel_type"] == "script" and meta["language"] == "python"
    assert meta["code_file"] == "kernel.py" and (REPO / "submission" / meta["code_file"]).is_file()
    assert meta["competition_sources"] == ["hpa-single-cell-image-classification"]
    assert any(d.endswith("/hpa-kernel") for d in meta["dataset_sources"])
    assert meta["id"].split("/", 1)[1] == meta["title"]  # the title must resolve to the slug


# ------------------------------------------------------------------ kernel.py helpers


def test_find_wheel_picks_the_newest_version(tmp_path: Path) -> None:
    k = load_kernel()
    with pytest.raises(k.KernelError, match="no hpa_kernel"):
        k.find_wheel(tmp_path)
    for v in ("0.9.0", "0.10.0", "0.2.1"):
        (tmp_path / f"hpa_kernel-{v}-py3-none-any.whl").write_bytes(b"")
    (tmp_path / "hpa_kernel-9.9-cp310-cp310-linux_x86_64.whl").write_bytes(b"")  # not ours
    wheel, version = k.find_wheel(tmp_path)
    assert version == "0.10.0" and wheel.name == "hpa_kernel-0.10.0-py3-none-any.whl"


def test_find_dataset_dir_explicit_default_and_search(tmp_path: Path) -> None:
    k = load_kernel()
    inp = tmp_path / "input"
    with pytest.raises(k.KernelError, match="does not exist"):
        k.find_dataset_dir(tmp_path / "nope", inp)
    with pytest.raises(k.KernelError, match="HPA_DATASET_DIR"):
        k.find_dataset_dir(None, inp)
    nested = inp / "datasets" / "alice" / "renamed-slug"
    nested.mkdir(parents=True)
    (nested / WHEEL).write_bytes(b"")
    comp = inp / "hpa-single-cell-image-classification"
    comp.mkdir()
    (comp / WHEEL).write_bytes(b"")  # never searched: the competition's data
    assert k.find_dataset_dir(None, inp) == nested  # found by its wheel
    too_deep = inp / "a" / "b" / "c" / "d" / "e"
    too_deep.mkdir(parents=True)
    (too_deep / WHEEL).write_bytes(b"")
    assert k.find_dataset_dir(None, inp) == nested
    with pytest.raises(k.KernelError, match="not found"):
        k.find_dataset_dir(None, inp / "a")  # only deeper than four levels
    default = inp / "hpa-kernel"
    default.mkdir()
    (default / WHEEL).write_bytes(b"")
    assert k.find_dataset_dir(None, inp) == default  # the default slug wins
    assert k.find_dataset_dir(str(nested), inp) == nested  # explicit wins


def test_outside_paths_flag_only_for_kaggle_input(tmp_path: Path) -> None:
    k = load_kernel()
    inp = tmp_path / "input"
    m = tmp_path / "manifest.json"

    def cmd(manifest: dict) -> list[str]:
        m.write_text(json.dumps(manifest))
        return k.submit_command("py", m, None, None, [], kaggle_input=inp)

    seg = {"method": "hpa", "nuclei": f"{inp}/seg/dpn_unet_nuclei_v1.pth", "cell": f"{inp}/seg/dpn_unet_cell_3ch_v1.pth"}
    assert cmd({"segmentation": seg, "classifiers": ["demo/model.pt"]})[-1] == "--allow-outside-paths"
    assert "--allow-outside-paths" not in cmd({"classifiers": [{"path": "demo/model.pt"}]})
    assert "--allow-outside-paths" not in cmd({"classifiers": [{"path": "/etc/model.pt"}]})
    m.write_text("{broken")
    assert not k.manifest_needs_outside_paths(m, inp)
    m.write_text("[1, 2]")
    assert not k.manifest_needs_outside_paths(m, inp)


def test_submit_command_line(tmp_path: Path) -> None:
    k = load_kernel()
    m = tmp_path / "manifest.json"
    m.write_text("{}")
    assert k.submit_command("py", m, None, None, []) == ["py", "-m", "hpa_kernel.submit", "--weights", str(m)]
    cmd = k.submit_command("py", m, "/data", "/tmp/s.csv", ["--allow-outside-paths", "--max-images", "2"])
    assert cmd[3:] == ["--weights", str(m), "--data-dir", "/data", "--out", "/tmp/s.csv",
                       "--allow-outside-paths", "--max-images", "2"]  # fmt: skip


def test_exit_status_treats_complete_file_as_success(tmp_path: Path) -> None:
    k = load_kernel()
    out = tmp_path / "submission.csv"
    assert k.exit_status(0, out) == 0
    assert k.exit_status(1, out) == 1  # no file: a real failure (or a traceback)
    assert k.exit_status(1, None) == 1
    out.write_text("ID,ImageWidth,ImageHeight,PredictionString\n")
    assert k.exit_status(1, out, started=time.time()) == 0
    os.utime(out, (1_000_000_000, 1_000_000_000))  # a file left by an earlier run
    assert k.exit_status(1, out, started=time.time()) == 1
    assert k.exit_status(2, out) == 2


def test_paths_from_environment_and_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    k = load_kernel()
    monkeypatch.setenv("HPA_DATASET_DIR", "/ds")
    monkeypatch.setenv("HPA_DATA_DIR", "/data")
    monkeypatch.setenv("HPA_OUT", "/o.csv")
    a = k.parse_args([])
    assert (a.dataset_dir, a.data_dir, a.out, a.weights) == ("/ds", "/data", "/o.csv", None)
    a = k.parse_args(["--out", "/x.csv", "--", "--max-images", "3"])
    assert a.out == "/x.csv" and a.submit_args == ["--max-images", "3"]


def test_kernel_reports_a_missing_dataset(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, str(KERNEL), "--dataset-dir", str(tmp_path / "missing")],
        env=clean_env(),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "does not exist" in r.stdout


# ------------------------------------------------------------------ build_wheel.sh


@pytest.mark.parametrize(
    "args, message",
    [
        (["--deps", "timm torch==2.1"], "must not name torch"),
        (["--deps", "pycocotools,TorchVision>=0.1"], "must not name torchvision"),
        (["--dataset-id", "no-owner"], "--dataset-id wants OWNER/slug"),
        (["--title", "abc"], "6 to 50 characters"),
        (["--python", "three"], "--python wants X.Y"),
        (["--python", "3.10,"], "--python wants X.Y"),
        (["--bogus"], "unknown argument '--bogus'"),
        (["--out"], "--out needs a value"),
    ],
)
def test_build_refuses_bad_arguments(tmp_path: Path, args: list[str], message: str) -> None:
    weights = make_weights(tmp_path / "weights")
    r = run_build("--no-wheelhouse", "--weights", str(weights), "--out", str(tmp_path / "dist"), *args)
    assert r.returncode != 0 and message in r.stdout, r.stdout
    assert not (tmp_path / "dist" / WHEEL).exists()


def test_build_refuses_weights_without_manifest_or_with_mismatch(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    r = run_build("--no-wheelhouse", "--weights", str(tmp_path / "empty"), "--out", str(tmp_path / "dist"))
    assert r.returncode != 0 and "manifest.json not found" in r.stdout
    weights = make_weights(tmp_path / "weights")
    (weights / "demo" / "model.pt").write_bytes(b"changed after --update")
    r = run_build("--no-wheelhouse", "--weights", str(weights), "--out", str(tmp_path / "dist"))
    assert r.returncode != 0 and "model.pt" in r.stdout and "do not match" in r.stdout
    assert not (tmp_path / "dist" / "kaggle_dataset").exists()
    assert not [p for p in (tmp_path / "dist").iterdir()], "staging folder left behind"


def test_build_is_reproducible_and_removes_stale_files(tmp_path: Path) -> None:
    """Two builds give byte-identical outputs; leftovers of older builds disappear.

    Runs on a snapshot of the sources (outside git: the script's fallback path), so
    concurrent edits in the working tree cannot change the input between the builds.
    """
    src = snapshot(tmp_path / "src")
    weights = make_weights(src / "weights")
    out = tmp_path / "dist"
    env = clean_env(SOURCE_DATE_EPOCH="1700000000")
    args = ("--no-wheelhouse", "--out", str(out), "--dataset-id", "tester/hpa-kernel")
    r1 = run_build(*args, env=env, script=src / "build_wheel.sh")
    assert r1.returncode == 0, r1.stdout
    first = tree_digest(out)
    assert WHEEL in first and f"kaggle_dataset/{WHEEL}" in first
    assert "kaggle_dataset/weights/manifest.json" in first and "kaggle_dataset/weights/demo/model.pt" in first
    (out / "hpa_kernel-0.0.1-py3-none-any.whl").write_bytes(b"stale")
    (out / "kaggle_dataset" / "stale.txt").write_text("stale")
    (out / "wheelhouse" / "old-1.0-py3-none-any.whl").write_bytes(b"stale")
    (out / "unrelated.txt").write_text("not ours")
    r2 = run_build(*args, env=env, script=src / "build_wheel.sh")
    assert r2.returncode == 0, r2.stdout
    second = tree_digest(out)
    assert second.pop("unrelated.txt")
    assert second == first
    meta = json.loads((out / "kaggle_dataset" / "dataset-metadata.json").read_text())
    assert meta["id"] == "tester/hpa-kernel" and 6 <= len(meta["title"]) <= 50 and meta["licenses"]
    kmeta = json.loads((out / "kaggle_kernel" / "kernel-metadata.json").read_text())
    assert kmeta["id"] == "tester/hpa-kernel-submit" and kmeta["title"] == "hpa-kernel-submit"
    assert kmeta["dataset_sources"] == ["tester/hpa-kernel"]
    assert (out / "kaggle_kernel" / "kernel.py").read_bytes() == KERNEL.read_bytes()
    assert (weights / "manifest.json").read_bytes() == (out / "kaggle_dataset" / "weights" / "manifest.json").read_bytes()


def test_build_fails_when_a_subpackage_would_be_left_out(tmp_path: Path) -> None:
    src = snapshot(tmp_path / "src")
    (src / "hpa_kernel" / "stages" / "segmentation" / "__init__.py").unlink()  # no longer a package
    weights = make_weights(src / "weights")
    r = run_build("--no-wheelhouse", "--out", str(tmp_path / "dist"), script=src / "build_wheel.sh")
    assert r.returncode != 0 and "not in the wheel: hpa_kernel/stages/segmentation/" in r.stdout, r.stdout
    assert "the wheel is incomplete" in r.stdout
    assert not (tmp_path / "dist" / WHEEL).exists() and weights.is_dir()


def fake_wheel(folder: Path, version: str, requires: list[str]) -> Path:
    """A minimal pure-python ``hpa_kernel`` wheel (fast to install) with given requirements."""
    import base64

    dist = f"hpa_kernel-{version}.dist-info"
    files = {
        "hpa_kernel/__init__.py": f'__version__ = "{version}"\n',
        f"{dist}/METADATA": "Metadata-Version: 2.1\nName: hpa_kernel\nVersion: {}\n{}".format(
            version, "".join(f"Requires-Dist: {r}\n" for r in requires)
        ),
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(text.encode())}")
    files[f"{dist}/RECORD"] = "\n".join(record + [f"{dist}/RECORD,,"]) + "\n"
    path = folder / f"hpa_kernel-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return path


def test_install_falls_back_when_a_dependency_is_known_under_another_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pip cannot resolve a requirement (e.g. opencv-python-headless when the image has
    opencv-python): the kernel installs the wheel alone, then judges by the imports."""
    k = load_kernel()
    dataset = tmp_path / "dataset"
    (dataset / "wheelhouse").mkdir(parents=True)
    fake_wheel(dataset, "0.0.7", ["json-under-another-name-xyz"])
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    env = clean_env()
    for name in set(os.environ) - set(env):
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(k, "RUNTIME_MODULES", ("json",))  # importable under its module name
    assert k.install(dataset, py) == "0.0.7"
    monkeypatch.setattr(k, "RUNTIME_MODULES", ("json", "module_nobody_has_xyz"))
    with pytest.raises(k.KernelError, match="module_nobody_has_xyz"):
        k.install(dataset, py)


# ------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_offline_install_in_fresh_venv_and_submit(tmp_path: Path, tiny_checkpoint: Path, small_dataset: Path) -> None:
    # 1. build from the real working tree (git path), with a tiny real checkpoint as weights
    from conftest import write_manifest
    from hpa_kernel.integrity import update_manifest

    weights = tmp_path / "weights"
    update_manifest(write_manifest(weights, tiny_checkpoint))
    # listed before the build (others may add files to the shared tree meanwhile)
    tracked = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "--", "hpa_kernel"],
        cwd=REPO, stdout=subprocess.PIPE, text=True, check=True,
    ).stdout.split()  # fmt: skip
    dist = tmp_path / "dist"
    r = run_build("--no-wheelhouse", "--out", str(dist), "--weights", str(weights), "--dataset-id", "tester/hpa-kernel")
    assert r.returncode == 0, r.stdout
    dataset = dist / "kaggle_dataset"
    assert (dataset / WHEEL).is_file() and (dataset / "weights" / "manifest.json").is_file()

    # 2. the wheel holds every module of the package (all subpackages), no weights
    names = set(zipfile.ZipFile(dataset / WHEEL).namelist())
    modules = {f for f in tracked if f.endswith(".py") and (REPO / f).is_file()}
    assert modules and not modules - names, f"not in the wheel: {sorted(modules - names)}"
    assert {"hpa_kernel/submit.py", "hpa_kernel/run/pipeline.py", "hpa_kernel/stages/segmentation/__init__.py"} <= names
    assert not [n for n in names if n.startswith("weights/") or n.endswith((".pt", ".pth"))]
    entry_points = zipfile.ZipFile(dataset / WHEEL).read(f"hpa_kernel-{hpa_kernel.__version__}.dist-info/entry_points.txt")
    assert b"hpa-submit = hpa_kernel.submit:main" in entry_points

    # 3. a fresh venv; system site-packages stand in for the Kaggle image's stack
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    work = tmp_path / "work"  # not the repo: nothing importable from the cwd
    work.mkdir()
    out = tmp_path / "out" / "submission.csv"

    # 4. the kernel script: offline install from the dataset, then hpa_kernel.submit
    r = subprocess.run(
        [py, str(KERNEL), "--dataset-dir", str(dataset), "--data-dir", str(small_dataset), "--out", str(out),
         "--", "--device", "cpu", "--no-progress", "--workers", "1"],  # fmt: skip
        cwd=work, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-6000:]
    assert f"hpa_kernel {hpa_kernel.__version__} installed at {venv}" in r.stdout, r.stdout[-3000:]
    assert "dependencies satisfied" in r.stdout, r.stdout[-3000:]  # no fallback: pip resolved them
    assert "--no-index" in r.stdout and out.is_file()

    # 5. the venv imports the installed wheel, not the editable source tree
    where = subprocess.run(
        [py, "-c", "import hpa_kernel.submit as s; print(s.__file__)"],
        cwd=work, env=clean_env(), stdout=subprocess.PIPE, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert where.startswith(str(venv)) and not where.startswith(str(REPO)), where

    # 6. the CSV validates
    v = subprocess.run(
        [py, "-m", "hpa_kernel.tools.validate", str(out), "--sample", str(small_dataset / "sample_submission.csv")],
        cwd=work, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300,
    )  # fmt: skip
    assert v.returncode == 0, v.stdout
    lines = out.read_text().splitlines()
    assert lines[0] == "ID,ImageWidth,ImageHeight,PredictionString" and len(lines) == 5
