"""Every shell command in README.md, docs/ and the tools' --help texts refers to what exists.

A command is checked the way it would fail for a user: the script it runs exists, every ``--flag`` it
passes is one the script (or ``accelerate launch`` / ``torchrun`` before it) accepts, every repository
path it names exists, and every ``make`` target is in the Makefile. The cheap ones (``--help``, MAC
counts) are run as well.
"""
from __future__ import annotations

import argparse
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from tests.helpers import ROOT, load_module

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SCRIPTS = [p for p in [*sorted((ROOT / "tools").glob("*.py")), *sorted((ROOT / "benchmarks").glob("*.py"))]
           if 'if __name__ == "__main__"' in p.read_text()]  # scripts, not the helpers they import
REPO_DIRS = ("configs", "docs", "tools", "benchmarks", "det", "timm_local", "tests")
LAUNCHERS = ("python", "accelerate", "torchrun", "make", ".venv/bin/python", "bash")


@dataclass(frozen=True)
class Command:
    where: str  # file:line, for the failure message
    text: str

    @property
    def tokens(self) -> list[str]:
        return shlex.split(self.text, comments=True)


def _joined(lines: list[str]) -> Iterator[tuple[int, str]]:
    """Lines with backslash continuations joined, with the number of their first line."""
    buffer, start = "", 0
    for i, line in enumerate(lines, start=1):
        if not buffer:
            start = i
        stripped = line.rstrip()
        if stripped.endswith("\\\\"):  # a docstring's escaped backslash
            stripped = stripped[:-1]
        if stripped.endswith("\\"):
            buffer += stripped[:-1] + " "
            continue
        yield start, (buffer + stripped).strip()
        buffer = ""


def _is_command(line: str) -> bool:
    line = re.sub(r"^(\$ |[A-Z_]+=\S+ )+", "", line)
    return line.split(" ", 1)[0] in LAUNCHERS


def doc_commands() -> list[Command]:
    commands = []
    for doc in DOCS:
        text = doc.read_text()
        for block in re.finditer(r"```(bash|sh|shell|console)?\n(.*?)```", text, flags=re.S):
            offset = text[: block.start()].count("\n") + 1
            for n, line in _joined(block.group(2).splitlines()):
                if _is_command(line):
                    commands.append(Command(f"{doc.relative_to(ROOT)}:{offset + n}", line))
    for script in SCRIPTS:
        doc = (re.match(r'(?:#![^\n]*\n)?"""(.*?)"""', script.read_text(), flags=re.S) or [None, ""])[1]
        for n, line in _joined(doc.splitlines()):
            if _is_command(line):
                commands.append(Command(f"{script.relative_to(ROOT)} docstring:{n}", line))
    return commands


COMMANDS = doc_commands()


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


def _options(parser: argparse.ArgumentParser) -> set[str]:
    """Its option strings; an option that takes the rest of the line (``nargs=REMAINDER``) is marked ``...``."""
    return {opt + ("..." if action.nargs == argparse.REMAINDER else "")
            for action in parser._actions for opt in action.option_strings}


def script_options(script: Path) -> set[str]:
    """The ``--flags`` a script's argument parser accepts (captured as its main() builds it)."""
    original = argparse.ArgumentParser.parse_args

    def capture(self, *args, **kwargs):
        raise _Captured(self)

    argparse.ArgumentParser.parse_args = capture
    try:
        module = load_module(f"_doc_{script.stem}", script)
        entry = getattr(module, "invoke_main", None) or getattr(module, "main")
        try:
            entry([]) if entry.__code__.co_argcount else entry()
        except _Captured as found:
            return _options(found.parser)
    finally:
        argparse.ArgumentParser.parse_args = original
    raise AssertionError(f"{script} parsed no arguments")


@pytest.fixture(scope="module")
def options() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for script in SCRIPTS:
        if script.name == "det_train.py":
            pytest.importorskip("detectron2", reason="detectron2 is not installed: run `make install-det`")
        found[str(script.relative_to(ROOT))] = script_options(script)
    from accelerate.commands.launch import launch_command_parser
    from torch.distributed.run import get_args_parser

    found["accelerate launch"] = _options(launch_command_parser())
    found["torchrun"] = _options(get_args_parser())
    return found


