"""What one ``bench`` run measures: its options, shared by the phases, the targets and the report."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["BenchOptions", "MEMORY_COUNT"]

MEMORY_COUNT = 100_000


@dataclass
class BenchOptions:
    count: int = 20_000
    memory_count: int = MEMORY_COUNT
    out: Path = Path("benchmarks")
    memory: bool = False
    latency: bool = True
    rounds: int = 3
    seed: int = 42
    latency_seconds: float = 15.0
    cache_dir: Path = Path(".cache")
    name: str = "bench"
    rtt_ms: float = 0.0  # a round trip added to every SQS call of the phases (harness.proxy)
    ceiling_concurrencies: tuple[int, ...] = (8, 16, 32, 64, 128)  # the bare loop's search (pollers = deleters)
    search_count: int = 0  # messages per search run; 0 = count / 2
    events_per_message: int = 100  # (d) batched messages; 1 skips the phase
    batched_factor: int = 10  # (d) carries this many times ``count`` events (it drains far faster)
    batch_gzip: bool = False  # (d)'s bodies gzipped and base64-encoded
