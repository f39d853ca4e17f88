"""``GET /metrics``: every stage of a process in the Prometheus text exposition format (version 0.0.4).

One family per figure, labelled by ``stage`` (the runner's step id) and, for
per-partition figures, ``topic`` and ``partition``:

========================================  =========  ====================================================
``weir_stage_up``                         gauge      1 while the stage runs, 0 while it starts, retries,
                                                     is paused by the DLQ guard or has stopped
``weir_stage_consumed_total``             counter    input messages handled
``weir_stage_produced_total``             counter    records produced (dead letters apart)
``weir_stage_dead_lettered_total``        counter    input messages sent to the dead-letter topic
``weir_stage_retries_total``              counter    failed attempts since start (each retried)
``weir_stage_batch_seconds``              histogram  time to handle one batch and hand its output to the producer
``weir_stage_last_commit_timestamp_seconds`` gauge   wall-clock time of the last successful commit
``weir_stage_committed_offset``           gauge      per partition, the offset this process last committed
``weir_stage_lag_messages``               gauge      per assigned partition, messages between the position
                                                     and the high watermark of the last fetch response
========================================  =========  ====================================================

>>> from streams.runtime import RunnerStats
>>> text = render({"ingest": ("running", 0, RunnerStats(consumed=3))})
>>> 'weir_stage_consumed_total{stage="ingest"} 3' in text.splitlines()
True
"""

from __future__ import annotations

from collections.abc import Mapping

from streams.runtime import LATENCY_BUCKETS_S, RunnerStats

__all__ = ["CONTENT_TYPE", "render"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def _num(value: float) -> str:
    return str(value) if isinstance(value, int) else repr(float(value))


def render(stages: Mapping[str, tuple[str, int, RunnerStats]]) -> str:
    """The exposition of ``stages``: step id → (state, retries, the runner's stats)."""
    out: list[str] = []

    def family(name: str, kind: str, doc: str, samples: list[tuple[str, float]]) -> None:
        out.append(f"# HELP {name} {doc}")
        out.append(f"# TYPE {name} {kind}")
        out.extend(f"{name}{labels} {_num(value)}" for labels, value in samples)

    each = [(f'{{stage="{_label(name)}"}}', state, retries, stats) for name, (state, retries, stats) in stages.items()]
    family("weir_stage_up", "gauge", "1 while the stage runs, else 0 (starting, retrying, paused, stopped).",
           [(lb, int(state == "running")) for lb, state, _, _ in each])
    family("weir_stage_consumed_total", "counter", "Input messages handled.", [(lb, s.consumed) for lb, _, _, s in each])
    family("weir_stage_produced_total", "counter", "Records produced, dead letters apart.",
           [(lb, s.produced) for lb, _, _, s in each])
    family("weir_stage_dead_lettered_total", "counter", "Input messages sent to the dead-letter topic.",
           [(lb, s.dead_lettered) for lb, _, _, s in each])
    family("weir_stage_retries_total", "counter", "Failed attempts since start, each retried with backoff.",
           [(lb, retries) for lb, _, retries, _ in each])
    histogram: list[tuple[str, float]] = []
    for name, (_, _, stats) in stages.items():
        cumulative = 0
        for bound, n in zip(LATENCY_BUCKETS_S, stats.batch_seconds, strict=True):
            cumulative += n
            histogram.append((f'_bucket{{stage="{_label(name)}",le="{_le(bound)}"}}', cumulative))
        histogram.append((f'_sum{{stage="{_label(name)}"}}', float(stats.busy_s)))
        histogram.append((f'_count{{stage="{_label(name)}"}}', stats.batches))
    out.append("# HELP weir_stage_batch_seconds Time to handle one batch and hand its output to the producer.")
    out.append("# TYPE weir_stage_batch_seconds histogram")
    out.extend(f"weir_stage_batch_seconds{suffix} {_num(value)}" for suffix, value in histogram)
    family("weir_stage_last_commit_timestamp_seconds", "gauge", "Wall-clock time of the last successful commit.",
           [(lb, float(s.last_commit_ts)) for lb, _, _, s in each if s.last_commit_ts])

    def per_partition(name: str, table: Mapping[tuple[str, int], int]) -> list[tuple[str, float]]:
        return [(f'{{stage="{_label(name)}",topic="{_label(t)}",partition="{p}"}}', v)
                for (t, p), v in sorted(table.items())]

    family("weir_stage_committed_offset", "gauge", "Per partition, the offset this process last committed.",
           [row for name, (_, _, s) in stages.items() for row in per_partition(name, s.committed)])
    family("weir_stage_lag_messages", "gauge",
           "Per assigned partition, messages between the position and the last fetched high watermark.",
           [row for name, (_, _, s) in stages.items() for row in per_partition(name, s.lag)])
    return "\n".join(out) + "\n"