def _unknown_flags(tokens: list[str], accepted: set[str]) -> list[str]:
    """The ``--flags`` in ``tokens`` not in ``accepted``, up to an option that passes the rest on."""
    unknown = []
    for t in tokens:
        flag = t.strip("[]").split("=", 1)[0]
        if flag + "..." in accepted:
            break
        if flag.startswith("--") and flag not in accepted:
            unknown.append(flag)
    return unknown


def _split(tokens: list[str]) -> tuple[str, list[str], str | None, list[str]]:
    """(launcher, launcher tokens, script, script tokens)."""
    for i, t in enumerate(tokens):
        if re.fullmatch(r"(tools|benchmarks)/[\w./-]+\.py", t):
            launcher = "torchrun" if "torchrun" in tokens[:i] or "torch.distributed.run" in tokens[:i] else (
                "accelerate launch" if tokens[:2] == ["accelerate", "launch"] else "python")
            return launcher, tokens[:i], t, tokens[i + 1:]
    return tokens[0], tokens, None, []


def test_the_docs_have_commands() -> None:
    assert len(COMMANDS) > 40 and any(c.where.startswith("README.md") for c in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.where)
def test_command_refers_to_what_exists(command: Command, options: dict[str, set[str]]) -> None:
    tokens = command.tokens
    launcher, before, script, after = _split(tokens)
    if launcher == "make":
        targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.M))
        assert set(tokens[1:]) - {"-C", "."} <= targets, f"{command.where}: {command.text}"
        return
    if script is not None:
        assert (ROOT / script).is_file(), f"{command.where}: {script} does not exist"
        unknown = _unknown_flags(after, options[script])
        assert not unknown, f"{command.where}: {script} does not accept {unknown}"
        if launcher != "python":
            unknown = _unknown_flags(before, options[launcher])
            assert not unknown, f"{command.where}: {launcher} does not accept {unknown}"
    for t in tokens:
        path = t.strip("[]")
        if path.split("/", 1)[0] in REPO_DIRS and re.search(r"\.(ya?ml|py|md|sh|json)$", path) \
                and not re.search(r"[A-Z*{$]|\.\.\.", path):
            assert (ROOT / path).exists(), f"{command.where}: {path} does not exist"


def test_accelerate_cpu_multi_process_example_is_not_the_one_that_runs_one_process() -> None:
    """``accelerate launch --cpu --num_processes N`` starts one process on CPU without MPI (docs/training.md)."""
    bad = [c for c in COMMANDS if c.tokens[:2] == ["accelerate", "launch"] and "--cpu" in c.tokens
           and "--num_processes" in c.tokens]
    assert not bad, [f"{c.where}: {c.text}" for c in bad]


def _call_main(module, script: str, argv: list[str]) -> object:
    """``main(argv)``, or ``main()`` with ``sys.argv`` set where a script reads it itself."""
    import sys

    if module.main.__code__.co_argcount:
        return module.main(argv)
    saved = sys.argv
    sys.argv = [script, *argv]
    try:
        return module.main()
    finally:
        sys.argv = saved


CHEAP = [c for c in COMMANDS if "--help" in c.tokens or
         (_split(c.tokens)[2] == "tools/cost.py" and not {"--memory", "--time"} & set(c.tokens))]


@pytest.mark.parametrize("command", CHEAP, ids=lambda c: c.where)
def test_cheap_doc_commands_exit_zero_and_print(command: Command, capsys: pytest.CaptureFixture) -> None:
    _, _, script, after = _split(command.tokens)
    module = load_module(f"_run_{Path(script).stem}", ROOT / script)
    try:
        rc = _call_main(module, script, after)
    except SystemExit as e:  # --help
        rc = e.code
    assert rc in (0, None), f"{command.where}: {command.text}"
    assert capsys.readouterr().out.strip(), f"{command.where} printed nothing"
