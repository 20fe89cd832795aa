"""One base for the errors a user can fix: every one the library raises derives from
:class:`timm_local.errors.UserError` (and keeps its builtin base, so ``except ValueError`` still works),
and the command line reports each as one line with exit code 2."""
from __future__ import annotations

import pytest

from timm_local.cli import UsageError, command_line_errors, handle_errors, library_errors
from timm_local.config import ConfigError
from timm_local.data import CorruptImageError, DatasetNotFoundError
from timm_local.errors import UserError
from timm_local.families import UnsupportedModelError
from timm_local.training import CheckpointError, CheckpointMismatchError
from timm_local.training.errors import CheckpointWriteError, UnsafePickleError
from timm_local.training.lock import RunFolderLocked

#: (class, the builtin base callers may still catch it by)
USER_ERRORS = [
    (UsageError, ValueError), (ConfigError, ValueError), (DatasetNotFoundError, FileNotFoundError),
    (CorruptImageError, ValueError), (CheckpointError, ValueError), (UnsafePickleError, ValueError),
    (CheckpointWriteError, ValueError), (CheckpointMismatchError, ValueError), (RunFolderLocked, FileExistsError),
    (UnsupportedModelError, NotImplementedError),
]
try:  # the detectron2 plug-in needs detectron2, which not every environment has
    import det

    USER_ERRORS += [(det.DetectionDataMissingError, FileNotFoundError), (det.WeightsMismatchError, RuntimeError)]
except ImportError:
    pass


@pytest.mark.parametrize("cls, builtin", USER_ERRORS, ids=[c.__name__ for c, _ in USER_ERRORS])
def test_each_user_error_is_one_line_and_exit_code_2(cls: type, builtin: type, capsys) -> None:
    assert issubclass(cls, UserError) and issubclass(cls, builtin)

    def fails(_: object) -> None:
        raise cls("the flag is wrong\n  pass --that instead")

    for codes in (command_line_errors(), [(c, 2) for c in library_errors()]):
        assert handle_errors(fails, [], codes) == 2
        assert capsys.readouterr().err == "error: the flag is wrong pass --that instead\n"


def test_a_bug_is_not_a_user_error() -> None:
    def fails(_: object) -> None:
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        handle_errors(fails, [], command_line_errors())
