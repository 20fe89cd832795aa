"""Beyond one machine: launch checks, and two "nodes" on this machine (two torchrun agents on 127.0.0.1,
one process each, c10d rendezvous, gloo) running tools/train.py.

Fast: the launch checks (every process arrived, the run folder is shared, one GPU per NCCL process) in
real gloo process groups. Slow (each two-node launch starts two interpreters with torch and timm):
(a) data parallel over the two nodes == one process on the full batch; (b) the pipeline W=2 across the
nodes == the sequential engine, bitwise; (c) one node's process killed mid-run, both relaunched with
``--resume auto`` == the uninterrupted run, bitwise; the same two-node run through ``accelerate launch
--num_machines 2``; a node without the data named by the other; and a hung node stopping the other at
``--collective-timeout`` instead of hanging.
Tiny on purpose (2 CPU cores shared): resnet20_cifar at 8x8 pixels, 16 training images, batch 8.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
import yaml
from accelerate.utils import set_seed
from safetensors.torch import load_file

import timm_local

from timm_local.distributed import (RanksMissingError, RollCall, SharedFolderError, check_gpus_per_node,
                                    missing_ranks)
from timm_local.engine import launch_local
from timm_local.engine.launch import free_port
from timm_local.training import latest_checkpoint, list_checkpoints, read_metrics

BIN = Path(sys.executable).parent

from tests.helpers import PIPELINE, ROOT, TINY_RESNET, different_tensors, model_state, subprocess_env, train_tool

#: What every two-node run trains: 2 epochs of 2 steps, BatchNorm on running statistics (--freeze-bn), so
#: that a 2 x 4-image data-parallel update is comparable with the 8-image one of a single process.
RECIPE = ["--epochs", "2", "--freeze-bn", "--checkpoint-every-steps", "1"]


#: The late-rank check: rank 0 waits LATE_TIMEOUT_S at a barrier that rank 1 reaches LATE_ARRIVAL_S late;
#: the 3 s between them is the room either process has to be slowed down by a busy machine.
LATE_TIMEOUT_S, LATE_ARRIVAL_S = 1.0, 4.0


# ------------------------------------------------------------------------------------------------
# launch checks in real process groups (fast)
# ------------------------------------------------------------------------------------------------
def _launch_checks(shared: str, own: list[str]) -> dict[str, Any]:
    """Every check of a roll call on this rank; the errors are returned as text for the test to read."""
    import torch.distributed as dist

    rank = dist.get_rank()
    out: dict[str, Any] = {}
    roll = RollCall.take(timeout_s=30)
    out["processes"] = roll.processes
    roll.check_shared_folder(Path(shared))
    out["left_behind"] = sorted(p.name for p in Path(shared).iterdir())
    try:
        roll.check_shared_folder(Path(own[rank]), wait_s=0.5)  # every rank its own folder: not shared
    except SharedFolderError as e:
        out["not_shared"] = str(e)
    late = RollCall(timeout=timedelta(seconds=LATE_TIMEOUT_S), processes=roll.processes)
    if rank == 1:
        time.sleep(LATE_ARRIVAL_S)  # arrives after rank 0 gave up: rank 0 must name it
    try:
        late.barrier("the test's barrier")
    except RanksMissingError as e:
        out["late"] = str(e)
    return out


@pytest.fixture(scope="module")
def checks(tmp_path_factory) -> list[dict[str, Any]]:
    root = tmp_path_factory.mktemp("checks")
    own = [root / "node0", root / "node1"]
    for folder in [root / "shared", *own]:
        folder.mkdir()
    return launch_local(_launch_checks, 2, args=(str(root / "shared"), [str(p) for p in own]), timeout_s=60)


def test_roll_call_knows_every_process(checks):
    ranks = checks[0]["processes"]
    assert ranks == checks[1]["processes"] and len(ranks) == 2
    assert "local rank 0" in ranks[0] and "local rank 1" in ranks[1]
    assert ranks[0].split(", pid ")[1] != ranks[1].split(", pid ")[1]
    assert ranks[0].startswith("host ")


def test_shared_folder_check_passes_and_leaves_nothing(checks):
    assert checks[0]["left_behind"] == [] and checks[1]["left_behind"] == []


def test_unshared_folder_is_named_with_the_processes_that_cannot_see_it(checks):
    for result in checks:  # every process stops with the same message
        msg = result["not_shared"]
        assert "is not shared" in msg and "node0" in msg and "--output-dir" in msg
        assert f"rank 1 on {checks[0]['processes'][1]} cannot see" in msg  # the blind process, host and pid
        assert "rank 0" not in msg.split("cannot see")[0]  # the main process sees its own folder


def test_late_process_is_named_by_the_main_process(checks):
    first, second = checks[0]["late"], checks[1]["late"]
    late_rank = checks[0]["processes"][1]
    assert first.startswith(f"rank 1 on {late_rank} did not reach the test's barrier within {LATE_TIMEOUT_S:g} s")
    assert "--collective-timeout" in first
    assert second.startswith("rank 1 on host ") and "rank 0's log names the absent ones" in second


def test_missing_ranks_reads_torch_monitored_barrier_message():
    assert missing_ranks("[Rank 0]: Ranks 1, 3 failed to pass monitoredBarrier in 1500 ms") == [1, 3]
    assert missing_ranks("[Rank 0]: Rank 2 failed to pass monitoredBarrier in 10 ms") == [2]
    assert missing_ranks("Connection closed by peer") == []


def test_more_processes_than_gpus_is_refused_with_the_launch_to_use():
    check_gpus_per_node(4, 4)
    with pytest.raises(ValueError, match=r"4 processes .* 2 GPU\(s\).*--nproc-per-node 2.*--cpu"):
        check_gpus_per_node(4, 2)


def test_collective_timeout_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="--collective-timeout must be a positive number of seconds, got 0"):
        train_tool.main([*TINY_RESNET, "--collective-timeout", "0", "--output-dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------
# two nodes on this machine (slow)
# ------------------------------------------------------------------------------------------------
def torchrun_node(port: int, log: Path, *args: str) -> subprocess.Popen:
    """One "node": a torchrun agent with one process, joining the c10d rendezvous at 127.0.0.1:port."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"test{port}",
           str(ROOT / "tools" / "train.py"), *TINY_RESNET, *args]
    return subprocess.Popen(cmd, env=subprocess_env(), stdout=log.open("w"), stderr=subprocess.STDOUT)


