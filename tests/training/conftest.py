"""The stopped-and-resumed runs of the checkpoint tests: one definition, each module's own lengths.

A module sets ``STOP`` and ``FINAL`` (steps); ``straight`` trains ``FINAL`` steps and ``stopped`` the same run
for ``STOP`` steps, both with dropout (which draws from the RNG, so a resume that lost the RNG state shows)
and a checkpoint after every step. A module with other runs defines fixtures of the same names, which
take precedence.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import DROPOUT, trained


@pytest.fixture(scope="module")
def straight(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``FINAL`` steps without a stop: the reference."""
    return trained(tmp_path_factory, "straight", *DROPOUT, "--max-steps", request.module.FINAL)


@pytest.fixture(scope="module")
def stopped(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same run stopped after ``STOP`` steps (checkpoints step_1 .. step_STOP)."""
    return trained(tmp_path_factory, "stopped", *DROPOUT, "--max-steps", request.module.STOP)
