"""The pipelined engine equals the sequential one, step for step.

Real torch.distributed (gloo, 127.0.0.1, free ports) with processes spawned by
``timm_local.engine.launch_local``; the references run the sequential engine in this process
on the same data, weights and optimizer. BatchNorm is in training mode throughout.
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import random
from typing import Any, Iterator

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import timm_local
from timm_local.engine import (
    PipelineTopology,
    PipelineTrainer,
    balanced_cut,
    launch_local,
    local_stage_costs,
    segment_ranges,
)
from timm_local.methods import LocalHead, LocalMethod, LocalStage, register_method
from timm_local.partition import Partition

MODEL = "resnet20_cifar"
SIZE = 16
BATCH = 8
SEED = 1234  # rank 0's seed; other ranks seed differently on purpose (the engine syncs init)


# --------------------------------------------------------------------------------------------
# A method whose heads read the network input (like InfoPro's reconstruction), so the pipeline
# must carry the input batch to later segments.
# --------------------------------------------------------------------------------------------
class _ReconHead(LocalHead):
    def __init__(self, chs: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(chs, num_classes)
        self.decoder = nn.Conv2d(chs, 3, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features.mean((2, 3)))

    def local_loss(self, features: torch.Tensor, target: torch.Tensor, inputs: torch.Tensor):
        logits = self(features)
        recon = F.interpolate(self.decoder(features), size=inputs.shape[-2:], mode="bilinear", align_corners=True)
        return F.cross_entropy(logits, target) + F.mse_loss(recon, inputs), logits


class _ReconMethod(LocalMethod):
    def build(self, partition: Partition, num_classes: int) -> list[LocalStage]:
        n = len(partition)
        stages = [LocalStage([i], _ReconHead(partition.specs[i].out_chs, num_classes)) for i in range(n - 2)]
        return stages + [LocalStage([n - 2, n - 1])]


# --------------------------------------------------------------------------------------------
# Shared helpers (workers and references build exactly the same things)
# --------------------------------------------------------------------------------------------
RECON = "test_pipeline_recon"


@contextlib.contextmanager
def _registered(name: str, cls: type[LocalMethod]) -> Iterator[None]:
    """Register a test-only method for the duration of one build: other test modules
    parametrize over ``list_methods()`` at collection, so the registry must stay clean."""
    from timm_local.methods import base

    register_method(name)(cls)
    try:
        yield
    finally:
        base._METHODS.pop(name, None)


def _build(method: str, seed: int) -> timm_local.LocalModel:
    torch.manual_seed(seed)
    with _registered(RECON, _ReconMethod) if method == RECON else contextlib.nullcontext():
        model = timm_local.create_local_model(MODEL, method, input_size=(3, SIZE, SIZE))
    return model.train()


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)


def _data(steps: int, replicas: int, offset: int = 0) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """data[replica][step] = (x, y), the same in every process."""
    g = torch.Generator().manual_seed(99 + offset)
    return [
        [(torch.randn(BATCH, 3, SIZE, SIZE, generator=g), torch.randint(0, 10, (BATCH,), generator=g)) for _ in range(steps)]
        for _ in range(replicas)
    ]


def _train(trainer: PipelineTrainer, optimizer: torch.optim.Optimizer, batches: list[Any]) -> dict[int, list[float]]:
    losses: dict[int, list[float]] = {}
    n = len(trainer.model.stages)
    window = {"loss_sum": torch.zeros(n, dtype=torch.float64), "samples": torch.zeros(n, dtype=torch.float64)}
    for x, y in trainer.iterate(batches if trainer.is_first else None):
        optimizer.zero_grad(set_to_none=True)
        out = trainer.step(x, y)
        optimizer.step()
        for key, value in out.dense(n).items():
            if key in window:
                window[key] += value
        for j, loss in out.losses.items():
            losses.setdefault(j, []).append(loss.item())
        if trainer.is_last:
            assert out.logits is not None and out.logits.shape == (BATCH, 10)
            assert out.target.shape == (BATCH,)
    # The logging recipe of the training loop: one all-reduce of the window's dense sums.
    for value in window.values():
        dist.all_reduce(value)
    losses["mean"] = (window["loss_sum"] / window["samples"]).tolist()  # type: ignore[index]
    losses["samples"] = window["samples"].tolist()  # type: ignore[index]
    return losses


def _snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "optim": copy.deepcopy(optimizer.state_dict()),
    }


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """References run with one thread, like the workers, so the kernels are the same."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _reference(method: str, data: list[list[Any]], start: dict[str, Any] | None = None):
    """Sequential engine; R replicas = R model copies whose gradients are averaged (DDP)."""
    with _one_thread():
        base = _build(method, SEED)
        if start is not None:
            base.load_state_dict(start["state"])
        replicas = [copy.deepcopy(base) for _ in data]
        optimizers = [_optimizer(m) for m in replicas]
        if start is not None:
            for opt in optimizers:
                opt.load_state_dict(start["optim"])
        losses: list[dict[int, list[float]]] = [{} for _ in data]
        for step in range(len(data[0])):
            for m, opt in zip(replicas, optimizers):
                opt.zero_grad(set_to_none=True)
            for r, (m, (x, y)) in enumerate(zip(replicas, [d[step] for d in data])):
                out = m.local_step(x, y)
                for j, loss in enumerate(out.losses):
                    losses[r].setdefault(j, []).append(loss.item())
            if len(replicas) > 1:
                with torch.no_grad():
                    for params in zip(*(m.parameters() for m in replicas)):
                        if params[0].grad is not None:
                            mean = sum(p.grad for p in params) / len(params)
                            for p in params:
                                p.grad.copy_(mean)
            for opt in optimizers:
                opt.step()
        return losses, [_snapshot(m, o) for m, o in zip(replicas, optimizers)]


