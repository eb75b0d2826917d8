"""Every command and sub-command of `tinyfleet` answers --help with an example."""

from __future__ import annotations

import argparse

import pytest

from tinyfleet.cli import build_parser, main


def _commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _commands(sub, (*prefix, name))
    return found


COMMANDS = _commands(build_parser())


def test_the_tree_has_the_documented_commands() -> None:
    tops = {c[0] for c in COMMANDS if len(c) == 1}
    assert {"server", "agent", "job", "sim", "query", "registry", "demo"} <= tops


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "tinyfleet")
def test_help_has_an_example(command: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main([*command, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "example" in out.lower(), f"`tinyfleet {' '.join(command)} --help` shows no example"
    assert "tinyfleet" in out.split("xample", 1)[1], "the example should show a tinyfleet command line"
