"""Every ```bash block of README.md and docs/*.md runs, on tiny inputs, or is listed here with
the reason it is not run (issue 22 item 5: the docs must not drift from the program).

Each block is found by its first command line. A block no entry of :data:`RUN` or
:data:`NOT_RUN` knows fails :func:`test_every_command_block_is_run_or_listed`, so a new
block has to be classified here. A run block is executed as written by ``bash -e`` in a
scratch folder, after the explicit replacements of its entry (placeholders such as
``DIR`` by tiny inputs, an optional ``[...]`` group kept or dropped); a replacement whose
text is no longer in the block fails, so the entry follows the docs. ``python`` is this
interpreter, ``HOME`` is inside the scratch folder, and ``$HPA_KERNEL_WEIGHTS`` names a
tiny manifest, so that a command using the default weights stays quick (except the local
Kaggle trial, which packages the repository's own ``weights/``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from conftest import write_manifest

REPO = Path(__file__).resolve().parent.parent
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


@dataclass(frozen=True)
class Block:
    file: str
    line: int
    text: str

    @property
    def first(self) -> str:
        """The first command line (comments skipped)."""
        return next(ln.strip() for ln in self.text.splitlines() if ln.strip() and not ln.strip().startswith("#"))


def doc_blocks() -> list[Block]:
    found = []
    for path in DOC_FILES:
        text = path.read_text()
        for m in re.finditer(r"^```(?:bash|sh|shell|console)\n(.*?)^```", text, re.S | re.M):
            found.append(Block(path.relative_to(REPO).as_posix(), text[: m.start()].count("\n") + 1, m.group(1)))
    return found


#: Blocks not run, by the start of their first command line, with the reason.
NOT_RUN = {
    "pip install torch==": "installs torch and the package from the package index into this environment",
    'pip install "kaggle': "installs the Kaggle CLI and moves the user's kaggle.json (an account, network)",
    "kaggle datasets list": "the Kaggle CLI against kaggle.com (an account, network)",
    "mkdir -p ~/hpa-seg && cd ~/hpa-seg": "downloads the HPA segmentation weights from zenodo and uploads them to Kaggle",
    "bash build_wheel.sh --weights my_weights": "fills the wheelhouse from the package index (network); the offline "
                                                "build of the same script is run in the local Kaggle trial below",
    "kaggle datasets create": "uploads to Kaggle (an account, network)",
    "kaggle datasets version": "uploads to Kaggle (an account, network)",
    "kaggle kernels push": "pushes and runs the kernel on Kaggle (an account, network)",
    "kaggle competitions submit": "submits to the competition (an account, network)",
    "mkdir -p pretrained && python -c": "downloads ImageNet weights through timm (network)",
}


@dataclass
class Plan:
    """How one block is run: ``replace`` (old, new) pairs applied in order (each old text
    must be in the block), ``setup(ws, env)`` to prepare the scratch folder, ``check(ws)``
    afterwards; ``cwd`` ``"repo"`` runs in the repository (the block writes under ws only)."""

    replace: list[tuple[str, str]] = field(default_factory=list)
    setup: Callable[[Path, dict], None] | None = None
    check: Callable[[Path], None] | None = None
    cwd: str = "ws"
    slow: bool = False
    dropped_lines: dict[str, str] = field(default_factory=dict)  # line start -> why it is not run


def _py(args: list[str], ws: Path, env: dict) -> None:
    p = subprocess.run([sys.executable, *args], cwd=ws, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"setup {args}: {p.stderr[-2000:]}"


def _test_data(ws: Path, env: dict, folder: str = "data", images: int = 2) -> None:
    _py(["-m", "hpa_kernel.tools.synthetic", "--out", folder, "--images", str(images), "--seed", "9003",
         "--size", "256"], ws, env)


def _team_setup(ws: Path, env: dict) -> None:
    _test_data(ws, env)
    _py(["-m", "hpa_kernel.submit", "--data-dir", "data", "--out", "theirs.csv", "--tta", "--no-progress"], ws, env)


def _readme_manifest() -> dict:
    text = (REPO / "README.md").read_text()
    m = re.search(r"`my_weights/manifest\.json`.*?```json\n(.*?)```", text, re.S)
    assert m, "README: the my_weights/manifest.json example is gone"
    return json.loads(m.group(1))


def _integrity_setup(ws: Path, env: dict) -> None:
    raw = _readme_manifest()
    (ws / "my_weights").mkdir()
    for c in raw["classifiers"]:
        shutil.copy(Path(env["HPA_KERNEL_WEIGHTS"]).parent / "model.pt", ws / "my_weights" / c["path"])
    (ws / "my_weights" / "manifest.json").write_text(json.dumps(raw))
    seg = Path(env["HOME"]) / "hpa-seg"
    seg.mkdir(parents=True)
    for key in ("nuclei", "cell"):
        (seg / Path(raw["segmentation"][key]).name).write_bytes(b"a local copy of " + key.encode())


def _integrity_check(ws: Path) -> None:
    files = json.loads((ws / "my_weights" / "manifest.json").read_text())["files"]
    assert "/kaggle/input/SLUG/dpn_unet_nuclei_v1.pth" in files and "seresnext50_fold1.pt" in files


def _team_file_setup(ws: Path, env: dict) -> None:
    """A team-format file where the README's import example expects one (a resnet10t run, for speed)."""
    from team_reference import TeamSiamese, randomize, save_team_file

    run = "siamese_resnet10t_512_384_RGBY_fp16_CV4_v2.0"
    save_team_file(randomize(TeamSiamese("resnet10t"), seed=5),
                   ws / "hpa-models" / run / "fold1" / "stage1" / "snapshots" / "model_best.pt", "cuda")


