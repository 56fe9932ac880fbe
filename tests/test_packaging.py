"""Packaging: build_wheel.sh, the Kaggle kernel script, and an offline install that runs.

The slow end-to-end test builds the wheel with ``build_wheel.sh --no-wheelhouse``, makes
a fresh virtual environment that sees the packages of the interpreter running the tests
(a system Python's or a venv's: see ``make_venv``) and installs the wheel with
``pip --no-index`` (``PIP_NO_INDEX=1``, pip's configuration files ignored). Those packages
(torch, timm, opencv, ...) stand in for the Kaggle image's preinstalled stack; the wheel
itself must bring everything else. The kernel script then runs ``python -m hpa_kernel.submit``
with the venv's python from an unrelated working directory, and ``python -m hpa_kernel.tools.validate``
checks the CSV.

The wheelhouse tests need the package index (CI has it; they skip, saying so, where it
cannot be reached): one installs the wheelhouse offline into a venv that sees only the
packages the Kaggle image provides (``build_wheel.sh --print-kaggle-provided`` and what they
need, linked from this interpreter's site-packages; timm, pycocotools, pyyaml, ... hidden),
one builds with a setuptools older than 70.1 and no ``wheel`` package.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import site
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
BUILDER = REPO / "submission" / "build.py"
WHEEL = f"hpa_kernel-{hpa_kernel.__version__}-py3-none-any.whl"


def load_kernel(path: Path = KERNEL, name: str = "hpa_submission_kernel") -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def load_builder() -> ModuleType:
    """submission/build.py, the script behind build_wheel.sh."""
    return load_kernel(BUILDER, "hpa_submission_build")


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a subprocess: offline pip, no configuration, no repo on the path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "HPA_")) and k != "PYTHONPATH"}
    env.update(PIP_NO_INDEX="1", PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHON=sys.executable)
    env.update(extra)
    return env


def site_dirs() -> list[str]:
    """The site-packages folders the running interpreter imports from (a venv's own, plus
    the system's when it sees them; the user's when enabled)."""
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def make_venv(path: Path, sees: list[str] | None = None, with_pip: bool = False) -> str:
    """A fresh venv (made from the base interpreter also when the tests run in a venv) that
    sees the packages of ``sees`` (default: ``site_dirs()``) after its own, the way
    ``--system-site-packages`` would see a system Python's; returns its python.

    ``--system-site-packages`` alone is not enough: inside a venv it names the *base*
    interpreter's site-packages, not the venv's where the README command installed torch.
    """
    cmd = [sys.executable, "-m", "venv", str(path)] + ([] if with_pip else ["--without-pip"])
    subprocess.run(cmd, check=True, env=clean_env())
    py = str(path / "bin" / "python")
    purelib = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        stdout=subprocess.PIPE, text=True, check=True, env=clean_env(),
    ).stdout.strip()  # fmt: skip
    dirs = site_dirs() if sees is None else sees
    if dirs:  # addsitedir also runs the .pth files there, as for system site-packages
        line = "import site; " + "; ".join(f"site.addsitedir({d!r})" for d in dirs)
        Path(purelib, "_tests_outer_site.pth").write_text(line + "\n")
    return py


def run_build(*args: str, env: dict[str, str] | None = None, script: Path = BUILD) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(script), *args],
        env=env or clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )


def make_weights(folder: Path, data: bytes | None = None) -> Path:
    """A weights folder with a manifest naming one classifier (default: a tiny real
    checkpoint, the build test-loads it), sizes and sha256 recorded."""
    from hpa_kernel.integrity import update_manifest

    (folder / "demo").mkdir(parents=True)
    if data is None:
        import torch

        from hpa_kernel.stages.model import PuzzleCAM, save_checkpoint

        torch.manual_seed(0)
        save_checkpoint(PuzzleCAM("test_resnet"), folder / "demo" / "model.pt", image_size=64, crop_size=32)
    else:
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


def test_build_refuses_a_classifier_the_kernel_cannot_load(tmp_path: Path) -> None:
    """A file that passes the size/sha256 check but that the kernel's loader refuses (here
    random bytes recorded by --update) stops the build with the loader's reason."""
    weights = make_weights(tmp_path / "weights", data=b"not really a checkpoint")
    r = run_build("--no-wheelhouse", "--weights", str(weights), "--out", str(tmp_path / "dist"))
    assert r.returncode != 0 and "the kernel cannot load classifier" in r.stdout, r.stdout
    assert "model.pt" in r.stdout and "cannot be loaded by the kernel" in r.stdout, r.stdout
    assert not (tmp_path / "dist" / "kaggle_dataset").exists()


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
    # one list of requirements, setup.py's: the kernel's import check and the default wheelhouse deps read it
    builder, kernel = load_builder(), load_kernel()
    for module in kernel.runtime_modules(builder.requires(out / WHEEL)):
        importlib.import_module(module)  # IMPORT_NAMES maps every distribution to a module that imports
    assert [d.split("==")[0] for d in builder.default_deps(out / WHEEL)] == ["timm", "pycocotools"]


