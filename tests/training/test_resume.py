"""Resume means "continue this run".

* A non-finite stop names a checkpoint that is finite and resumes with a lower lr.
* A changed --lr on resume really applies (the schedule restarts at the current step) and config.yaml keeps
  the history; a change the checkpoint cannot follow is refused.
* ``--resume auto`` without --config continues from the run folder's own config.yaml, and the resumed
  metrics.jsonl equals the uninterrupted one (train-metric windows are checkpointed).
"""
from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import comparable_rows, different_tensors, error_lines, model_state, resume, train, train_tool
from timm_local.training import CHECKPOINT_DIR, latest_checkpoint, list_checkpoints, read_metrics
from timm_local.training.checkpoint import load_state


def _all_finite(checkpoint: Path) -> bool:
    optimizer = load_state(checkpoint, "optimizer")
    tensors = list(model_state(checkpoint).values())
    tensors += [v for state in optimizer["state"].values() for v in state.values() if torch.is_tensor(v)]
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def test_non_finite_stop_names_a_checkpoint_that_resumes_with_a_lower_lr(tmp_path, capsys):
    """lr 1e4: the losses stay finite for three steps while the weights explode, then the gradients overflow.
    The checkpoint the message names must be finite (every tensor, optimizer state included) and training
    from it with the lower lr the message asks for must work."""
    out = tmp_path / "run"
    rc = train("--lr", "1e4", "--checkpoint-every-steps", "1", "--keep-checkpoints", "0", "--max-steps", "12",
               "--output-dir", out)
    errors = [line for line in error_lines(capsys.readouterr().err) if line.startswith("error:")]
    assert rc == 3 and len(errors) == 1
    named = Path(re.search(r"(\S*step_\d{8})", errors[0]).group(1))
    assert _all_finite(named), f"the message names {named.name}, which holds non-finite values"
    assert all(_all_finite(c) for c in list_checkpoints(out)), "a non-finite state was saved"
    assert "--lr 1000 (this run: --lr 10000)" in errors[0] and f"--resume {named}" in errors[0]
    assert read_metrics(out)[-1]["kind"] == "error"

    assert train_tool.main(["--output-dir", str(out), "--resume", str(named), "--lr", "0.01", "--max-steps", "12"]) == 0
    final = latest_checkpoint(out)
    assert final.name == "step_00000012" and _all_finite(final)
    rows = [r for r in read_metrics(out) if r["kind"] == "train"]
    assert [r["step"] for r in rows] == list(range(1, 13)) and all(math.isfinite(r["loss"]) for r in rows)


def _lr_rows(out: Path) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in read_metrics(out) if r["kind"] == "train"}


def test_a_changed_lr_on_resume_restarts_the_schedule_and_the_history_says_so(tmp_path):
    out = tmp_path / "run"
    assert train("--max-steps", 4, "--output-dir", out) == 0
    assert resume(out, "--lr", "0.01", "--max-steps", 7) == 0
    lrs = _lr_rows(out)
    first = 0.5 * 0.05 * (1 + math.cos(math.pi * 3 / 179))  # the lr=0.05 cosine over 179 steps, step 4
    remaining = 179 - 4  # the restarted cosine runs from 0.01 at step 4 to 0 at the end of the epoch
    assert lrs[4] == pytest.approx(first, rel=1e-12) and lrs[5] == 0.01
    assert lrs[7] == pytest.approx(0.5 * 0.01 * (1 + math.cos(math.pi * 2 / remaining)), rel=1e-12)
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["lr"] == 0.01 and cfg["history"][0]["config"]["lr"] == 0.05
    assert cfg["history"][1] == {"event": "resume", "step": 4, "checkpoint": "step_00000004",
                                 "changed": {"lr": {"was": 0.05, "now": 0.01}}}
    assert json.loads((out / "export" / "config.json").read_text())["timm_local"]["lr"] == 0.01
    # a later resume continues the restarted schedule (it is in the checkpoint), and records no change
    assert resume(out, "--max-steps", 9) == 0
    assert _lr_rows(out)[9] == pytest.approx(0.5 * 0.01 * (1 + math.cos(math.pi * 4 / remaining)), rel=1e-12)
    history = yaml.safe_load((out / "config.yaml").read_text())["history"]
    assert [h["event"] for h in history] == ["start", "resume", "resume"] and history[2]["changed"] == {}


def test_a_change_the_checkpoint_cannot_follow_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert train("--max-steps", 2, "--output-dir", out) == 0
    config = (out / "config.yaml").read_bytes()
    capsys.readouterr()
    assert resume(out, "--batch-size", 16) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "Refusing to resume" in lines[0] and "--batch-size" in lines[0]
    assert (out / "config.yaml").read_bytes() == config
    assert [p.name for p in (out / CHECKPOINT_DIR).iterdir()] == ["step_00000002"]


RECIPE = """# a make-run-style recipe: every setting in the file, none on the command line
dataset: digits
model: resnet20_cifar
method: auglocal
image_size: 8
batch_size: 64
epochs: 1
lr: 0.05
workers: 0
trackers: none
log_every: 4
checkpoint_every_steps: 2
"""


def test_resume_without_flags_continues_the_run_from_its_own_config(tmp_path):
    """The README's resume command after a recipe run: no --config, no other flag. It used to continue with the
    defaults (10 epochs, batch 128) and overwrite config.yaml with them. The stop falls between two train rows
    (--log-every 4, stopped after 6 steps), whose window must be in the checkpoint for the rows to agree."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    reference, out = tmp_path / "reference", tmp_path / "run"
    assert train_tool.main(["--config", str(recipe), "--output-dir", str(reference)]) == 0
    assert train_tool.main(["--config", str(recipe), "--output-dir", str(out), "--max-steps", "6"]) == 0
    assert resume(out) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["epochs"], saved["batch_size"], saved["max_steps"]) == (1, 64, None)
    assert saved["runtime"]["steps_per_epoch"] == 22 and latest_checkpoint(out).name == "step_00000022"
    assert not different_tensors(model_state(latest_checkpoint(reference)), model_state(latest_checkpoint(out)))
    rows = [r for r in comparable_rows(read_metrics(out)) if not (r["kind"] == "eval" and r["step"] == 6)]
    assert rows == comparable_rows(read_metrics(reference))


def test_a_finished_run_resumed_again_changes_nothing(tmp_path):
    out = tmp_path / "run"
    assert train("--max-steps", 3, "--output-dir", out) == 0
    before = model_state(latest_checkpoint(out))
    shutil.rmtree(out / "export")
    assert resume(out, "--max-steps", 3) == 0
    assert not different_tensors(before, model_state(latest_checkpoint(out)))
    assert (out / "export" / "model.safetensors").is_file()
