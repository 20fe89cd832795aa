"""A run folder written by every earlier version of the run format resumes exactly.

One fixture per run-format version (``make_resume_fixture.FIXTURES``: version 1 in
``tests/fixtures/resume_from_earlier_version``, Accelerate's pickle files; version 2 in
``tests/fixtures/run_format_v2``, safetensors), each written by ``tests/fixtures/make_resume_fixture.py``
with the code of its version and stopped after 2 of 4 steps; resumed by today's code (which migrates it to
the current version first) it must reach the weights and optimizer state that the writing version reached in
one uninterrupted run.

Why two strengths of "the same": float results depend on the CPU's kernels (oneDNN picks them by
instruction set), so the writer's machine and this one can differ in the last bit of every step, whatever
the code. Where this machine reproduces the writer's first two steps bit for bit, the resumed run must
equal the writer's run bit for bit. Elsewhere it must agree to within float rounding; anything resume
could lose (a momentum buffer, the RNG, the schedule, the data position) moves weights by orders of
magnitude more than that.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.helpers import ROOT, load_module, resume_fixture as fixture, train_tool

#: Float rounding over two steps on 8x8 digits: measured here at under a tenth of this bound, while one lost
#: step breaks it by a factor of ~10^4.
ROUNDING = dict(rtol=1e-4, atol=1e-5)


def _latest(run: Path) -> Path:
    return sorted((run / "checkpoints").glob("step_*"))[-1]


@pytest.fixture(scope="module")
def stopped_here(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The model state today's code on this machine reaches at the fixtures' stop step."""
    from timm_local.training.checkpoint import load_state

    run = tmp_path_factory.mktemp("straight") / "run"
    assert train_tool.main([*fixture.FLAGS, "--max-steps", str(fixture.STOP_STEP), "--output-dir", str(run)]) == 0
    return load_state(_latest(run), "model")


def same_arithmetic_as_writer(folder: Path, ours: dict[str, torch.Tensor]) -> bool:
    """Whether today's code on this machine reproduces the writer's stopped checkpoint bit for bit."""
    from timm_local.training.checkpoint import load_state

    theirs = load_state(_latest(folder), "model")
    assert ours.keys() == theirs.keys()
    return all(torch.equal(ours[k], theirs[k]) for k in theirs)


@pytest.mark.parametrize("version", sorted(fixture.FIXTURES))
def test_earlier_checkpoint_resumes_exactly(tmp_path: Path, stopped_here: dict[str, torch.Tensor],
                                            version: int) -> None:
    folder = fixture.FIXTURES[version]
    bitwise = same_arithmetic_as_writer(folder, stopped_here)
    run = tmp_path / "run"
    shutil.copytree(folder, run, ignore=shutil.ignore_patterns("expected_final.safetensors"))
    assert train_tool.main([*fixture.FLAGS, "--resume", "auto", "--max-steps", str(fixture.FINAL_STEP),
                            "--output-dir", str(run)]) == 0
    assert _latest(run).name == f"step_{fixture.FINAL_STEP:08d}"
    expected = load_file(str(folder / "expected_final.safetensors"))
    got = fixture.final_state(run)
    assert got.keys() == expected.keys()
    if bitwise:
        different = [k for k in expected if not torch.equal(got[k], expected[k])]
        assert not different, f"{len(different)} tensors differ from the earlier version's run, e.g. {different[:3]}"
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], **ROUNDING, msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.parametrize("version", sorted(fixture.FIXTURES))
def test_migrate_brings_a_fixture_to_the_current_version_once(tmp_path: Path, version: int, caplog) -> None:
    from timm_local.format_version import FORMAT_VERSION
    from timm_local.training.checkpoint import load_state, verify_checkpoint
    from timm_local.training.run_format import DUPLICATED_KEYS, migrate

    run = tmp_path / "run"
    shutil.copytree(fixture.FIXTURES[version], run, ignore=shutil.ignore_patterns("expected_final.safetensors"))
    ckpt = _latest(run)
    before = {name: load_state(ckpt, name) for name in ("model", "optimizer")}
    assert migrate(run) == [ckpt]
    assert migrate(run) == []  # once: a current folder is left as it is
    lines = [r.getMessage() for r in caplog.records if "migrated checkpoint" in r.getMessage()]
    assert len(lines) == 1 and f"version {version} to {FORMAT_VERSION}" in lines[0]
    meta = verify_checkpoint(ckpt)
    assert meta["format_version"] == FORMAT_VERSION and not set(DUPLICATED_KEYS) & set(meta)
    assert {k: meta["config"][k] for k in ("batch_size", "epochs", "lr", "dataset", "aux_depth", "tau")} == \
        {"batch_size": 8, "epochs": 1, "lr": 0.05, "dataset": "digits", "aux_depth": 2, "tau": 0.5}
    assert meta["verified_finite"] is True
    assert not [p.name for p in ckpt.iterdir() if not p.name.endswith((".safetensors", ".json"))]
    assert all(torch.equal(before["model"][k], v) for k, v in load_state(ckpt, "model").items())
    assert before["optimizer"]["param_groups"] == load_state(ckpt, "optimizer")["param_groups"]
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["format_version"] == FORMAT_VERSION and config["history"][0]["event"] == "start"


