"""The trainer calls its hooks in the documented order (timm_local.training.trainer / .hooks), and a user's
hooks passed to ``fit`` receive every call -- on tiny real runs (resnet20_cifar, 8x8 digits, batch 8)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from timm_local.config import TrainConfig
from timm_local.training import CHECKPOINT_DIR, Hook, NonFiniteLossError, fit, make_runner, read_metrics
from timm_local.training.checkpoint import checkpoint_step

BUILT_IN = ["NonFiniteStop", "MetricsWindow", "Progress", "Evaluation", "Checkpointing", "Console", "Preemption"]


class Recorder(Hook):
    """Records each call with the step, and what the built-in hooks before it had done by then."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.seen: dict[str, Any] = {}

    def record(self, event: str) -> None:
        self.calls.append((event, self.trainer.state.global_step))

    def before_train(self) -> None:
        self.record("before_train")
        self.seen["hooks"] = [type(h).__name__ for h in self.trainer.hooks]
        self.seen["hook_objects"] = list(self.trainer.hooks)

    def before_epoch(self) -> None:
        self.record("before_epoch")

    def before_step(self) -> None:
        self.record("before_step")

    def after_backward(self) -> None:
        self.record("after_backward")

    def after_step(self) -> None:
        self.record("after_step")
        t = self.trainer
        # the metrics row of this step is logged, and a due checkpoint written, before a later hook runs
        self.seen.setdefault("rows", []).append(None if t.train_row is None else t.train_row["step"])
        self.seen.setdefault("checkpoints", []).append(checkpoint_step(t.last_checkpoint) if t.last_checkpoint else None)

    def after_epoch(self) -> None:
        self.record("after_epoch")
        t = self.trainer
        self.seen["epoch_end"] = (t.eval_row["step"], checkpoint_step(t.last_checkpoint), t.unsaved_eval)

    def after_train(self) -> None:
        self.record("after_train")

    def on_stop(self, error: BaseException) -> None:
        self.record("on_stop")
        self.seen["stop"] = error


def tiny(out: Path, **changes: Any) -> TrainConfig:
    settings = dict(dataset="digits", image_size=8, batch_size=8, workers=0, trackers="none", lr=0.05, seed=0,
                    epochs=1, log_every=2, max_steps=4, checkpoint_every_steps=3, export=False, eval_heads=False,
                    output_dir=str(out))
    return TrainConfig(**{**settings, **changes})


def test_a_user_hook_receives_every_call_in_the_documented_order(tmp_path):
    recorder = Recorder()
    cfg = tiny(tmp_path / "run")
    result = fit(cfg, make_runner(cfg), hooks=[recorder])
    expected = [("before_train", 0), ("before_epoch", 0)]
    for s in range(4):
        expected += [("before_step", s), ("after_backward", s), ("after_step", s + 1)]
    expected += [("after_epoch", 4), ("after_train", 4)]
    assert recorder.calls == expected
    # the built-in hooks in the documented order (no EMA hook without --model-ema), the user's after them
    assert recorder.seen["hooks"] == BUILT_IN + ["Recorder"]
    # --log-every 2: rows at steps 2 and 4; --checkpoint-every-steps 3: the checkpoint of step 3, seen at step 3
    assert recorder.seen["rows"] == [None, 2, None, 4]
    assert recorder.seen["checkpoints"] == [None, None, 3, 3]
    # max_steps inside the epoch: evaluated, then checkpointed (which saves the evaluation), before user hooks
    assert recorder.seen["epoch_end"] == (4, 4, False)
    kinds = [(r["kind"], r["step"]) for r in read_metrics(result.output_dir)]
    assert kinds == [("train", 2), ("train", 4), ("eval", 4), ("summary", 4)]
    assert sorted(checkpoint_step(p) for p in (result.output_dir / CHECKPOINT_DIR).iterdir()) == [3, 4]


def test_a_resumed_complete_run_calls_only_the_train_ends(tmp_path):
    cfg = tiny(tmp_path / "run")
    fit(cfg, make_runner(cfg))
    recorder = Recorder()
    again = tiny(tmp_path / "run", resume="auto")
    result = fit(again, make_runner(again), hooks=[recorder])
    assert recorder.calls == [("before_train", 4), ("after_train", 4)]  # evaluated and saved already
    assert result.global_step == 4 and result.last_checkpoint is not None and checkpoint_step(result.last_checkpoint) == 4


def test_a_non_finite_stop_reaches_user_hooks_through_on_stop(tmp_path):
    recorder = Recorder()
    cfg = tiny(tmp_path / "run", std=[1e-39])  # the inputs become inf: the first local loss is NaN
    with pytest.raises(NonFiniteLossError):
        fit(cfg, make_runner(cfg), hooks=[recorder])
    assert recorder.calls == [("before_train", 0), ("before_epoch", 0), ("before_step", 0), ("on_stop", 0)]
    assert isinstance(recorder.seen["stop"], NonFiniteLossError)
    assert [r["kind"] for r in read_metrics(tmp_path / "run")] == ["error"]


class Failing(Hook):
    """A user's job that fails at step 2."""

    def after_step(self) -> None:
        if self.trainer.state.global_step == 2:
            raise ValueError("the job failed")


def test_any_error_reaches_every_hook_through_on_stop(tmp_path):
    recorder = Recorder()
    cfg = tiny(tmp_path / "run")
    with pytest.raises(ValueError, match="the job failed"):
        fit(cfg, make_runner(cfg), hooks=[Failing(), recorder])
    assert recorder.calls[-2:] == [("after_backward", 1), ("on_stop", 2)]  # Failing stopped step 2's calls
    assert isinstance(recorder.seen["stop"], ValueError)
    progress = next(h for h in recorder.seen["hook_objects"] if type(h).__name__ == "Progress")
    assert progress.bar.disable  # the bar was closed (tqdm disables a closed bar)
