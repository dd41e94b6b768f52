"""The PNG next to the JSON report: throughput over time, and latency (or RSS with ``--memory``)."""

from __future__ import annotations

import logging
from pathlib import Path

from .report import best

__all__ = ["chart"]

log = logging.getLogger("pipeline.bench")


def chart(report: dict, phases: dict[str, list[dict]], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("no chart: matplotlib is missing (pip install -e '.[bench]')")
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    labels = {"broker": "(a) broker: receive+delete", "pipeline": "(b) pipeline end to end",
              "core": "(c) core, no SQS", "raw_copy": "raw COPY-with-upsert", "raw_direct_copy": "raw COPY, no upsert",
              "latency": "pipeline at half rate",
              "memory": "pipeline draining the backlog"}
    for name, series in report["series"].items():
        pts = series["throughput"]
        if pts:
            ax1.plot([t for t, _ in pts], [v for _, v in pts], label=labels.get(name, name),
                     marker="o" if len(pts) < 10 else None, markersize=3)
    ax1.set(title="Throughput over time (1 s window; in-memory phases: per batch)", xlabel="seconds since the phase's first message",
            ylabel="messages / s", yscale="log")
    ax1.grid(alpha=0.3)
    conc = (report["series"].get("pipeline") or report["series"].get("memory") or {}).get("concurrency")
    if conc:  # the adaptive limits of the pipeline phase, on their own axis
        axc = ax1.twinx()
        for k, (what, color) in enumerate((("receive", "tab:green"), ("delete", "tab:red")), start=1):
            axc.step([c[0] for c in conc], [c[k] for c in conc], where="post", color=color, linestyle=":",
                     label=f"pipeline: {what} concurrency")
        axc.set_ylabel("concurrent SQS calls (adaptive limit)")
        axc.legend(fontsize=8, loc="lower right")
    ax1.legend(fontsize=8, loc="upper left")
    if "memory" in phases:  # the memory check: RSS against messages done, not latency
        rss = best(phases["memory"])["rss"]
        ax2.plot([c for _, _, c in rss], [m for _, m, _ in rss], label="RSS of the pipeline process")
        ax2.set(title=f"RSS while a {rss[-1][2]:,}-message backlog drains", xlabel="messages acked", ylabel="MB",
                ylim=(0, max(m for _, m, _ in rss) * 1.3))
    else:
        # (b) drains a backlog, so its latency is mostly time spent waiting in the queue: shown dashed.
        for name in ("latency", "pipeline"):
            lat = best(phases[name])["latencies_ms"] if name in phases else []
            if lat:
                s = sorted(lat)
                ax2.plot(s, [i / len(s) for i in range(1, len(s) + 1)], label=labels[name],
                         linestyle="--" if name == "pipeline" else "-")
        ax2.set(title="End-to-end latency (SentTimestamp → commit), CDF", xlabel="ms", ylabel="share of messages",
                xscale="log")
        ax2.axvline(1000, color="grey", linestyle=":", linewidth=1)
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    ratios = report["ratios"]
    if "pipeline_vs_broker" in ratios:
        fig.suptitle(f"pipeline / broker = {ratios['pipeline_vs_broker']}   core / raw COPY = {ratios['core_vs_raw_copy']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