def test_build_fails_when_a_subpackage_would_be_left_out(tmp_path: Path) -> None:
    src = snapshot(tmp_path / "src")
    (src / "hpa_kernel" / "stages" / "segmentation" / "__init__.py").unlink()  # no longer a package
    weights = make_weights(src / "weights")
    r = run_build("--no-wheelhouse", "--out", str(tmp_path / "dist"), script=src / "build_wheel.sh")
    assert r.returncode != 0 and "not in the wheel: hpa_kernel/stages/segmentation/" in r.stdout, r.stdout
    assert "the wheel is incomplete" in r.stdout
    assert not (tmp_path / "dist" / WHEEL).exists() and weights.is_dir()


def fake_wheel(folder: Path, version: str, requires: list[str], name: str = "hpa_kernel") -> Path:
    """A minimal pure-python wheel (fast to install) with given requirements."""
    import base64

    path = folder / f"{name}-{version}-py3-none-any.whl"
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": f'__version__ = "{version}"\n',
        f"{dist}/METADATA": "Metadata-Version: 2.1\nName: {}\nVersion: {}\n{}".format(
            name, version, "".join(f"Requires-Dist: {r}\n" for r in requires)
        ),
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(text.encode())}")
    files[f"{dist}/RECORD"] = "\n".join(record + [f"{dist}/RECORD,,"]) + "\n"
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return path


def test_runtime_modules_come_from_the_requirements() -> None:
    k = load_kernel()
    reqs = ["torch", "opencv-python-headless>=4", "scikit-image", "pycocotools", 'PyYAML; extra == "train"',
            "Foo.Bar (>=1)"]
    assert k.runtime_modules(reqs) == ["torch", "cv2", "skimage", "pycocotools.mask", "foo_bar"]