@pytest.mark.parametrize("where", ["checkpoint", "config"])
def test_a_newer_run_format_is_refused_naming_the_upgrade(tmp_path: Path, where: str, capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(fixture.FIXTURES[max(fixture.FIXTURES)], run,
                    ignore=shutil.ignore_patterns("expected_final.safetensors"))
    if where == "checkpoint":
        path = _latest(run) / "checkpoint_meta.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "format_version": 99}))
    else:
        path = run / "config.yaml"
        path.write_text(yaml.safe_dump({"format_version": 99, **yaml.safe_load(path.read_text())}))
    written = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    assert train_tool.main(["--output-dir", str(run), "--resume", "auto"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and str(path) in lines[0] and "newer timm_local (run format 99" in lines[0], lines
    assert "upgrade timm_local" in lines[0]
    assert {p: p.stat().st_mtime_ns for p in written} == written  # nothing of the run was touched


def test_export_metadata_is_versioned_and_older_exports_read_alike(tmp_path: Path) -> None:
    import timm

    from timm_local.export import export_backbone, read_export_metadata
    from timm_local.format_version import FORMAT_VERSION, RunFormatError

    model = timm.create_model("resnet20_cifar", num_classes=10, channels=[4, 8, 16])
    data = dict(input_size=(3, 8, 8), mean=(0.5,) * 3, std=(0.5,) * 3)
    new = {"format_version": FORMAT_VERSION, "method": "auglocal", "method_config": {"aux_depth": 2, "tau": 0.5}}
    old = {"method": "auglocal", "method_config": {"aux_depth": 2, "tau": 0.5}, "aux_depth": 2, "tau": 0.5}
    for name, meta in (("new", new), ("old", old)):
        export_backbone(model, tmp_path / name, data_config=data, metadata=meta)
    assert "aux_depth" not in json.loads((tmp_path / "new" / "config.json").read_text())["timm_local"]
    assert read_export_metadata(tmp_path / "new") == {**read_export_metadata(tmp_path / "old"),
                                                      "format_version": FORMAT_VERSION}
    export_backbone(model, tmp_path / "newer", data_config=data, metadata={**new, "format_version": 99})
    with pytest.raises(RunFormatError, match="newer timm_local .*upgrade"):
        read_export_metadata(tmp_path / "newer")


@pytest.mark.parametrize("version", sorted(fixture.FIXTURES))
def test_resuming_another_runs_older_folder_reads_it_without_changing_it(tmp_path: Path, version: int) -> None:
    """``--resume PATH`` of another run folder reads its older version in memory; only this run's own folder
    is migrated."""
    source = tmp_path / "source"
    shutil.copytree(fixture.FIXTURES[version], source, ignore=shutil.ignore_patterns("expected_final.safetensors"))
    before = {p: p.read_bytes() for p in source.rglob("*") if p.is_file()}
    out = tmp_path / "continued"
    assert train_tool.main([*fixture.FLAGS, "--resume", str(_latest(source)), "--max-steps",
                            str(fixture.FINAL_STEP), "--output-dir", str(out)]) == 0
    assert {p: p.read_bytes() for p in source.rglob("*") if p.is_file() and p.name != ".timm_local.lock"} == before
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["format_version"] == 3 and [e["event"] for e in config["history"]] == ["start", "resume"]
    assert json.loads((_latest(out) / "checkpoint_meta.json").read_text())["format_version"] == 3
    assert _latest(out).name == f"step_{fixture.FINAL_STEP:08d}"


@pytest.mark.parametrize("version", sorted(fixture.FIXTURES))
def test_an_older_run_folder_exports_without_being_changed(tmp_path: Path, version: int) -> None:
    from timm_local.export import read_export_metadata

    export_tool = load_module("_export_tool", ROOT / "tools" / "export.py")
    source = tmp_path / "source"
    shutil.copytree(fixture.FIXTURES[version], source, ignore=shutil.ignore_patterns("expected_final.safetensors"))
    before = {p: p.read_bytes() for p in source.rglob("*") if p.is_file()}
    assert export_tool.main([str(source), "--out", str(tmp_path / "export")]) == 0
    assert {p: p.read_bytes() for p in source.rglob("*") if p.is_file()} == before
    stored = json.loads((tmp_path / "export" / "config.json").read_text())["timm_local"]
    assert stored["format_version"] == 3 and stored["method_config"] == {"aux_depth": 2, "tau": 0.5}
    assert "aux_depth" not in stored and read_export_metadata(tmp_path / "export")["aux_depth"] == 2