def accelerate_node(rank: int, port: int, log: Path, *args: str) -> subprocess.Popen:
    """One "machine" of ``accelerate launch --num_machines 2`` (2 processes in all, one per machine)."""
    cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_machines", "2", "--num_processes", "2",
           "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
           "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "tools" / "train.py"), *TINY_RESNET, *args]
    return subprocess.Popen(cmd, env=subprocess_env(), stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_all(nodes: list[subprocess.Popen], timeout: float = 600) -> list[int]:
    deadline = time.time() + timeout
    try:
        return [node.wait(timeout=max(1.0, deadline - time.time())) for node in nodes]
    finally:
        for node in nodes:
            stop_tree(node, signal.SIGKILL)


def stop_tree(node: subprocess.Popen, sig: int) -> None:
    """Send ``sig`` to a node's agent and its training process (what a lost machine looks like)."""
    if node.poll() is not None:
        return
    for proc in [*psutil.Process(node.pid).children(recursive=True), psutil.Process(node.pid)]:
        try:
            proc.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def wait_for_a_checkpoint(out: Path, nodes: list[subprocess.Popen], timeout: float = 300) -> None:
    """Until the run's first checkpoint lands (then a fault hits it mid-run, with something to resume)."""
    deadline = time.time() + timeout
    while time.time() < deadline and not list_checkpoints(out) and all(n.poll() is None for n in nodes):
        time.sleep(0.05)
    assert list_checkpoints(out), "no checkpoint before the fault"


def two_nodes(out: Path, *args: str, launcher: str = "torchrun") -> tuple[list[int], list[str], float]:
    """Run tools/train.py on two "nodes"; their return codes, logs and the wall time."""
    port = free_port()
    logs = [out.with_name(f"{out.name}.node{n}.log") for n in range(2)]
    start = time.time()
    if launcher == "torchrun":
        nodes = [torchrun_node(port, logs[n], *args, "--output-dir", str(out)) for n in range(2)]
    else:
        nodes = [accelerate_node(n, port, logs[n], *args, "--output-dir", str(out)) for n in range(2)]
    codes = wait_all(nodes)
    return codes, [log.read_text() for log in logs], time.time() - start


def final_state(run: Path) -> dict[str, torch.Tensor]:
    """The model state of a run's newest checkpoint."""
    return model_state(latest_checkpoint(run))


def initial_weights() -> dict[str, torch.Tensor]:
    """The weights every TINY_RESNET run starts from: the model built from seed 0, as tools/train.py builds it."""
    set_seed(0)
    return timm_local.create_local_model("resnet20_cifar", method="auglocal", num_classes=10,
                                         input_size=(3, 8, 8)).state_dict()


def assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    different = different_tensors(a, b)
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def data_args(cifar) -> list[str]:
    return ["--dataset", "cifar10", "--data-dir", str(cifar)]


@pytest.fixture(scope="module")
def two_node_dp(data_args, tmp_path_factory) -> tuple[Path, list[str]]:
    """The sequential engine, data parallel over the two nodes (4 images per process and step)."""
    out = tmp_path_factory.mktemp("dp") / "run"
    codes, logs, _ = two_nodes(out, *data_args, *RECIPE)
    assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
    return out, logs


@pytest.fixture(scope="module")
def one_process(data_args, tmp_path_factory) -> Path:
    """The reference: one process (this one) on the full 8-image batch, same recipe."""
    out = tmp_path_factory.mktemp("one") / "run"
    assert train_tool.main([*TINY_RESNET, *data_args, *RECIPE, "--output-dir", str(out)]) == 0
    return out


@pytest.mark.slow
def test_data_parallel_over_two_nodes_equals_one_process_on_the_full_batch(two_node_dp, one_process):
    out, logs = two_node_dp
    runtime = yaml.safe_load((out / "config.yaml").read_text())["runtime"]
    assert runtime["num_processes"] == 2 and runtime["per_process_batch"] == 4  # the loader shards over both
    one, two, init = final_state(one_process), final_state(out), initial_weights()
    floats = [k for k in one if one[k].is_floating_point()]
    assert max((two[k] - init[k]).abs().max().item() for k in floats) > 1e-3, "did not train: a vacuous comparison"
    for k in floats:  # the same update as one process on the whole batch, up to summation order
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    # the global main process alone shows progress and writes the run's records
    assert sum("resnet20_cifar/auglocal:" in log for log in logs) == 1
    assert sum("done: top1" in log for log in logs) == 1
    steps = [r["step"] for r in read_metrics(out) if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4]


@pytest.mark.slow
def test_pipeline_across_two_nodes_equals_the_sequential_engine_bitwise(data_args, tmp_path):
    seq, pipe = tmp_path / "seq", tmp_path / "pipe"
    assert train_tool.main([*TINY_RESNET, *data_args, *RECIPE, "--output-dir", str(seq)]) == 0
    codes, logs, _ = two_nodes(pipe, *data_args, *RECIPE, *PIPELINE)
    assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
    runtime = yaml.safe_load((pipe / "config.yaml").read_text())["runtime"]
    assert runtime["pipeline"]["segments"] == 2 and runtime["pipeline"]["replicas"] == 1
    assert_bitwise(final_state(seq), final_state(pipe))
    assert_bitwise(load_file(str(seq / "export" / "model.safetensors")),
                   load_file(str(pipe / "export" / "model.safetensors")))


@pytest.mark.slow
def test_node_killed_mid_run_then_both_relaunched_resume(data_args, two_node_dp, tmp_path):
    """SIGKILL one node's training process after the first checkpoint; the other node must stop too (not
    hang); relaunching both with --resume auto ends with the uninterrupted two-node run's weights."""
    out, port = tmp_path / "run", free_port()
    logs = [tmp_path / f"node{n}.log" for n in range(2)]
    nodes = [torchrun_node(port, logs[n], *data_args, *RECIPE, "--output-dir", str(out)) for n in range(2)]
    wait_for_a_checkpoint(out, nodes)
    victim = psutil.Process(nodes[1].pid).children(recursive=True)
    assert victim, "no training process to kill"
    for proc in victim:
        proc.kill()
    codes = wait_all(nodes, timeout=120)  # the surviving node notices the lost peer and stops
    assert all(code != 0 for code in codes), codes
    stopped_at = int(latest_checkpoint(out).name.split("_")[1])
    assert stopped_at < 4, "the run finished before the kill; nothing to resume"

    codes, texts, _ = two_nodes(out, *data_args, *RECIPE, "--resume", "auto")
    assert codes == [0, 0], "\n".join(t[-3000:] for t in texts)
    assert all("resumed from" in t for t in texts), "both nodes must resume from the shared checkpoint"
    assert_bitwise(final_state(two_node_dp[0]), final_state(out))
    steps = [r["step"] for r in read_metrics(out) if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4]


@pytest.mark.slow
def test_sigterm_to_one_node_stops_both_at_one_step_then_both_resume(data_args, two_node_dp, tmp_path):
    """SIGTERM to one node's training process only (what a cluster sends before preempting a machine): the
    processes agree to stop at the same step, with a verified checkpoint and every process saying so; both
    relaunched with --resume auto end with the uninterrupted two-node run's weights."""
    out, port = tmp_path / "run", free_port()
    logs = [tmp_path / f"node{n}.log" for n in range(2)]
    nodes = [torchrun_node(port, logs[n], *data_args, *RECIPE, "--output-dir", str(out)) for n in range(2)]
    wait_for_a_checkpoint(out, nodes)
    for proc in psutil.Process(nodes[1].pid).children(recursive=True):
        proc.send_signal(signal.SIGTERM)
    codes = wait_all(nodes, timeout=120)
    texts = [log.read_text() for log in logs]
    stopped_at = int(latest_checkpoint(out).name.split("_")[1])
    assert stopped_at < 4, "the run finished before the signal; nothing to resume"
    assert all("preempted by" in t and f"at step {stopped_at}:" in t for t in texts), [t[-2000:] for t in texts]
    assert all(code != 0 for code in codes), codes  # torchrun reports its workers' exit code 75 as a failure

    codes, texts, _ = two_nodes(out, *data_args, *RECIPE, "--resume", "auto")
    assert codes == [0, 0], "\n".join(t[-3000:] for t in texts)
    assert_bitwise(final_state(two_node_dp[0]), final_state(out))


@pytest.mark.slow
def test_accelerate_launch_on_two_machines_equals_torchrun(data_args, two_node_dp, tmp_path):
    out = tmp_path / "run"
    codes, logs, _ = two_nodes(out, *data_args, *RECIPE, launcher="accelerate")
    assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
    assert yaml.safe_load((out / "config.yaml").read_text())["runtime"]["num_processes"] == 2
    assert_bitwise(final_state(two_node_dp[0]), final_state(out))


@pytest.mark.slow
def test_node_without_the_data_is_named_by_the_others(data_args, tmp_path):
    """One node's --data-dir holds no dataset: that node stops with the dataset error, the other at the
    end-of-set-up check with a RanksMissingError naming the absent process, instead of a hang."""
    out, port = tmp_path / "run", free_port()
    logs = [tmp_path / f"node{n}.log" for n in range(2)]
    flags = [data_args, ["--dataset", "cifar10", "--data-dir", str(tmp_path / "missing")]]
    nodes = [torchrun_node(port, logs[n], *flags[n], *RECIPE, "--output-dir", str(out)) for n in range(2)]
    codes = wait_all(nodes, timeout=300)
    healthy, broken = (log.read_text() for log in logs)
    assert codes[0] != 0 and codes[1] != 0
    assert "error:" in broken and "cifar10" in broken
    assert "RanksMissingError" in healthy and "the end of set-up (datasets read, model built)" in healthy
    assert "did not reach" in healthy or "did not confirm" in healthy  # as rank 0, or as a rank waiting on it
    assert not list_checkpoints(out)


def wait_until_exited(processes: list, timeout: float) -> list:
    """The processes still running after up to ``timeout`` s. An exited process whose parent (a torchrun agent
    blocked on the frozen node's store) has not reaped it yet is a zombie: it has exited, so it counts as gone."""
    deadline = time.time() + timeout
    while True:
        alive = []
        for p in processes:
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.time() > deadline:
            return alive
        time.sleep(0.2)


@pytest.mark.slow
def test_hung_node_stops_the_other_at_the_collective_timeout(data_args, tmp_path):
    """SIGSTOP one node mid-run (a hang, not a crash): the other node's training process stops with an error
    after --collective-timeout instead of waiting forever. (Its torchrun agent may then wait on the frozen
    node's rendezvous store; that is the launcher's business, so the test watches the training process.)"""
    out, port, timeout = tmp_path / "run", free_port(), 15
    logs = [tmp_path / f"node{n}.log" for n in range(2)]
    args = [*data_args, *RECIPE, "--collective-timeout", str(timeout), "--output-dir", str(out)]
    nodes = [torchrun_node(port, logs[n], *args) for n in range(2)]
    try:
        wait_for_a_checkpoint(out, nodes)
        survivor = psutil.Process(nodes[0].pid).children(recursive=True)
        stop_tree(nodes[1], signal.SIGSTOP)
        stopped = time.time()
        alive = wait_until_exited(survivor, timeout + 60)
        waited = time.time() - stopped
    finally:
        for node in nodes:
            stop_tree(node, signal.SIGKILL)
        wait_all(nodes, timeout=60)
    assert survivor and not alive, f"the surviving node's training process still waits: {[(p.pid, p.name()) for p in alive]} of {[(p.pid, p.name()) for p in survivor]}"
    assert timeout - 1 <= waited <= timeout + 60, waited
    assert f"Timed out waiting {timeout * 1000}ms" in logs[0].read_text()
