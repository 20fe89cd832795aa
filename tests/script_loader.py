"""Import scripts (tools/*.py, benchmarks/*.py) and fixture files that are not in a package."""
import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def load_module(name: str, path: Path) -> ModuleType:
    """Import a script (tools/*.py, benchmarks/*.py) or fixture file that is not in a package."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the script runs
    spec.loader.exec_module(module)
    return module
