"""Every flag of every `radar` command reaches the function the command calls.

For each subcommand that declares a `target` (`app.cli.calls`), each optional flag is given a
value other than its default and the target is replaced by a recorder: the recorded call must
differ from the call without the flag in the parameter the flag names. A flag that is parsed
and then dropped (as `radar teach --skip-bad` once was) fails here.
"""

import argparse
import importlib
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from app.cli import CLI_ONLY, build_parser, resolve_target


class Recorded(Exception):
    """Raised by the recorder to stop the handler once the target has been called."""

    def __init__(self, kwargs: dict[str, Any]) -> None:
        super().__init__("recorded")
        self.kwargs = kwargs


def subcommands(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, Any]:
    """Every leaf command (`thresholds diff` included) → its parser."""
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                nested = subcommands(sub, f"{prefix}{name} ")
                found |= nested or {f"{prefix}{name}": sub}
    return found


ALL = subcommands(build_parser())
COMMANDS = {name: sub for name, sub in ALL.items() if sub.get_default("target")}


def names_read(handler: Any) -> set[str]:
    """What a handler reads of the parsed flags: `args.NAME` in its source, every field of
    TrainConfig when it builds one from the flags, every parameter of its target when it
    calls `call_target`."""
    source = inspect.getsource(handler)
    read = set(re.findall(r"\bargs\.(\w+)", source))
    if "_train_config(" in source:
        from app.training.config import TrainConfig

        read |= set(TrainConfig.model_fields)
    return read


@pytest.mark.parametrize("command", sorted(ALL))
def test_every_flag_is_read_by_its_handler(command: str) -> None:
    sub = ALL[command]
    handler = sub.get_default("handler")
    read = names_read(handler)
    if sub.get_default("target"):
        read |= set(inspect.signature(resolve_target(sub.get_default("target"))).parameters)
    dests = {a.dest for a in sub._actions if not isinstance(a, argparse._HelpAction)}
    assert dests - CLI_ONLY - read == set(), f"radar {command}: parsed, never used"


def value(action: argparse.Action, variant: int) -> list[str]:
    """A command-line value for `action`; variants 0 and 1 differ from each other and from
    a plain default (numbers far from any default, paths and strings made up)."""
    if action.nargs == 0:
        return []
    if action.choices:
        choices = [str(c) for c in action.choices if c != action.default]
        one = [choices[variant % len(choices)]]
    elif action.type is int:
        one = [str(7 + variant)]
    elif action.type is float:
        one = [str(0.3 + 0.1 * variant)]
    elif action.type is Path:
        one = [f"given-{variant}.jsonl"]
    else:
        one = [f"given-{variant}"]
    return one * (2 if action.nargs in ("+", "*") else 1)


def optional_flags(sub: argparse.ArgumentParser) -> list[argparse.Action]:
    return [
        a
        for a in sub._actions
        if a.option_strings and not a.required and not isinstance(a, argparse._HelpAction)
    ]


def required_argv(sub: argparse.ArgumentParser) -> list[str]:
    argv: list[str] = []
    for action in sub._actions:
        if action.required:
            argv += ([action.option_strings[0]] if action.option_strings else []) + value(action, 0)
    return argv


def recorded_call(monkeypatch: pytest.MonkeyPatch, command: str, argv: list[str]) -> dict[str, Any]:
    args = build_parser().parse_args([command, *argv])
    args.command_line = "radar test"
    module, _, name = args.target.partition(":")
    original = resolve_target(args.target)

    def recorder(*positional: Any, **kwargs: Any) -> Any:
        assert not positional, "call_target passes keywords only"
        raise Recorded(kwargs)

    recorder.__signature__ = inspect.signature(original)  # type: ignore[attr-defined]
    monkeypatch.setattr(importlib.import_module(module), name, recorder)
    with pytest.raises(Recorded) as caught:
        args.handler(args)
    return flatten(caught.value.kwargs)


def flatten(kwargs: dict[str, Any]) -> dict[str, Any]:
    """A config object passed whole (e.g. train's TrainConfig) counts by its fields."""
    flat: dict[str, Any] = {}
    for key, item in kwargs.items():
        fields = getattr(item, "model_fields", None)
        flat |= {f: getattr(item, f) for f in fields} if fields else {key: item}
    return flat


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_flag_is_a_parameter_of_the_target(command: str) -> None:
    sub = COMMANDS[command]
    target = resolve_target(sub.get_default("target"))
    parameters = set(inspect.signature(target).parameters)
    dests = {a.dest for a in sub._actions if not isinstance(a, argparse._HelpAction)}
    assert dests - CLI_ONLY - parameters == set()


CASES = [
    (command, action.dest, action.option_strings[0])
    for command, sub in sorted(COMMANDS.items())
    for action in optional_flags(sub)
]


@pytest.mark.parametrize(("command", "dest", "flag"), CASES, ids=[f"{c}{f}" for c, _, f in CASES])
def test_each_flag_changes_what_it_names(
    monkeypatch: pytest.MonkeyPatch, command: str, dest: str, flag: str
) -> None:
    sub = COMMANDS[command]
    action = next(a for a in sub._actions if a.dest == dest and flag in a.option_strings)
    base = required_argv(sub)
    without = recorded_call(monkeypatch, command, base)
    given = recorded_call(monkeypatch, command, [*base, flag, *value(action, 1)])
    assert dest in given, f"{flag} sets {dest!r}, which the target never receives"
    assert given[dest] != without[dest], f"{flag} did not change {dest!r}"
    changed = {k for k in given if given[k] != without.get(k)}
    assert changed == {dest}, f"{flag} changed {changed}, not just {dest!r}"


def test_the_check_catches_a_dropped_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    # A handler that drops --skip-bad (the bug this file guards against) must be caught.
    import app.cli

    def dropping_teach(args: argparse.Namespace) -> int:
        del args.skip_bad
        return app.cli.call_target(args)

    monkeypatch.setattr(app.cli, "_teach", dropping_teach)
    base = required_argv(COMMANDS["teach"])
    assert "skip_bad" not in recorded_call(monkeypatch, "teach", [*base, "--skip-bad"])


def test_a_closed_pipe_ends_a_command_quietly() -> None:
    """`radar ... | head -1`: the reader has gone; exit 141, no BrokenPipeError traceback."""
    repo = Path(__file__).resolve().parents[1]
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the command writes anything
    try:
        done = subprocess.run(
            [sys.executable, "-m", "app.cli", "thresholds", "validate", "thresholds/tiny.yaml"],
            cwd=repo,
            stdout=write_end,
            stderr=subprocess.PIPE,
            timeout=120,
        )
    finally:
        os.close(write_end)
    assert done.returncode == 141, done.stderr.decode()
    assert b"Traceback" not in done.stderr and b"BrokenPipeError" not in done.stderr