def _team_file_check(ws: Path) -> None:
    from hpa_kernel.stages.model import load_checkpoint

    _, meta = load_checkpoint(ws / "my_weights" / "seresnext50_fold1.pt")
    assert meta["input"] == "mpware" and meta["backbone"] == "resnet10t" and meta["crop_size"] == 384


TINY_TRAIN = {"index_csv": "cache/index.csv", "backbone": "test_resnet", "pretrained": False, "image_size": 64,
              "train_crop": None, "crop_size": 64, "epochs": 2, "batch_size": 8, "workers": 0, "threads": 1,
              "max_batches": 2, "out": "runs/seresnext50_512_fold0"}


def _training_setup(ws: Path, env: dict) -> None:
    """The synthetic block of the README (run first, as the README says), a tiny stand-in for
    the recipe's config (same path and out), a stage-2 config, a manifest to fit into."""
    (synthetic,) = [b for b in doc_blocks() if b.first.startswith("python -m hpa_kernel.tools.synthetic --out .")]
    p = subprocess.run(["bash", "-e", "-c", synthetic.text], cwd=ws, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    (ws / "configs").mkdir()
    (ws / "configs" / "hpa_seresnext50_512.json").write_text(json.dumps(TINY_TRAIN))
    (ws / "stage2.json").write_text(json.dumps({**TINY_TRAIN, "out": "runs/stage2", "epochs": 1}))
    write_manifest(ws / "weights", Path(env["HPA_KERNEL_WEIGHTS"]).parent / "model.pt")


def _training_check(ws: Path) -> None:
    assert (ws / "weights.csv").is_file() and (ws / "runs" / "stage2" / "last_model.pt").is_file()
    assert (ws / "oof_fold0" / "oof_images.csv").is_file() and (ws / "weights" / "manifest.fit.json").is_file()


RUN: dict[str, Plan] = {
    "python -m hpa_kernel.submit --data-dir DIR": Plan(
        replace=[("DIR", "data"), ("[--weights MANIFEST]", "--weights $HPA_KERNEL_WEIGHTS"),
                 ("[--out submission.csv]", "--out submission.csv")],
        setup=_test_data, check=lambda ws: (ws / "submission.csv").is_file() or pytest.fail("no submission.csv")),
    "python -m hpa_kernel.submit --data-dir DATA --out ours.csv --save-cells": Plan(
        replace=[("DATA", "data")], setup=_team_setup, slow=True,
        check=lambda ws: (ws / "merged.csv").is_file() or pytest.fail("no merged.csv")),
    "python -m hpa_kernel.integrity --manifest my_weights/manifest.json --update": Plan(
        setup=_integrity_setup, check=_integrity_check),
    "python -m hpa_kernel.tools.synthetic --out /tmp/hpa_synth": Plan(
        replace=[("/tmp/", "$WS/")] * 1, cwd="repo", slow=True,
        check=lambda ws: (ws / "hpa_submission.csv").is_file() or pytest.fail("no submission")),
    "python -m hpa_kernel.tools.synthetic --out . --images": Plan(
        check=lambda ws: (ws / "train.csv").is_file() and (ws / "truth").is_dir() or pytest.fail("no train set")),
    "python -m hpa_kernel.train.prepare --csv train.csv": Plan(
        replace=[("[--src external/] ", ""), (" [--resume runs/seresnext50_512_fold0/last.pt]", ""),
                 ("[--manifest weights/manifest.json]", "--manifest weights/manifest.json"), ("[--per-class]", "--per-class")],
        dropped_lines={"torchrun --nproc_per_node 4": "four DDP processes (tests/test_train_ddp.py runs two)"},
        setup=_training_setup, check=_training_check, slow=True),
    "export OMP_NUM_THREADS=1": Plan(slow=True),
    "python -m hpa_kernel.tools.import_checkpoint": Plan(
        replace=[("siamese_seresnext50_32x4d_512", "siamese_resnet10t_512")],
        setup=_team_file_setup, check=_team_file_check),
}


def _plan_for(block: Block) -> tuple[str, Plan | str]:
    keys = [k for k in RUN if block.first.startswith(k)] + [k for k in NOT_RUN if block.first.startswith(k)]
    assert len(keys) == 1, f"{block.file}:{block.line}: {block.first!r} matches {keys or 'no entry'} of RUN/NOT_RUN"
    return keys[0], RUN.get(keys[0]) or NOT_RUN[keys[0]]


def test_every_command_block_is_run_or_listed() -> None:
    blocks = doc_blocks()
    assert len(blocks) >= 15
    used = {_plan_for(b)[0] for b in blocks}
    stale = (set(RUN) | set(NOT_RUN)) - used
    assert not stale, f"entries for blocks no longer in the docs: {sorted(stale)}"


def _script(block: Block, plan: Plan) -> str:
    text = block.text
    for old, new in plan.replace:
        assert old in text, f"{block.file}:{block.line}: {old!r} is no longer in the block"
        text = text.replace(old, new)
    lines = text.splitlines()
    for start in plan.dropped_lines:
        assert any(ln.startswith(start) for ln in lines), f"{block.file}:{block.line}: no line {start!r}"
    return "\n".join(ln for ln in lines if not any(ln.startswith(s) for s in plan.dropped_lines)) + "\n"


def _params():
    out = []
    for b in doc_blocks():
        key, plan = _plan_for(b)
        if isinstance(plan, Plan):
            marks = [pytest.mark.slow] if plan.slow else []
            out.append(pytest.param(b, plan, id=f"{b.file}:{b.line}", marks=marks))
    return out


@pytest.mark.parametrize("block, plan", _params())
def test_the_command_block_runs(block: Block, plan: Plan, tmp_path: Path, tiny_manifest: Path) -> None:
    ws, bin_dir = tmp_path / "ws", tmp_path / "bin"
    ws.mkdir()
    bin_dir.mkdir()
    for name in ("python", "python3"):
        (bin_dir / name).symlink_to(sys.executable)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path / "home"),
           "WS": str(ws), "HPA_KERNEL_WEIGHTS": str(tiny_manifest), "OMP_NUM_THREADS": "1",
           "NO_ALBUMENTATIONS_UPDATE": "1", "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    (tmp_path / "home").mkdir()
    if plan.cwd == "repo":  # the block runs in the repository and writes under $WS only
        env.pop("PYTHONPATH", None)
        env.pop("HPA_KERNEL_WEIGHTS")
    if plan.setup:
        plan.setup(ws, env)
    p = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", _script(block, plan)], cwd=REPO if plan.cwd == "repo"
                       else ws, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, f"{block.file}:{block.line} failed:\n{p.stdout[-3000:]}\n{p.stderr[-4000:]}"
    if plan.check:
        plan.check(ws)
