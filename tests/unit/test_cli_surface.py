"""What a newcomer reads: every --help explains itself, hints name a command that works from this
shell, result commands are not buried in INFO lines, and rich never cuts a long line inside a name."""

from __future__ import annotations

import argparse
import io
import logging
import sys
from pathlib import Path

import pytest

from pipeline import cli
from pipeline.console import invocation, log_console
from pipeline.logs import setup_logging


def commands() -> dict[str, argparse.ArgumentParser]:
    parser = cli._parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {"(top level)": parser, **sub.choices}


@pytest.mark.parametrize("name", sorted(commands()))
def test_every_help_has_a_description_and_every_option_help(name: str) -> None:
    parser = commands()[name]
    assert parser.description and len(parser.description) > 20, name
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        assert action.help and action.help != argparse.SUPPRESS, f"{name} {action.option_strings or action.dest}"
        if action.option_strings and action.nargs != 0 and action.default not in (None, False, argparse.SUPPRESS):
            assert "default" in action.help, f"{name} {action.option_strings}: default {action.default!r} not shown"
    text = parser.format_help()
    assert "%(default)" not in text


def test_help_shows_defaults_of_loadgen_and_bench() -> None:
    assert "(default: 32)" in commands()["loadgen"].format_help()
    assert "(default: 3)" in commands()["bench"].format_help()


def test_invocation_uses_the_running_interpreter(monkeypatch, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "executable", str(tmp_path / ".venv" / "bin" / "python"))
    assert invocation() == ".venv/bin/python -m pipeline"
    monkeypatch.setattr(sys, "executable", "/opt/py 3/bin/python")  # outside the cwd: absolute, quoted
    assert invocation() == "'/opt/py 3/bin/python' -m pipeline"


def test_error_hints_name_the_working_command(monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(cli, "invocation", lambda: ".venv/bin/python -m pipeline")
    cli._fail("no masking key (generate one with `python -m pipeline keygen`)", 2)
    assert capsys.readouterr().err == "error: no masking key (generate one with `.venv/bin/python -m pipeline keygen`)\n"


@pytest.mark.parametrize(("argv", "level"), [
    (["show"], "WARNING"), (["check"], "WARNING"), (["unmask", "x"], "WARNING"), (["keygen"], "WARNING"),
    (["run"], "INFO"), (["migrate"], "INFO"), (["--log-level", "DEBUG", "show"], "DEBUG"),
])
def test_result_commands_default_to_warning(argv: list[str], level: str) -> None:
    assert cli.log_level(cli._parser().parse_args(argv)) == level


def test_audit_records_pass_whatever_the_level(capsys) -> None:  # type: ignore[no-untyped-def]
    try:
        setup_logging("WARNING")
        logging.getLogger("pipeline.keyring").info("chatter")
        logging.getLogger("pipeline.audit").info("unmask")
        err = capsys.readouterr().err
    finally:
        setup_logging("INFO")
    assert '"msg":"unmask"' in err and "chatter" not in err


def test_long_log_lines_are_never_cut_inside_a_name() -> None:
    from rich.file_proxy import FileProxy

    buf = io.StringIO()
    console = log_console(buf)
    console.width = 30  # far narrower than the line
    proxy = FileProxy(console, buf)  # what a live bar routes log lines through
    line = '{"level":"warning","msg":"set PIPELINE_SQS__QUEUE_URL or PIPELINE_SQS__DLQ_URL","key":"k"}'
    proxy.write(line + "\n")
    proxy.flush()
    assert buf.getvalue().rstrip("\n") == line
