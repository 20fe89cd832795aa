"""A checkpoint written by an earlier version of the training loop resumes bit for bit.

The fixture (``tests/fixtures/resume_from_earlier_version``, written by
``tests/fixtures/make_resume_fixture.py`` before the loop was restructured) was stopped after 2 of 4
steps; resumed by today's code it must reach exactly the weights and optimizer state that the writing
version reached in one uninterrupted run.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from script_loader import load_module

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
fixture = load_module("_resume_fixture", HERE / "fixtures" / "make_resume_fixture.py")
train_tool = load_module("_train_tool", ROOT / "tools" / "train.py")


def test_earlier_checkpoint_resumes_bitwise(tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(fixture.FIXTURE, run, ignore=shutil.ignore_patterns("expected_final.safetensors"))
    assert train_tool.main([*fixture.FLAGS, "--resume", "auto", "--max-steps", str(fixture.FINAL_STEP),
                            "--output-dir", str(run)]) == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir())[-1] == f"step_{fixture.FINAL_STEP:08d}"
    expected = load_file(str(fixture.FIXTURE / "expected_final.safetensors"))
    got = fixture.final_state(run)
    assert got.keys() == expected.keys()
    different = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert not different, f"{len(different)} tensors differ from the earlier version's run, e.g. {different[:3]}"