def _merge_losses(results: list[dict[str, Any]], replica_of: list[int], replicas: int) -> list[dict[int, list[float]]]:
    merged: list[dict[int, list[float]]] = [{} for _ in range(replicas)]
    for result, r in zip(results, replica_of):
        for j, values in result["losses"].items():
            if isinstance(j, str):
                continue
            assert j not in merged[r], f"local stage {j} trained on two ranks of replica {r}"
            merged[r][j] = values
    return merged


def _assert_states_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    assert actual.keys() == expected.keys()
    worst = 0.0
    for name, value in expected.items():
        got = actual[name]
        if value.is_floating_point():
            worst = max(worst, (got - value).abs().max().item())
            torch.testing.assert_close(got, value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
        else:
            assert torch.equal(got, value), name
    return worst


def _assert_optim_close(actual: dict[str, Any], expected: dict[str, Any]) -> None:
    assert actual["state"].keys() == expected["state"].keys()
    for index, state in expected["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                torch.testing.assert_close(actual["state"][index][key], value, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Workers (module level: launch_local pickles them by reference)
# --------------------------------------------------------------------------------------------
def _worker(method: str, num_segments: int, steps: int, resume_cut: list[int] | None, resume_steps: int) -> dict[str, Any]:
    rank = dist.get_rank()
    model = _build(method, SEED + 1000 * rank)
    trainer = PipelineTrainer(model, num_segments, cost_measure="macs", input_size=(3, SIZE, SIZE), verbose=False)
    optimizer = _optimizer(model)
    data = _data(steps, trainer.num_replicas)[trainer.replica]
    result: dict[str, Any] = {"losses": _train(trainer, optimizer, data), "cut": trainer.cut,
                              "segment": trainer.segment, "replica": trainer.replica}
    trainer.consolidate(optimizer)
    result.update(_snapshot(model, optimizer))
    if resume_cut is not None:
        # Resume from the consolidated (sequential-format) checkpoint under another cut.
        segment_state = trainer.state_dict()
        model2 = _build(method, 7 + rank)
        model2.load_state_dict(result["state"])
        trainer2 = PipelineTrainer(model2, num_segments, cut=resume_cut, cost_measure="macs", verbose=False)
        optimizer2 = _optimizer(model2)
        optimizer2.load_state_dict(copy.deepcopy(result["optim"]))  # load_state_dict aliases tensors
        with pytest.raises(ValueError, match="same cut"):
            trainer2.load_state_dict(segment_state)
        trainer2.load_state_dict(trainer2.state_dict())  # round trip of a segment's own state
        more = _data(resume_steps, trainer2.num_replicas, offset=1)[trainer2.replica]
        result["resume_losses"] = _train(trainer2, optimizer2, more)
        result["resume_segment"] = trainer2.segment
        backbone = trainer2.gather_backbone()
        trainer2.consolidate(optimizer2)
        result["resume"] = _snapshot(model2, optimizer2)
        result["backbone_keys"] = sorted(backbone.state_dict())
    return result


def _nan_worker() -> None:
    model = _build("auglocal", SEED)
    trainer = PipelineTrainer(model, 2, cost_measure="macs", input_size=(3, SIZE, SIZE), verbose=False)
    x, y = _data(1, 1)[0][0]
    trainer.step(torch.full_like(x, float("nan")) if trainer.is_first else None, y if trainer.is_first else None)


def _nan_worker_slow_upstream() -> None:
    """The NaN batch again, with the first segment slow to report it (a loaded machine): the second segment,
    which receives the NaN activations, must still leave the report to it."""
    import time

    from timm_local.engine import pipeline

    check = pipeline.check_finite_losses

    def slow_check(*args: Any, **kwargs: Any) -> None:
        if dist.get_rank() == 0:
            time.sleep(2.0)
        check(*args, **kwargs)

    pipeline.check_finite_losses = slow_check
    _nan_worker()


def _check_run(results: list[dict[str, Any]], method: str, steps: int, replicas: int) -> float:
    data = _data(steps, replicas)
    ref_losses, ref_snaps = _reference(method, data)
    got = _merge_losses(results, [r["replica"] for r in results], replicas)
    for r in range(replicas):
        assert got[r].keys() == ref_losses[r].keys()
        for j in ref_losses[r]:
            assert got[r][j] == pytest.approx(ref_losses[r][j], rel=1e-5, abs=1e-6), f"replica {r}, local stage {j}"
    steps_done = len(data[0])
    for result in results:  # dense() sums, all-reduced: every stage's mean loss over all replicas
        assert result["losses"]["samples"] == [steps_done * BATCH * replicas] * len(ref_losses[0])
        expected = [sum(sum(ref[j]) for ref in ref_losses) / (steps_done * replicas) for j in sorted(ref_losses[0])]
        assert result["losses"]["mean"] == pytest.approx(expected, rel=1e-5)
    worst = 0.0
    for result in results:  # consolidation gives every rank replica 0's complete state
        worst = max(worst, _assert_states_close(result["state"], ref_snaps[0]["state"]))
        _assert_optim_close(result["optim"], ref_snaps[0]["optim"])
    return worst


# --------------------------------------------------------------------------------------------
# Tests without processes
# --------------------------------------------------------------------------------------------
def test_balanced_cut_is_optimal_against_brute_force() -> None:
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 9)
        costs = [rng.choice([0.0, rng.random(), rng.randint(1, 5)]) for _ in range(n)]
        for w in range(1, n + 1):
            starts = balanced_cut(costs, w)
            assert starts[0] == 0 and len(starts) == w and starts == sorted(set(starts))
            best = min(
                max(sum(costs[a:b]) for a, b in zip((0, *cuts), (*cuts, n)))
                for cuts in itertools.combinations(range(1, n), w - 1)
            )
            got = max(sum(costs[i] for i in r) for r in segment_ranges(starts, n))
            assert got == pytest.approx(best)


def test_balanced_cut_and_topology_errors() -> None:
    with pytest.raises(ValueError, match="at most 3 pipeline stages"):
        balanced_cut([1.0, 2.0, 3.0], 4)
    with pytest.raises(ValueError, match="not divisible by the number of pipeline stages W=2"):
        PipelineTopology.create(world_size=3, rank=0, num_segments=2)
    topo = PipelineTopology.create(world_size=4, rank=3, num_segments=2)
    assert (topo.segment, topo.replica, topo.num_replicas, topo.is_last, topo.prev_rank) == (1, 1, 2, True, 2)
    assert topo.replica_group_ranks(1) == [1, 3]


@pytest.mark.parametrize("measure", ["macs", "time"])
def test_stage_costs_include_heads_and_leave_the_model_untouched(measure: str) -> None:
    model = _build("auglocal", SEED)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with _one_thread():  # tiny kernels on a shared machine: one thread avoids OpenMP contention
        costs = local_stage_costs(model, (3, SIZE, SIZE), measure, batch_size=4, repeats=1)
    assert len(costs) == len(model.stages) and all(c > 0 for c in costs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN stats too
    assert all(p.grad is None for p in model.parameters())
    if measure == "macs":  # the auxiliary networks are counted: AugLocal d=3 costs well over BP
        bp = timm_local.create_local_model(MODEL, "bp", input_size=(3, SIZE, SIZE))
        with _one_thread():
            assert sum(costs) > 1.5 * sum(local_stage_costs(bp, (3, SIZE, SIZE)))


def test_invalid_cut_is_a_clear_error() -> None:
    from timm_local.engine.cut import validate_cut

    with pytest.raises(ValueError, match="needs 2 start indices"):
        validate_cut([0], 9, 2)
    with pytest.raises(ValueError, match="begin at 0, increase strictly"):
        validate_cut([0, 9], 9, 2)


def test_trainer_needs_a_process_group() -> None:
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="torchrun"):
        PipelineTrainer(_build("auglocal", SEED), 2)


# --------------------------------------------------------------------------------------------
# Distributed equivalence
# --------------------------------------------------------------------------------------------
@pytest.mark.timeout(300)
def test_pipeline_w2_equals_sequential_and_resumes_under_another_cut() -> None:
    steps, resume_steps, resume_cut = 3, 2, [0, 3]
    results = launch_local(_worker, 2, args=("auglocal", 2, steps, resume_cut, resume_steps), timeout_s=120)
    assert [r["segment"] for r in results] == [0, 1]
    assert results[0]["cut"] != resume_cut, "pick a resume cut different from the balanced one"
    worst = _check_run(results, "auglocal", steps, replicas=1)
    print(f"W=2 max |pipelined - sequential| weight diff: {worst:.3g}")

    # Continue the reference from its own state for resume_steps more batches.
    data = _data(steps, 1)
    _, ref_snaps = _reference("auglocal", data)
    more = _data(resume_steps, 1, offset=1)
    ref_losses, ref_resume = _reference("auglocal", more, start=ref_snaps[0])
    got = _merge_losses([{"losses": r["resume_losses"]} for r in results], [0, 0], 1)[0]
    for j in ref_losses[0]:
        assert got[j] == pytest.approx(ref_losses[0][j], rel=1e-5, abs=1e-6), f"resumed, local stage {j}"
    for result in results:
        _assert_states_close(result["resume"]["state"], ref_resume[0]["state"])
        _assert_optim_close(result["resume"]["optim"], ref_resume[0]["optim"])
    # The gathered backbone is the plain timm model (timm's keys, nothing of the heads).
    assert results[0]["backbone_keys"] == sorted(timm_local.create_local_model(MODEL, input_size=(3, SIZE, SIZE)).backbone.state_dict())


@pytest.mark.timeout(300)
@pytest.mark.parametrize("method", [RECON, "infopro"])
def test_pipeline_forwards_network_input_to_heads_that_need_it(method: str) -> None:
    if method not in timm_local.list_methods() + [RECON]:
        pytest.skip(f"method {method!r} is not registered")
    steps = 2
    results = launch_local(_worker, 2, args=(method, 2, steps, None, 0), timeout_s=120)
    _check_run(results, method, steps, replicas=1)
    assert RECON not in timm_local.list_methods()


@pytest.mark.timeout(300)
def test_data_parallel_w1_r2_equals_averaged_sequential_replicas() -> None:
    steps = 3
    results = launch_local(_worker, 2, args=("auglocal", 1, steps, None, 0), timeout_s=120)
    assert [(r["segment"], r["replica"]) for r in results] == [(0, 0), (0, 1)]
    _check_run(results, "auglocal", steps, replicas=2)


@pytest.mark.timeout(300)
def test_pipeline_w2_r2_equals_sequential() -> None:
    steps = 2
    results = launch_local(_worker, 4, args=("auglocal", 2, steps, None, 0), timeout_s=180)
    assert [(r["segment"], r["replica"]) for r in results] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    _check_run(results, "auglocal", steps, replicas=2)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("worker", [_nan_worker, _nan_worker_slow_upstream])
def test_non_finite_loss_stops_the_pipeline_with_a_clear_error(worker) -> None:
    with pytest.raises(Exception, match="FloatingPointError: local loss of the stage ending at block 'stem'"):
        launch_local(worker, 2, timeout_s=60)
