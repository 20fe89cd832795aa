"""Checkpoints are data: no pickle in a new one, a pickle that names code refused before it runs, and the
pickle format of earlier versions migrated to safetensors with a resume that stays bitwise."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.helpers import different_tensors, error_lines, model_state, resume, resume_fixture
from timm_local.training import CHECKPOINT_DIR, latest_checkpoint, read_checkpoint_meta, verify_checkpoint
from timm_local.training.checkpoint import load_state, manifest
from timm_local.training.safe_state import load_state_file, restore_rng

#: the lengths of the ``straight`` and ``stopped`` runs (tests/training/conftest.py)
STOP, FINAL = 2, 4


def test_no_file_of_a_checkpoint_is_a_pickle(stopped):
    ckpt = latest_checkpoint(stopped)
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == ["checkpoint_meta.json", "model.safetensors", "optimizer.safetensors", "rng_0.safetensors",
                     "scheduler.safetensors"]
    for name in names:
        if name.endswith(".json"):
            json.loads((ckpt / name).read_text())
        else:
            with safe_open(str(ckpt / name), framework="pt") as f:  # raises on anything but safetensors
                assert f.metadata() is not None
    optimizer = load_state(ckpt, "optimizer")
    assert set(optimizer) == {"state", "param_groups"} and all(isinstance(k, int) for k in optimizer["state"])
    assert isinstance(optimizer["state"][0]["momentum_buffer"], torch.Tensor)


def _accelerate_pickle_format(ckpt: Path, legacy: Path, manifest_too: bool) -> None:
    """``ckpt`` rewritten as Accelerate's ``save_state`` wrote it (the format of earlier versions), by
    Accelerate's own writers, with this process's generators set to the checkpoint's first."""
    from accelerate.checkpointing import save_accelerator_state, save_custom_state

    class Holder:
        def __init__(self, state):
            self.state = state

        def state_dict(self):
            return self.state

    meta = read_checkpoint_meta(ckpt)
    legacy.mkdir(parents=True)
    rng = load_state_file(ckpt / "rng_0.safetensors")
    rng.pop("step")
    saved = torch.get_rng_state()
    restore_rng(rng)
    save_accelerator_state(str(legacy), [], [Holder(load_state(ckpt, "optimizer"))], [], [], 0, 0)
    torch.set_rng_state(saved)
    for i, state in enumerate((load_state(ckpt, "model"), load_state(ckpt, "scheduler"), meta["train_state"])):
        save_custom_state(Holder(state), str(legacy), i)
    old = {k: v for k, v in meta.items() if k not in ("format", "format_version", "states", "files")}
    old["custom_objects"] = ["model", "scheduler", "train_state"]
    if manifest_too:
        old["files"] = manifest(legacy, [p.name for p in legacy.iterdir()])
    (legacy / "checkpoint_meta.json").write_text(json.dumps(old))


@pytest.mark.parametrize("manifest_too", [False, True])
def test_the_pickle_format_migrates_once_and_resumes_bitwise(manifest_too, straight, stopped, tmp_path, caplog):
    out = tmp_path / "run"
    shutil.copytree(stopped, out, ignore=shutil.ignore_patterns(CHECKPOINT_DIR))
    ckpt = latest_checkpoint(stopped)
    _accelerate_pickle_format(ckpt, out / CHECKPOINT_DIR / ckpt.name, manifest_too)
    assert resume(out, "--max-steps", FINAL) == 0
    migrated = [r.getMessage() for r in caplog.records if "migrated checkpoint" in r.getMessage()]
    assert len(migrated) == 1 and ckpt.name in migrated[0]
    assert not list((out / CHECKPOINT_DIR).rglob("*.pkl")) and not list((out / CHECKPOINT_DIR).rglob("*.bin"))
    assert not different_tensors(model_state(latest_checkpoint(straight)), model_state(latest_checkpoint(out)))
    a, b = load_state(latest_checkpoint(straight), "optimizer"), load_state(latest_checkpoint(out), "optimizer")
    assert all(torch.equal(a["state"][i]["momentum_buffer"], b["state"][i]["momentum_buffer"]) for i in a["state"])