def test_install_falls_back_when_a_dependency_is_known_under_another_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pip cannot resolve a requirement (e.g. opencv-python-headless when the image has
    opencv-python): the kernel installs what the wheelhouse carries (its requirements.txt)
    and the wheel alone, then judges by the imports."""
    k = load_kernel()
    dataset = tmp_path / "dataset"
    (dataset / "wheelhouse").mkdir(parents=True)
    fake_wheel(dataset, "0.0.7", ["json-under-another-name-xyz", "carried_xyz"])
    fake_wheel(dataset / "wheelhouse", "1.0", [], name="carried_xyz")  # stands for timm, pyyaml...
    (dataset / "wheelhouse" / "requirements.txt").write_text("carried_xyz==1.0\n")
    py = make_venv(tmp_path / "venv")
    env = clean_env()
    for name in set(os.environ) - set(env):
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setitem(k.IMPORT_NAMES, "json-under-another-name-xyz", "json")  # importable under its module name
    assert k.install(dataset, py) == "0.0.7"
    monkeypatch.setitem(k.IMPORT_NAMES, "carried-xyz", "module_nobody_has_xyz")
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

    # 3. a fresh venv; this interpreter's packages stand in for the Kaggle image's stack
    venv = tmp_path / "venv"
    py = make_venv(venv)
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


# ------------------------------------------------------------------ wheelhouse and old setuptools (package index)


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def index_env(**extra: str) -> dict[str, str]:
    """A subprocess environment that reaches the package index the way pip here is configured."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("HPA_")}
    env.update(PYTHON=sys.executable, PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("PIP_NO_INDEX", None)
    env.update(extra)
    return env


def need_index(tmp_path: Path) -> None:
    """Skip (saying why) only where pip cannot download from its index; CI (``.ci/run`` sets
    ``HPA_TEST_NEED_INDEX=1``) fails instead, so the wheelhouse tests never go quiet there."""
    r = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(tmp_path / "probe"), "packaging"],
        env=index_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=180,
    )  # fmt: skip
    if r.returncode != 0:
        why = f"the package index cannot be reached (pip download packaging: {r.stdout.strip().splitlines()[-1:]})"
        if os.environ.get("HPA_TEST_NEED_INDEX") == "1":
            pytest.fail(why + "; HPA_TEST_NEED_INDEX=1 (CI) needs it")
        pytest.skip(why)


def kaggle_provided() -> list[str]:
    r = run_build("--print-kaggle-provided")
    assert r.returncode == 0 and "torch" in r.stdout.split(), r.stdout
    return r.stdout.split()


def image_view(dest: Path, names: list[str]) -> set[str]:
    """``dest`` gets links to the installed distributions ``names`` and everything they need
    (their requirements, transitively) from this interpreter's site-packages, nothing else:
    a stand-in for an image that has those, with their real files. Returns the names linked."""
    from importlib import metadata as md

    try:
        from packaging.requirements import Requirement
    except ImportError:
        from pip._vendor.packaging.requirements import Requirement

    roots = [Path(d).resolve() for d in site_dirs()]
    dists: dict[str, md.Distribution] = {}
    shadowed = []
    for d in md.distributions(path=[str(r) for r in roots]):
        if norm(d.metadata["Name"]) in dists:
            shadowed.append(d)
        else:
            dists[norm(d.metadata["Name"])] = d
    seen: set[tuple[str, str]] = set()  # (name, extra) walked
    todo = [(norm(n), "") for n in names if norm(n) in dists]
    while todo:
        n, extra = todo.pop()
        if (n, extra) in seen:
            continue
        seen.add((n, extra))
        for text in dists[n].requires or []:
            req = Requirement(text)
            if norm(req.name) in dists and (req.marker is None or req.marker.evaluate({"extra": extra})):
                todo += [(norm(req.name), e) for e in ("", *req.extras)]
    keep = {n for n, _ in seen}
    # a prefix (folder or file) is linked whole when only kept distributions own files under it
    owners: dict[tuple, set[bool]] = {}
    files: list[tuple] = []
    for n, d in [*dists.items(), *(("", s) for s in shadowed)]:
        root = Path(d.locate_file("")).resolve()
        for f in d.files or []:
            if f.parts[0] == ".." or not (root / f).exists():
                continue  # scripts in bin/, files not there
            key = (root, *f.parts)
            files.append((n in keep and d is dists[n], key))
            for i in range(2, len(key) + 1):
                owners.setdefault(key[:i], set()).add(n in keep and d is dists[n])
    dest.mkdir(parents=True)
    for kept, key in files:
        if not kept:
            continue
        i = next((i for i in range(2, len(key) + 1) if owners[key[:i]] == {True}), len(key))
        link = dest.joinpath(*key[1:i])
        if not link.exists() and not link.is_symlink():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(Path(key[0]).joinpath(*key[1:i]))
    return keep


