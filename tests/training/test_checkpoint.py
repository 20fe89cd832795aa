"""Checkpoints that are corrupt, stale or half-deleted never poison a resume.

Every file of a checkpoint is verified before it is loaded (a manifest of sizes and SHA-256 written with
it): ``--resume auto`` falls back to the newest checkpoint that verifies, with a warning naming the one it
skipped; ``--resume PATH`` names the bad file and the previous checkpoint that works. Saves replace an
existing folder; rotation renames before deleting; listing ignores incomplete folders.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from tests.helpers import DROPOUT, different_tensors, error_lines, model_state, train
from timm_local.training import CHECKPOINT_DIR, latest_checkpoint, list_checkpoints, read_checkpoint_meta

#: the lengths of the ``straight`` and ``stopped`` runs (tests/training/conftest.py)
STOP, FINAL = 3, 5


def _copy(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


def _ckpt(out: Path, step: int) -> Path:
    return out / CHECKPOINT_DIR / f"step_{step:08d}"


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


CORRUPTIONS = {
    "rng_state_truncated": lambda c: _truncate(c / "rng_0.safetensors"),
    "model_truncated": lambda c: _truncate(c / "model.safetensors"),
    "optimizer_bytes_flipped": lambda c: (c / "optimizer.safetensors").write_bytes(
        bytes(b ^ 0xFF if i == 200 else b for i, b in enumerate((c / "optimizer.safetensors").read_bytes()))),
    "scheduler_missing": lambda c: (c / "scheduler.safetensors").unlink(),
    "meta_not_json": lambda c: (c / "checkpoint_meta.json").write_text('{"model": "resnet20_cifar", '),
}
NAMED_FILE = {"rng_state_truncated": "rng_0.safetensors", "model_truncated": "model.safetensors",
              "optimizer_bytes_flipped": "optimizer.safetensors", "scheduler_missing": "scheduler.safetensors",
              "meta_not_json": "checkpoint_meta.json"}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_resume_from_a_corrupt_checkpoint_names_the_file_and_the_previous_one(kind, stopped, tmp_path, capsys):
    out = _copy(stopped, tmp_path)
    bad = _ckpt(out, STOP)
    CORRUPTIONS[kind](bad)
    rc = train(*DROPOUT, "--max-steps", FINAL, "--output-dir", out, "--resume", bad)
    lines = error_lines(capsys.readouterr().err)
    assert rc == 2 and len(lines) == 1, lines
    assert NAMED_FILE[kind] in lines[0] and f"--resume {_ckpt(out, STOP - 1)}" in lines[0]
    assert sorted(p.name for p in (out / CHECKPOINT_DIR).iterdir()) == [f"step_{s:08d}" for s in range(1, STOP + 1)]


@pytest.mark.parametrize("kind", ["rng_state_truncated", "meta_not_json"])
def test_resume_auto_falls_back_to_the_newest_checkpoint_that_verifies(kind, straight, stopped, tmp_path, caplog):
    """A corrupt RNG file used to be skipped silently (accelerate logs it at INFO): with dropout the resumed run
    then differed from the uninterrupted one. Now the checkpoint is skipped with a warning, the previous one
    resumed, and the final weights are bitwise those of the uninterrupted run."""
    out = _copy(stopped, tmp_path)
    CORRUPTIONS[kind](_ckpt(out, STOP))
    with caplog.at_level(logging.WARNING):
        assert train(*DROPOUT, "--max-steps", FINAL, "--output-dir", out, "--resume", "auto") == 0
    skipped = [r.getMessage() for r in caplog.records if "skipping checkpoint" in r.getMessage()]
    assert len(skipped) == 1 and f"step_{STOP:08d}" in skipped[0] and NAMED_FILE[kind] in skipped[0]
    assert read_checkpoint_meta(latest_checkpoint(out))["train_state"]["global_step"] == FINAL
    assert not different_tensors(model_state(latest_checkpoint(straight)), model_state(latest_checkpoint(out)))


def test_a_stale_step_folder_is_replaced_not_kept(straight, stopped, tmp_path):
    """A resume from an older checkpoint of the same folder: the newer folders of the abandoned continuation
    (here a run with another lr) are removed, and the save of their step replaces instead of skipping."""
    out = _copy(stopped, tmp_path)
    other = tmp_path / "other"
    assert train(*DROPOUT, "--max-steps", FINAL, "--lr", "0.01", "--output-dir", other) == 0
    stale = _ckpt(out, FINAL)
    shutil.copytree(_ckpt(other, FINAL), stale)
    assert latest_checkpoint(out) == stale  # a complete, verifying checkpoint: only its history is wrong
    assert train(*DROPOUT, "--max-steps", FINAL, "--output-dir", out, "--resume", _ckpt(out, STOP)) == 0
    assert not different_tensors(model_state(_ckpt(straight, FINAL)), model_state(stale))


def test_listing_ignores_half_deleted_and_unnamed_folders(stopped, tmp_path):
    out = _copy(stopped, tmp_path)
    (_ckpt(out, 2) / "model.safetensors").unlink()  # what a kill during an in-place deletion left
    (out / CHECKPOINT_DIR / ".old-step_00000001").mkdir()
    assert [p.name for p in list_checkpoints(out)] == ["step_00000001", "step_00000003"]


class Killed(Exception):
    """Stands for a SIGKILL at that moment (the real ones: benchmarks/fault_injection.py)."""


def test_rotation_renames_before_deleting(tmp_path, monkeypatch):
    """A kill in the middle of deleting the oldest checkpoint (here: the deletion stops after one file) must not
    leave a ``step_*`` folder that lists as complete but lacks files."""
    real_rmtree = shutil.rmtree

    def killed_during_deletion(path, *args, **kwargs):
        model = Path(path) / "model.safetensors"
        if model.is_file():
            model.unlink()
            raise Killed(path)
        return real_rmtree(path, *args, **kwargs)

    out = tmp_path / "run"
    monkeypatch.setattr(shutil, "rmtree", killed_during_deletion)
    with pytest.raises(Killed):
        train("--checkpoint-every-steps", "1", "--keep-checkpoints", "1", "--max-steps", "3", "--output-dir", out)
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    folders = sorted(p.name for p in (out / CHECKPOINT_DIR).glob("step_*"))
    assert folders == [p.name for p in list_checkpoints(out)] == ["step_00000002"]
    # and the run resumes from what is left, clearing the half-deleted folder on its next save
    assert train("--checkpoint-every-steps", "1", "--keep-checkpoints", "1", "--max-steps", "3", "--output-dir", out,
                 "--resume", "auto") == 0
    assert sorted(p.name for p in (out / CHECKPOINT_DIR).iterdir()) == ["step_00000003"]


def test_every_checkpoint_carries_a_manifest_that_matches_its_files(stopped):
    ckpt = latest_checkpoint(stopped)
    files = read_checkpoint_meta(ckpt)["files"]
    on_disk = sorted(p.name for p in ckpt.iterdir() if p.name != "checkpoint_meta.json")
    assert sorted(files) == on_disk and all(files[n]["bytes"] == (ckpt / n).stat().st_size for n in files)
    assert json.loads((ckpt / "checkpoint_meta.json").read_text())["verified_finite"] is True