class RunsCode:
    """Unpickling this calls ``exec``: what a hostile checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


@pytest.mark.parametrize("manifest_too", [False, True])
def test_a_pickle_that_runs_code_is_refused_before_it_runs(manifest_too, tmp_path, capsys):
    out, marker = tmp_path / "run", tmp_path / "marker"
    shutil.copytree(resume_fixture.FIXTURE, out, ignore=shutil.ignore_patterns("expected_final.safetensors"))
    ckpt = out / CHECKPOINT_DIR / "step_00000002"
    torch.save({"t_initial": RunsCode(marker)}, ckpt / "custom_checkpoint_1.pkl")
    if manifest_too:  # a folder whose manifest was written for the hostile file: the hashes match
        meta = read_checkpoint_meta(ckpt)
        meta["files"] = manifest(ckpt, [p.name for p in ckpt.iterdir() if p.name != "checkpoint_meta.json"])
        (ckpt / "checkpoint_meta.json").write_text(json.dumps(meta))
    assert resume(out, "--max-steps", 4) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "custom_checkpoint_1.pkl" in lines[0] and "--trust-pickle" in lines[0], lines
    assert not marker.exists(), "the pickle's code ran"
    assert (ckpt / "custom_checkpoint_1.pkl").is_file()  # refused, not deleted


def test_state_files_round_trip_what_pickle_would_have_held(tmp_path):
    import numpy as np

    from timm_local.training.safe_state import StateFormatError, save_state_file

    state = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)}},
             "param_groups": [{"params": [0], "betas": (0.9, 0.999), "lr": float("inf"), "foreach": None}],
             "numpy": np.arange(4, dtype=np.uint32), "$odd": "key", "nested": [(1, "a"), []]}
    save_state_file(tmp_path / "s.safetensors", state)
    back = load_state_file(tmp_path / "s.safetensors")
    assert back["param_groups"] == state["param_groups"] and back["nested"] == state["nested"]
    assert back["$odd"] == "key" and isinstance(back["param_groups"][0]["betas"], tuple)
    assert torch.equal(back["state"][0]["exp_avg"], state["state"][0]["exp_avg"])
    assert back["numpy"].dtype == np.uint32 and (back["numpy"] == state["numpy"]).all()
    with pytest.raises(StateFormatError, match="param_groups.0.fn is a builtin_function_or_method, which cannot be stored without pickle"):
        save_state_file(tmp_path / "bad.safetensors", {"param_groups": [{"fn": len}]})


def test_another_state_adds_one_named_file_to_every_checkpoint(tmp_path):
    """What a branch adding an EMA of the weights does: one call, and the checkpoint holds ``ema.safetensors``,
    listed in the manifest and loaded back on restore."""
    from accelerate import Accelerator

    from timm_local.training import TrainState
    from timm_local.training.checkpoint import add_checkpoint_state, save_checkpoint
    from timm_local.training.restore import restore_checkpoint

    accelerator = Accelerator(cpu=True)
    ema = torch.nn.Linear(3, 2)
    add_checkpoint_state(accelerator, "ema", ema)
    saved = {k: v.clone() for k, v in ema.state_dict().items()}
    state = TrainState(global_step=7)
    ckpt = save_checkpoint(accelerator, tmp_path, state, {"model": "x"}, keep=0)
    assert "ema.safetensors" in read_checkpoint_meta(ckpt)["files"] and verify_checkpoint(ckpt)
    with torch.no_grad():
        ema.weight.add_(1.0)
    restored = TrainState()
    restore_checkpoint(accelerator, ckpt, restored)
    assert not different_tensors(ema.state_dict(), saved) and restored.global_step == 7
    with pytest.raises(ValueError, match="use letters"):
        add_checkpoint_state(accelerator, "../ema", ema)
