"""One rich progress bar (console.py) for loadgen and bench: nothing off a terminal, counts on one."""

from __future__ import annotations

import io
import sys

import pytest

from pipeline import console


def test_no_bar_off_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(console, "interactive", lambda stream=None: False)
    with console.progress_bar(10) as advance:
        assert advance is None


def test_the_bar_counts_messages_on_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    err = io.StringIO()
    monkeypatch.setattr(console, "interactive", lambda stream=None: True)
    monkeypatch.setattr(sys, "stderr", err)
    with console.progress_bar(30, "filling the queue") as advance:
        assert advance is not None
        for _ in range(3):
            advance(10)
    assert "filling the queue" in err.getvalue() and "30/30" in err.getvalue()
