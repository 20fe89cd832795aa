"""A checkpoint written by an earlier version of the training loop resumes exactly.

The fixture (``tests/fixtures/resume_from_earlier_version``, written by
``tests/fixtures/make_resume_fixture.py`` with the pickle-era checkpoint format) was stopped after 2 of 4
steps; resumed by today's code it must reach the weights and optimizer state that the writing version
reached in one uninterrupted run.

Why two strengths of "the same": float results depend on the CPU's kernels (oneDNN picks them by
instruction set), so the writer's machine and this one can differ in the last bit of every step, whatever
the code. Where this machine reproduces the writer's first two steps bit for bit, the resumed run must
equal the writer's run bit for bit. Elsewhere it must agree to within float rounding; anything resume
could lose (a momentum buffer, the RNG, the schedule, the data position) moves weights by orders of
magnitude more than that.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from timm_local.training.checkpoint import load_model_state

from tests.helpers import resume_fixture as fixture, train_tool


#: Float rounding over two steps on 8x8 digits: measured here at under a tenth of this bound, while one lost
#: step breaks it by a factor of ~10^4.
ROUNDING = dict(rtol=1e-4, atol=1e-5)


def _latest(run: Path) -> Path:
    return sorted((run / "checkpoints").glob("step_*"))[-1]


@pytest.fixture(scope="module")
def same_arithmetic_as_writer(tmp_path_factory: pytest.TempPathFactory) -> bool:
    """Whether today's code on this machine reproduces the writer's stopped checkpoint bit for bit."""
    run = tmp_path_factory.mktemp("straight") / "run"
    assert train_tool.main([*fixture.FLAGS, "--max-steps", str(fixture.STOP_STEP), "--output-dir", str(run)]) == 0
    ours = load_model_state(_latest(run))
    theirs = load_model_state(_latest(fixture.FIXTURE))  # the project's reader of the pickle-era format
    assert ours.keys() == theirs.keys()
    return all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_a_checkpoint_of_the_pickle_era_format_resumes_to_the_writers_weights(tmp_path: Path,
                                                                             same_arithmetic_as_writer: bool) -> None:
    run = tmp_path / "run"
    shutil.copytree(fixture.FIXTURE, run, ignore=shutil.ignore_patterns("expected_final.safetensors"))
    assert train_tool.main([*fixture.FLAGS, "--resume", "auto", "--max-steps", str(fixture.FINAL_STEP),
                            "--output-dir", str(run)]) == 0
    assert _latest(run).name == f"step_{fixture.FINAL_STEP:08d}"
    expected = load_file(str(fixture.FIXTURE / "expected_final.safetensors"))
    got = fixture.final_state(run)
    assert got.keys() == expected.keys()
    if same_arithmetic_as_writer:
        different = [k for k in expected if not torch.equal(got[k], expected[k])]
        assert not different, f"{len(different)} tensors differ from the earlier version's run, e.g. {different[:3]}"
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], **ROUNDING, msg=lambda m, key=key: f"{key}: {m}")
