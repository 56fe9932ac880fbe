"""Tests for hpa_kernel.integrity: digests, recording, verification and the CLI."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import pytest

from hpa_kernel.config import ConfigError, load_config
from hpa_kernel.integrity import (
    IntegrityError,
    file_digest,
    main,
    named_files,
    record_files,
    update_manifest,
    verify_files,
)


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture()
def weights(tmp_path: Path) -> Path:
    """A weights folder: hpa segmentation (2 files) + 2 classifiers, with a recorded manifest."""
    root = tmp_path / "weights"
    _write(root / "seg" / "nuc.pth", b"nuclei-weights" * 1000)
    _write(root / "seg" / "cell.pth", b"cell-weights" * 1000)
    _write(root / "demo" / "a.pt", b"classifier-a" * 777)
    _write(root / "demo" / "b.pt", b"classifier-b" * 555)
    manifest = {
        "segmentation": {"method": "hpa", "nuclei": "seg/nuc.pth", "cell": "seg/cell.pth"},
        "classifiers": [{"path": "demo/a.pt", "weight": 1.0}, {"path": "demo/b.pt", "weight": 0.5}],
        "top_classes": 18,
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    update_manifest(root / "manifest.json")
    return root


def test_file_digest_matches_hashlib_across_chunks(tmp_path: Path) -> None:
    data = bytes(range(256)) * 5000  # 1.28 MB: several chunks of the default size too
    p = _write(tmp_path / "f.bin", data)
    expected = hashlib.sha256(data).hexdigest()
    assert file_digest(p) == expected
    assert file_digest(p, chunk_size=7) == expected
    assert file_digest(_write(tmp_path / "empty", b"")) == hashlib.sha256(b"").hexdigest()


def test_record_files_relative_keys_size_and_hash(tmp_path: Path) -> None:
    root = tmp_path / "w"
    a = _write(root / "demo" / "a.pt", b"hello")
    outside = _write(tmp_path / "elsewhere" / "x.pth", b"outside!")
    entries = record_files(root / "manifest.json", ["demo/a.pt", outside])
    assert entries == {
        "demo/a.pt": {"size": 5, "sha256": hashlib.sha256(b"hello").hexdigest()},
        outside.resolve().as_posix(): {"size": 8, "sha256": hashlib.sha256(b"outside!").hexdigest()},
    }
    # an absolute path inside the manifest folder is keyed relative too
    assert list(record_files(root / "manifest.json", [a.resolve()])) == ["demo/a.pt"]
    with pytest.raises(IntegrityError, match="nope.pt"):
        record_files(root / "manifest.json", ["nope.pt"])


def test_update_writes_every_named_file_and_keeps_other_keys(weights: Path) -> None:
    raw = json.loads((weights / "manifest.json").read_text())
    assert set(raw["files"]) == {"seg/nuc.pth", "seg/cell.pth", "demo/a.pt", "demo/b.pt"}
    assert raw["files"]["demo/a.pt"] == {
        "size": len(b"classifier-a" * 777),
        "sha256": hashlib.sha256(b"classifier-a" * 777).hexdigest(),
    }
    assert raw["top_classes"] == 18 and raw["classifiers"][1]["weight"] == 0.5
    assert list(raw)[:3] == ["segmentation", "classifiers", "top_classes"]  # order kept
    assert not list(weights.glob(".manifest.*"))  # no temporary left behind


def test_update_drops_stale_entries(weights: Path) -> None:
    m = weights / "manifest.json"
    raw = json.loads(m.read_text())
    raw["files"]["old/gone.pt"] = {"size": 1, "sha256": "00"}
    raw["segmentation"] = {"method": "classic"}
    m.write_text(json.dumps(raw))
    files = update_manifest(m)
    assert set(files) == {"demo/a.pt", "demo/b.pt"}


def test_good_manifest_passes(weights: Path) -> None:
    config = load_config(weights / "manifest.json")
    verify_files(config)
    verify_files(config, check_hash=False)
    assert [p.name for p in named_files(config)] == ["nuc.pth", "cell.pth", "a.pt", "b.pt"]


def test_size_mismatch_names_the_file(weights: Path) -> None:
    _write(weights / "demo" / "b.pt", b"classifier-b" * 556)
    config = load_config(weights / "manifest.json")
    for check_hash in (True, False):  # size is always checked
        with pytest.raises(IntegrityError, match=r"b\.pt.*size mismatch") as ei:
            verify_files(config, check_hash=check_hash)
        assert ei.value.path.name == "b.pt"


def test_hash_mismatch_names_the_file_and_can_be_skipped(weights: Path) -> None:
    data = bytearray((weights / "seg" / "cell.pth").read_bytes())
    data[100] ^= 0xFF  # same size, different content
    _write(weights / "seg" / "cell.pth", bytes(data))
    config = load_config(weights / "manifest.json")
    with pytest.raises(IntegrityError, match=r"cell\.pth.*sha256 mismatch") as ei:
        verify_files(config, check_hash=True)
    assert ei.value.path.name == "cell.pth"
    verify_files(config, check_hash=False)  # hash skipped, size still matches


def test_missing_file_is_named(weights: Path) -> None:
    (weights / "seg" / "nuc.pth").unlink()
    config = load_config(weights / "manifest.json")
    for check_hash in (True, False):
        with pytest.raises(IntegrityError, match=r"nuc\.pth.*missing") as ei:
            verify_files(config, check_hash=check_hash)
        assert ei.value.path == (weights / "seg" / "nuc.pth").resolve()


def test_integrity_error_is_a_config_error() -> None:
    assert issubclass(IntegrityError, ConfigError)


def test_unrecorded_file_warns_but_passes(weights: Path, caplog: pytest.LogCaptureFixture) -> None:
    m = weights / "manifest.json"
    raw = json.loads(m.read_text())
    del raw["files"]["demo/a.pt"]
    m.write_text(json.dumps(raw))
    with caplog.at_level(logging.WARNING, logger="hpa_kernel.integrity"):
        verify_files(load_config(m))
    assert any("a.pt" in r.getMessage() and "no size/sha256" in r.getMessage() for r in caplog.records)
    # but a missing unrecorded file is still an error
    (weights / "demo" / "a.pt").unlink()
    with pytest.raises(IntegrityError, match="a.pt"):
        verify_files(load_config(m), check_hash=False)


def test_classic_segmentation_names_no_segmentation_files(weights: Path) -> None:
    m = weights / "manifest.json"
    raw = json.loads(m.read_text())
    raw["segmentation"] = {"method": "classic"}
    m.write_text(json.dumps(raw))
    (weights / "seg" / "nuc.pth").unlink()  # recorded but unused: not checked
    verify_files(load_config(m))


def test_outside_paths_recorded_absolute(tmp_path: Path, weights: Path) -> None:
    ext = _write(tmp_path / "input" / "hpa-seg" / "dpn_unet_nuclei_v1.pth", b"N" * 4096)
    ext2 = _write(tmp_path / "input" / "hpa-seg" / "dpn_unet_cell_3ch_v1.pth", b"C" * 4096)
    m = weights / "manifest.json"
    raw = json.loads(m.read_text())
    raw["segmentation"] = {"method": "hpa", "nuclei": str(ext), "cell": str(ext2)}
    m.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="absolute"):
        update_manifest(m)
    files = update_manifest(m, allow_outside=True)
    assert ext.resolve().as_posix() in files and "demo/a.pt" in files
    config = load_config(m, allow_outside=True)
    verify_files(config)
    ext2.write_bytes(b"C" * 4095)
    with pytest.raises(IntegrityError, match="dpn_unet_cell_3ch_v1.pth"):
        verify_files(config, check_hash=False)


def test_manifest_moved_with_its_folder_still_verifies(tmp_path: Path, weights: Path) -> None:
    moved = tmp_path / "dataset" / "weights"
    moved.parent.mkdir()
    os.rename(weights, moved)
    verify_files(load_config(moved / "manifest.json"))


def test_cli_update_and_check(weights: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m = weights / "manifest.json"
    _write(weights / "demo" / "a.pt", b"retrained")
    assert main(["--manifest", str(m), "-q"]) == 1
    assert "a.pt" in capsys.readouterr().err
    assert main(["--manifest", str(m), "--update", "-q"]) == 0
    out = capsys.readouterr().out
    assert hashlib.sha256(b"retrained").hexdigest() in out
    assert main(["--manifest", str(weights), "-q"]) == 0  # a folder works too
    assert "OK: 4 file(s)" in capsys.readouterr().out


def test_local_copies_record_kaggle_paths(tmp_path: Path, weights: Path) -> None:
    """A manifest naming /kaggle/input/... files is recorded from local copies of them."""
    kaggle_dir = tmp_path / "not-mounted" / "hpacellseg"  # never created: like /kaggle/input here
    local = tmp_path / "downloads"
    _write(local / "dpn_unet_nuclei_v1.pth", b"N" * 300)
    _write(local / "dpn_unet_cell_3ch_v1.pth", b"C" * 200)
    m = weights / "manifest.json"
    raw = json.loads(m.read_text())
    raw["segmentation"] = {
        "method": "hpa",
        "nuclei": str(kaggle_dir / "dpn_unet_nuclei_v1.pth"),
        "cell": str(kaggle_dir / "dpn_unet_cell_3ch_v1.pth"),
    }
    m.write_text(json.dumps(raw))
    with pytest.raises(IntegrityError, match="--local-copies"):
        update_manifest(m, allow_outside=True)
    assert main(["--manifest", str(m), "--update", "--allow-outside-paths", "--local-copies", str(local), "-q"]) == 0
    files = json.loads(m.read_text())["files"]
    key = (kaggle_dir / "dpn_unet_cell_3ch_v1.pth").as_posix()
    assert files[key] == {"size": 200, "sha256": hashlib.sha256(b"C" * 200).hexdigest()}
    config = load_config(m, allow_outside=True)
    with pytest.raises(IntegrityError, match="dpn_unet_nuclei_v1.pth.*missing"):
        verify_files(config)  # not mounted here
    verify_files(config, inside_only=True)  # what a dataset build checks
    # "mounting" the files at their Kaggle path makes the full check pass
    _write(kaggle_dir / "dpn_unet_nuclei_v1.pth", b"N" * 300)
    _write(kaggle_dir / "dpn_unet_cell_3ch_v1.pth", b"C" * 200)
    verify_files(config)
    _write(kaggle_dir / "dpn_unet_cell_3ch_v1.pth", b"X" * 200)
    with pytest.raises(IntegrityError, match="dpn_unet_cell_3ch_v1.pth.*sha256"):
        verify_files(config)


def test_inside_only_still_checks_inside_files(weights: Path) -> None:
    _write(weights / "demo" / "a.pt", b"tampered")
    with pytest.raises(IntegrityError, match="a.pt"):
        verify_files(load_config(weights / "manifest.json"), inside_only=True)


def test_local_copies_of_team_folds_sharing_a_name(tmp_path: Path, weights: Path) -> None:
    """Four folds all called model_best.pt are recorded from a mirrored tree, never from one copy."""
    run = "siamese_seresnext50_32x4d_512_384_RGBY_fp16_CV4_v2.0"
    kaggle = tmp_path / "not-mounted" / "hpa-models"
    folds = [kaggle / run / f"fold{k}" / "stage1" / "snapshots" / "model_best.pt" for k in (1, 2)]
    m = weights / "manifest.json"
    raw = json.loads(m.read_text())
    raw["classifiers"] = [{"paths": [str(p) for p in folds], "format": "mpware"}]
    m.write_text(json.dumps(raw))
    flat = tmp_path / "flat"
    _write(flat / "model_best.pt", b"F" * 10)
    with pytest.raises(IntegrityError, match="several named files are called model_best.pt"):
        update_manifest(m, allow_outside=True, local_copies=[flat])
    mirror = tmp_path / "mirror"
    for k, p in enumerate(folds):
        _write(mirror / run / p.parent.relative_to(kaggle / run) / "model_best.pt", bytes([65 + k]) * (10 + k))
    update_manifest(m, allow_outside=True, local_copies=[mirror])
    files = json.loads(m.read_text())["files"]
    assert [files[p.as_posix()]["size"] for p in folds] == [10, 11]


def test_the_integrity_line_counts_only_what_was_verified(tmp_path: Path, weights: Path, caplog) -> None:
    """Issue 22 item 5: a file without an entry is 'not verified', and the count says so."""
    m = weights / "manifest.json"
    raw = json.loads(m.read_text())
    raw["files"].pop("demo/b.pt")
    m.write_text(json.dumps(raw))
    with caplog.at_level(logging.INFO, logger="hpa_kernel.integrity"):
        verify_files(load_config(m))
    line = next(r.getMessage() for r in caplog.records if "weights integrity" in r.getMessage())
    assert "3 of 4 file(s) checked" in line and "1 not recorded, not verified" in line
