"""One reading of a queue's backlog (clients.backlog_of): the summary, /metrics, check and loadgen agree."""

from __future__ import annotations

from pathlib import Path

from pipeline.clients import BACKLOG_ATTRIBUTES, backlog_of

REPO = Path(__file__).resolve().parents[2]


def test_backlog_of_reads_the_three_counts() -> None:
    attrs = {"ApproximateNumberOfMessages": "7", "ApproximateNumberOfMessagesNotVisible": "2",
             "ApproximateNumberOfMessagesDelayed": "1", "QueueArn": "arn:aws:sqs:us-east-1:0:q"}
    assert backlog_of(attrs) == {"visible": 7, "in_flight": 2, "delayed": 1}
    assert backlog_of({}) == {"visible": 0, "in_flight": 0, "delayed": 0}


def test_only_the_clients_module_names_the_backlog_attributes() -> None:
    others = [p for p in (REPO / "pipeline").rglob("*.py") if p.name != "clients.py"]
    for attr in BACKLOG_ATTRIBUTES.values():
        assert not [p for p in others if f'"{attr}"' in p.read_text() or f"'{attr}'" in p.read_text()], attr
