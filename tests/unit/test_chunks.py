"""``stages.sqs.chunks``: the one splitter into SQS batches, for lists and for lazy generators alike."""

from __future__ import annotations

import collections
import itertools

from pipeline.harness.loadgen import _batches
from stages.sqs import chunks


def test_lists_split_into_tens_and_a_rest() -> None:
    assert [len(c) for c in chunks(list(range(25)))] == [10, 10, 5]
    assert list(chunks([])) == []
    assert list(chunks("abcde", 2)) == [["a", "b"], ["c", "d"], ["e"]]


def test_a_generator_is_never_drawn_ahead() -> None:
    drawn = itertools.count()
    first = next(chunks(next(drawn) for _ in itertools.repeat(None)))
    assert first == list(range(10)) and next(drawn) == 10  # an endless source: only ten were taken


def test_loadgen_batches_count_kinds() -> None:
    # CASE: messages (body, attributes, events by kind) -> entries in tens, attributes kept, kinds summed
    gz = {"content-encoding": {"DataType": "String", "StringValue": "gzip"}}
    messages = iter([("a", {}, collections.Counter(valid=3)), ("b", gz, collections.Counter(invalid=1))] * 6)
    batches = list(_batches(messages))
    assert [len(e) for e, _ in batches] == [10, 2]
    assert [e["Id"] for e in batches[1][0]] == ["0", "1"]
    assert "MessageAttributes" not in batches[0][0][0] and batches[0][0][1]["MessageAttributes"] == gz
    assert sum((k for _, k in batches), start=collections.Counter()) == {"valid": 18, "invalid": 6}


def test_loadgen_batches_respect_the_call_size_limit() -> None:
    # CASE: ten 60 KB batched bodies do not fit one SendMessageBatch call -> split by size
    messages = iter([("x" * 60_000, {}, collections.Counter(valid=100))] * 10)
    batches = list(_batches(messages))
    assert len(batches) > 1 and sum(len(e) for e, _ in batches) == 10
