"""Test-session policy and data shared by every test module."""
from pathlib import Path

import pytest
import torch

from tests.helpers import write_cifar10


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """The tests' tensors are tiny: intra-op threads gain nothing, and on a shared 2-core machine
    their spin-waiting makes steps several times (up to ~50x) slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; reset them (as accelerate's own test cases do) so
    that in-process runs never inherit, or leak to other tests, settings such as mixed precision."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(scope="session")
def cifar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny CIFAR-10 in torchvision's layout (16 train / 8 test images), written once per session: the
    training tests only read it."""
    root = tmp_path_factory.mktemp("data") / "cifar"
    write_cifar10(root, n_train=16, n_test=8)
    return root