def run_py(py: str, *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: int = 600):
    return subprocess.run([py, *args], cwd=cwd, env=env or clean_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)  # fmt: skip


@pytest.mark.slow
def test_wheelhouse_installs_offline_into_an_image_with_only_the_provided_packages(tmp_path: Path) -> None:
    """The wheelhouse carries what timm, pycocotools and hpa_kernel need beyond the packages
    the Kaggle image provides: pip installs hpa_kernel offline into an environment that has
    only those (real files, linked from here), resolving every dependency, and it imports."""
    need_index(tmp_path)
    pyv = f"{sys.version_info[0]}.{sys.version_info[1]}"
    dist = tmp_path / "dist"
    r = run_build("--python", pyv, "--out", str(dist), "--weights", str(make_weights(tmp_path / "weights")),
                  env=index_env())  # fmt: skip
    assert r.returncode == 0, r.stdout[-4000:]
    dataset = dist / "kaggle_dataset"
    carried = {norm(f.name.split("-")[0]) for f in (dataset / "wheelhouse").glob("*.whl")}
    provided = {norm(n) for n in kaggle_provided()}
    assert {"timm", "pycocotools", "pyyaml", "safetensors", "huggingface-hub"} <= carried, carried
    assert not carried & provided, carried & provided  # the image's own are never carried
    listed = (dataset / "wheelhouse" / "requirements.txt").read_text().splitlines()
    assert {norm(line.split("==")[0]) for line in listed} == carried and all(f'"{pyv}"' in x for x in listed)

    kept = image_view(tmp_path / "image", [*provided, "pip"])
    assert {"torch", "numpy", "pip"} <= kept and not kept & {"timm", "pycocotools", "pyyaml", "huggingface-hub"}, kept
    venv = tmp_path / "kaggle"
    py = make_venv(venv, sees=[str(tmp_path / "image")])
    work = tmp_path / "work"
    work.mkdir()
    before = run_py(py, "-c", "import torch, torchvision, numpy, cv2, skimage, scipy, pandas, joblib, tqdm; import timm", cwd=work)
    assert before.returncode != 0 and "No module named 'timm'" in before.stdout, before.stdout[-2000:]

    r = run_py(py, "-m", "pip", "install", "--no-index", "--find-links", str(dataset / "wheelhouse"),
               "--find-links", str(dataset), f"hpa_kernel=={hpa_kernel.__version__}", cwd=work)  # fmt: skip
    assert r.returncode == 0, r.stdout[-4000:]
    modules = [*load_kernel().runtime_modules(load_builder().requires(dist / WHEEL)), "yaml", "safetensors",
               "huggingface_hub", "hpa_kernel.submit"]  # fmt: skip
    code = (
        "import importlib, sys\n"
        "mods = [importlib.import_module(m) for m in sys.argv[1:]]\n"
        "import timm\n"
        "timm.create_model('resnet18', pretrained=False, num_classes=19, in_chans=4)\n"
        "print(timm.__file__)\n"
    )
    r = run_py(py, "-c", code, *modules, cwd=work)
    assert r.returncode == 0 and r.stdout.strip().startswith(str(venv)), r.stdout[-3000:]
    r = run_py(py, "-m", "pip", "check", cwd=work)
    assert r.returncode == 0, r.stdout
    r = run_py(py, "-m", "hpa_kernel.submit", "--version", cwd=work)
    assert r.returncode == 0 and hpa_kernel.__version__ in r.stdout, r.stdout


@pytest.mark.slow
def test_wheelhouse_plan_is_pips_resolution_without_the_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--deps requirements and what they need are carried (a package of the image named there too);
    the image's packages the wheel requires are placeholders, never downloaded; a requirement whose
    marker holds only for the target Python (anyio's exceptiongroup below 3.11) is carried."""
    need_index(tmp_path)
    b = load_builder()
    wheel = fake_wheel(tmp_path, "0.0.1", ["torch", "numpy", "tqdm"])
    weights = make_weights(tmp_path / "w", b"x")
    args = ["--python", "3.10", "--deps", "six anyio>=4 pillow", "--out", str(tmp_path / "dist"), "--weights", str(weights)]
    opts = b.parse_options(b.parser().parse_args(args))
    monkeypatch.delenv("PIP_NO_INDEX", raising=False)
    for k, v in index_env().items():  # the builder runs pip with this process's environment
        monkeypatch.setenv(k, v)
    b.wheelhouse(opts, wheel, tmp_path / "wheelhouse")
    carried = {norm(f.name.split("-")[0]) for f in (tmp_path / "wheelhouse").glob("*.whl")}
    assert {"six", "anyio", "pillow", "exceptiongroup"} <= carried and not carried & {"torch", "numpy", "tqdm"}, carried
    listed = (tmp_path / "wheelhouse" / "requirements.txt").read_text().splitlines()
    assert {norm(line.split("==")[0]) for line in listed} == carried and all('"3.10"' in x for x in listed)


CANNOT_MAKE_WHEELS = "from setuptools.dist import Distribution; Distribution().get_command_class('bdist_wheel')"


@pytest.fixture(scope="module")
def old_setuptools_python(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A bare venv whose setuptools is older than 70.1 and that has no ``wheel`` package."""
    tmp = tmp_path_factory.mktemp("old_setuptools")
    py = make_venv(tmp / "venv", sees=[], with_pip=True)  # ensurepip: pip, and setuptools 65.5 on 3.11
    old = run_py(py, "-c", "import setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) >= 70)", cwd=tmp)
    if old.returncode != 0:  # newer Pythons bundle no setuptools
        need_index(tmp)
        r = run_py(py, "-m", "pip", "install", "setuptools<70", cwd=tmp, env=index_env())
        assert r.returncode == 0, r.stdout[-3000:]
    run_py(py, "-m", "pip", "uninstall", "-y", "wheel", cwd=tmp)
    r = run_py(py, "-c", CANNOT_MAKE_WHEELS, cwd=tmp)
    assert r.returncode != 0 and "invalid command 'bdist_wheel'" in r.stdout, r.stdout  # the case under test
    return py


def test_build_offline_with_old_setuptools_says_what_to_install(tmp_path: Path, old_setuptools_python: str) -> None:
    r = run_build("--no-wheelhouse", "--out", str(tmp_path / "dist"), "--weights", str(make_weights(tmp_path / "w")),
                  env=clean_env(PYTHON=old_setuptools_python))  # fmt: skip
    assert r.returncode == 1 and "invalid command" not in r.stdout, r.stdout
    (line,) = r.stdout.strip().splitlines()
    assert "cannot build wheels without the 'wheel' package" in line and "-m pip install wheel" in line, line
    assert not (tmp_path / "dist" / WHEEL).exists()


@pytest.mark.slow
def test_build_with_old_setuptools_builds_in_isolation(tmp_path: Path, old_setuptools_python: str) -> None:
    """With the index reachable the wheel (and the wheelhouse) are built all the same."""
    need_index(tmp_path)
    pyv = f"{sys.version_info[0]}.{sys.version_info[1]}"
    dist = tmp_path / "dist"
    r = run_build("--python", pyv, "--out", str(dist), "--weights", str(make_weights(tmp_path / "w")),
                  "--no-weights-check", env=index_env(PYTHON=old_setuptools_python))  # no torch to test-load with
    assert r.returncode == 0, r.stdout[-4000:]
    assert "builds in an isolated environment" in r.stdout
    names = set(zipfile.ZipFile(dist / WHEEL).namelist())
    assert {"hpa_kernel/submit.py", "hpa_kernel/run/pipeline.py", "hpa_kernel/stages/segmentation/__init__.py"} <= names
    assert any(p.name.startswith("timm-") for p in (dist / "wheelhouse").iterdir())
