"""The batch runtime every stage runs on: consume a batch, process, produce, flush, commit.

Why not a faust agent per stage: faust passes ~4,200 messages/s here (one event
per message, measured in this repo's notes) and its aiokafka driver hard-codes
``fetch_max_wait_ms=1500``, which the embedded broker honours in full (~400 ms
median per hop). A confluent-kafka batch consumer passes ~1,000,000 messages/s
and waits at most ``max_wait_ms`` for a batch, so it is the hot path's shell.

Delivery: at-least-once. For each batch the runner (1) calls the stage, which
may write durably to its own stores, and (2) produces what the stage returned
plus dead letters. Every ``commit_every_ms`` (and on stop, rebalance and
pause) it (3) flushes the producer and checks every delivery report, and only
then (4) commits the offsets of every batch processed so far, synchronously.
A crash anywhere before (4) re-delivers those batches; sinks and stores are
idempotent on event id. Committing on a cadence rather than per batch keeps
the per-batch path free of broker round trips (measured on the embedded
broker: flush + commit cost 10-14 ms per batch under load, a hop's whole
latency budget).

With ``fused`` (topic → stages), the records a batch produces to such a topic are also handed, in memory,
to those stages' ``handle``, whose outputs join the batch's (one broker hop less; docs/runtime.md).

Every hook the runner calls is declared on :class:`streams.base.Stage`, with its
contract; stateful stages override ``on_assign``/``on_revoke``/``after_commit`` to
rebuild their state from the log after a crash, a failure or a rebalance.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer, TopicPartition

from streams.base import Message, Produce, Rejected, Stage, StepResult
from streams.dlq import DlqGuard, DlqRatioExceeded
from streams.kafka import DeliveryTracker, consumer_config, flush_or_raise, producer_config

log = logging.getLogger(__name__)


# Commit errors that mean "the group moved on": the batches are re-delivered to whoever owns the
# partitions now, which at-least-once allows; the stage goes on.
REBALANCE_ERRORS = {
    KafkaError.UNKNOWN_MEMBER_ID, KafkaError.ILLEGAL_GENERATION, KafkaError.REBALANCE_IN_PROGRESS,
    KafkaError._ASSIGNMENT_LOST, KafkaError._STATE,
}


LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, float("inf"))
"""Upper bounds of the batch-time histogram (seconds; ``/metrics``)."""


@dataclass
class RunnerStats:
    """Counters a runner updates after each batch and each commit (read by ``/metrics``, tests, benchmarks)."""

    consumed: int = 0
    produced: int = 0
    dead_lettered: int = 0
    batches: int = 0
    last_commit_ts: float = 0.0  # wall clock, seconds
    busy_s: float = 0.0
    lag_ms_sum: float = 0.0  # consume time minus the message's timestamp, summed over messages
    by_topic: dict[str, int] = field(default_factory=dict)
    batch_seconds: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS_S))  # per bucket, not cumulative
    committed: dict[tuple[str, int], int] = field(default_factory=dict)  # the last offsets this runner committed
    lag: dict[tuple[str, int], int] = field(default_factory=dict)  # per assigned partition, at the last commit

    def count_batch(self, consumed: int, produced: int, dead_lettered: int, busy: float) -> None:
        """One batch handled: its messages, outputs and refusals, and ``busy`` seconds (also into the histogram)."""
        self.consumed += consumed
        self.produced += produced
        self.dead_lettered += dead_lettered
        self.batches += 1
        self.busy_s += busy
        self.batch_seconds[bisect.bisect_left(LATENCY_BUCKETS_S, busy)] += 1


def dead_letter(stage: str, rej: Rejected, now_ms: int) -> Produce:
    """The DLQ record for a refused message: original key and bytes, reason in headers."""
    m = rej.message
    headers = m.headers + (
        ("weir.reason", rej.error.reason.value.encode()),
        ("weir.detail", rej.error.detail.encode()),
        ("weir.stage", stage.encode()),
        ("weir.topic", m.topic.encode()),
        ("weir.partition", str(m.partition).encode()),
        ("weir.offset", str(m.offset).encode()),
        ("weir.time", str(now_ms).encode()),
    )
    return Produce(f"dlq.{m.topic}", m.key, m.value, headers)


class BatchRunner:
    """Runs one :class:`Stage` in a consumer group until stopped.

    ``run`` blocks the calling thread; ``start`` runs it in a daemon thread.

    A failure never ends the runner (a dependency down, the broker unreachable, a bug the stage hits
    on some input): it keeps what was processed if it can commit it, rewinds its partitions to their
    committed offsets (rebuilding a stateful stage's state there through its :class:`~streams.base.Stage`
    hooks), waits ``backoff_s`` doubled per consecutive failure up to ``backoff_max_s`` while staying
    in its group, and tries again; nothing is committed past a failed batch. ``health()`` says which of
    ``starting``, ``running``, ``retrying`` or ``stopped`` it is, with the last error.

    With a ``dlq_guard``, each batch is counted after its outputs and dead letters are produced;
    when too much of the recent input was dead-lettered (a bad deploy, or a burst of garbage), the
    runner commits what it processed (flushing first, so the dead letters are durable) and pauses
    (state ``paused``, the :class:`~streams.dlq.DlqRatioExceeded` message as its error) for
    ``guard_pause_s``, doubled per consecutive trip up to ``guard_pause_max_s``, staying in its group;
    then it resumes with a fresh window. Only this stage pauses; a burst costs one pause, a producer that
    keeps sending garbage sends at most a window's worth to the DLQ per pause.
    """

    def __init__(
        self,
        stage: Stage,
        bootstrap: str,
        *,
        group_id: str | None = None,
        max_batch: int = 500,
        max_wait_ms: int = 5,
        fetch_wait_ms: int = 10,
        commit_every_ms: int = 50,
        dlq_guard: DlqGuard | None = None,
        backoff_s: float = 0.5,
        backoff_max_s: float = 30.0,
        guard_pause_s: float = 30.0,
        guard_pause_max_s: float = 900.0,
        member: tuple[int, int] | None = None,
        fused: Mapping[str, Sequence[Stage]] | None = None,
    ) -> None:
        self.stage = stage
        self.fused = {topic: tuple(stages) for topic, stages in (fused or {}).items()}
        self.fused_stats = {s.step_id: RunnerStats() for stages in self.fused.values() for s in stages}
        self.member = member
        self.backoff_s, self.backoff_max_s = backoff_s, backoff_max_s
        self.guard_pause_s, self.guard_pause_max_s = guard_pause_s, guard_pause_max_s
        self.guard_trips = 0  # consecutive DLQ-guard pauses; 0 once a full window passed under the limit
        self._guard_paused = False
        self.failures = 0  # consecutive failed attempts; 0 once a batch went through again
        self.retries = 0  # failed attempts since start
        self.last_error: str | None = None
        self._rewind_due = False
        self._rewound_at = 0.0
        self.dlq_guard = dlq_guard
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000
        self.commit_every_s = commit_every_ms / 1000
        self._uncommitted: dict[tuple[str, int], int] = {}
        # a batch failed between handle and the record of its offsets: the stage's state holds input that is not
        # committed and whose outputs may be missing; no after_commit (no snapshot) until the rewind rebuilt it
        self._dirty = False
        self._floor: dict[tuple[str, int], int] = {}  # committed offsets a replaying partition must not go below
        self._last_commit = time.monotonic()
        self._lag_measured = 0.0
        self.stats = RunnerStats()
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self.paused = threading.Event()
        self.ready = threading.Event()  # set once the group has assigned partitions to this runner
        self.assigned: list[tuple[str, int]] = []  # the partitions the group gives this runner now
        self._thread: threading.Thread | None = None
        # fetch_wait_ms trades broker CPU for latency: the embedded broker answers an empty fetch only when
        # the wait expires, and each idle fetch costs it CPU (measured: 4 idle consumers cost 0.39 of a
        # core at 5 ms, 0.16 at 20 ms, 0.08 at 50 ms).
        conf = consumer_config(bootstrap, group_id or f"weir-{stage.step_id}", **{"fetch.wait.max.ms": fetch_wait_ms})
        self._cooperative = member is None and "cooperative" in str(conf.get("partition.assignment.strategy", ""))
        self._consumer = Consumer(conf)
        self._subscribed = False
        self._tracker = DeliveryTracker()
        self._producer = Producer(producer_config(bootstrap), on_delivery=self._tracker)

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name=f"stage-{self.stage.step_id}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    self.subscribe()  # once; here, so that a member without a group retries a failed assignment
                    if self._rewind_due:
                        self._rewind()
                    if self.paused.is_set():
                        self.commit()
                        self._hold()
                    if self.run_once() or time.monotonic() - self._rewound_at > 2.0:
                        self._recovered()
                except DlqRatioExceeded as exc:
                    self._pause_for_guard(exc)
                except Exception as exc:  # noqa: BLE001 - any failure is retried; none ends the stage
                    self._failed(exc)
            self.commit()
            if self.member is not None and self.assigned:  # no group to call it on close: a clean handoff
                self.stage.on_revoke(list(self.assigned))
        except BaseException as exc:  # the process is going down: kept, never swallowed
            self.error = exc
            log.exception("stage %s stopped", self.stage.step_id)
        finally:
            self._consumer.close()

    def health(self) -> dict[str, Any]:
        """``state`` (starting, running, retrying, paused by the DLQ guard, or stopped), failed attempts
        (consecutive and in all), the last error, and the counters."""
        if self.error is not None:
            state = "stopped"
        elif self._guard_paused:
            state = "paused"
        elif self.failures:
            state = "retrying"
        elif self.ready.is_set():
            state = "running"
        else:
            state = "starting"
        error = str(self.error) if self.error is not None else self.last_error
        return {"state": state, "failures": self.failures, "retries": self.retries, "error": error,
                "consumed": self.stats.consumed, "dead_lettered": self.stats.dead_lettered,
                "partitions": [f"{t}[{p}]" for t, p in self.assigned]} | (
                    {"fused": sorted(self.fused_stats)} if self.fused_stats else {})

    def _recovered(self) -> None:
        """A batch went through (or nothing was left to read again for a while) since the last failure."""
        if self.failures:
            log.warning("stage %s running again after %d failed attempt(s)", self.stage.step_id, self.failures)
            self.failures = 0

    def _pause_for_guard(self, exc: DlqRatioExceeded) -> None:
        """The guard tripped (what was processed is committed): pause in the group, then count afresh."""
        self.guard_trips += 1
        self.last_error = str(exc)
        log.error("%s", exc)
        self._guard_paused = True
        try:
            self._wait_in_group(exc.pause_s)
        finally:
            self._guard_paused = False
            if self.dlq_guard is not None:
                self.dlq_guard.reset()
        log.warning("stage %s resumes after the DLQ guard's pause (%d in a row)", self.stage.step_id,
                    self.guard_trips)

    def _failed(self, exc: Exception) -> None:
        """Count a failed attempt, rewind to the committed offsets, and wait out the backoff in the group."""
        self.failures += 1
        self.retries += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        delay = min(self.backoff_max_s, self.backoff_s * 2 ** (self.failures - 1))
        if self.failures == 1:
            log.warning("stage %s failed; retrying from its committed offsets", self.stage.step_id, exc_info=exc)
        log.warning("stage %s: attempt %d failed (%s); next in %.1f s", self.stage.step_id, self.failures,
                    self.last_error, delay)
        self._rewind_due = True
        self._wait_in_group(delay)

    def _rewind(self) -> None:
        """Keep what was processed if it can be committed, then go back to the committed offsets of every
        assigned partition: the failed batch (and anything not committed) is read again. A stage with
        state rebuilds it there (``on_revoke`` then ``on_assign``, as after a rebalance)."""
        try:
            self.commit()
        except Exception:  # noqa: BLE001 - not committed: read again from the last commit
            log.warning("stage %s: could not commit before rewinding; its uncommitted batches are read again",
                        self.stage.step_id)
        self._uncommitted = {}
        parts = self._consumer.assignment()
        if parts:
            keys = [(tp.topic, tp.partition) for tp in parts]
            committed = {(tp.topic, tp.partition): (tp.offset if tp.offset >= 0 else None)
                         for tp in self._consumer.committed(parts, timeout=10)}
            self.stage.on_revoke(keys)
            starts = self.stage.on_assign(keys, committed)
            positions = []
            for key in keys:
                floor = committed.get(key)
                if key in starts and floor is not None:
                    self._floor[key] = floor
                positions.append(TopicPartition(*key, starts.get(key, floor if floor is not None else OFFSET_BEGINNING)))
            # re-assigning sets each start offset, where seek() may refuse a partition not yet fetched
            if self._cooperative:
                self._consumer.incremental_unassign(parts)
                self._consumer.incremental_assign(positions)
            else:
                self._consumer.assign(positions)
            self.ready.set()  # also when the failure was in the assignment's own hook
        self._rewind_due = False
        self._dirty = False  # the state is the committed offsets' again
        self._rewound_at = time.monotonic()

    def _wait_in_group(self, seconds: float) -> None:
        """Sleep ``seconds`` (or until stopped) with every partition paused, consuming nothing but still
        polling, so the group keeps this member (and rebalance callbacks run)."""
        deadline = time.monotonic() + seconds
        try:
            while time.monotonic() < deadline and not self._stop.is_set():
                self._consumer.pause(self._consumer.assignment())
                self._consumer.consume(1, min(0.1, max(0.0, deadline - time.monotonic())))
        except KafkaException as exc:
            log.warning("stage %s: %s while waiting to retry", self.stage.step_id, exc)
        finally:
            try:
                self._consumer.resume(self._consumer.assignment())
            except KafkaException:
                pass

    def subscribe(self) -> None:
        """Join the stage's consumer group, or, with ``member`` (index, count), take the partitions whose number
        is ``index`` modulo ``count`` of every input topic, without a group (no join, no rebalance)."""
        if self._subscribed:
            return
        if self.member is None:
            # before partitions are taken away, commit what was processed from them
            self._consumer.subscribe(list(self.stage.topics), on_assign=self._on_assign, on_revoke=self._on_revoke)
        else:
            self._assign_member(*self.member)
        self._subscribed = True

    def _assign_member(self, index: int, count: int) -> None:
        known = self._consumer.list_topics(timeout=30).topics
        missing = [t for t in self.stage.topics if t not in known or known[t].error is not None]
        if missing:
            raise RuntimeError(f"stage {self.stage.step_id}: no topic {', '.join(missing)} on the broker yet")
        parts = [TopicPartition(t, p) for t in self.stage.topics for p in sorted(known[t].partitions)
                 if p % count == index]
        self._on_assign(self._consumer, parts, manual=True)

    def _on_assign(self, consumer: Consumer, parts: list[TopicPartition], manual: bool = False) -> None:
        if parts:
            keys = [(tp.topic, tp.partition) for tp in parts]
            self.assigned = sorted(set(self.assigned) | set(keys))
            log.info("stage %s assigned %s", self.stage.step_id, ", ".join(f"{t}[{p}]" for t, p in keys))
            committed = {(tp.topic, tp.partition): (tp.offset if tp.offset >= 0 else None)
                         for tp in consumer.committed(parts, timeout=30)}
            starts = self.stage.on_assign(keys, committed)
            if not starts and not manual:  # every partition starts at its committed offset: the automatic assignment
                self.ready.set()
                return
            for tp, key in zip(parts, keys, strict=True):
                floor = committed.get(key)
                if key in starts:
                    tp.offset = starts[key]
                    if floor is not None:
                        self._floor[key] = floor
                elif manual:
                    tp.offset = floor if floor is not None else OFFSET_BEGINNING
            # assigning inside the callback replaces the automatic assignment (at the committed offsets)
            if self._cooperative:
                consumer.incremental_assign(parts)
            else:
                consumer.assign(parts)
        self.ready.set()

    def _on_revoke(self, consumer: Consumer, parts: list[TopicPartition]) -> None:
        self.commit()  # before partitions are taken away, commit what was processed from them
        keys = [(tp.topic, tp.partition) for tp in parts]
        for key in keys:
            self._floor.pop(key, None)
        self.assigned = sorted(set(self.assigned) - set(keys))
        self.stage.on_revoke(keys)

    def _hold(self) -> None:
        """Stay in the group without consuming while ``paused`` is set (backpressure, benchmarks)."""
        while self.paused.is_set() and not self._stop.is_set():
            # pause what is assigned *now*: partitions the group assigns during the hold must stay
            # paused too, and a message consumed before its partition was paused is put back (seek),
            # never dropped (it would otherwise be skipped, and committed past, when the hold ends)
            self._consumer.pause(self._consumer.assignment())
            for m in self._consumer.consume(1, 0.1):  # also serves the rebalance callbacks
                topic, partition, offset = m.topic(), m.partition(), m.offset()
                if m.error() is None and topic is not None and partition is not None and offset is not None:
                    self._consumer.seek(TopicPartition(topic, partition, offset))
        self._consumer.resume(self._consumer.assignment())

    def run_once(self) -> int:
        """Consume, process and produce one batch, committing when the cadence is due; returns its size."""
        self.subscribe()
        batch = self._gather()
        if batch:
            started = time.perf_counter()
            self._dirty = True
            result = self._handle_slow(batch) if self.stage.slow else self.stage.handle(batch)
            fused = self._hand_over(result) if self.fused else (0, 0)
            self._produce(result)
            for m in batch:
                self._uncommitted[(m.topic, m.partition)] = m.offset + 1
            self._dirty = False
            self._account(batch, result, time.perf_counter() - started, fused)
            self._guard(batch, result)
        else:
            self._producer.poll(0)
        if time.monotonic() - self._last_commit >= self.commit_every_s:
            self.commit()
        return len(batch)

    def _gather(self) -> list[Message]:
        """One consume call; for a stage that counts units per message (``Stage.max_units`` above 0), more calls
        until it has ``max_units`` or ``max_wait_ms`` passed since the first (a micro-batch of micro-batches)."""
        started = time.monotonic()
        batch = self._messages(self._consumer.consume(self.max_batch, self.max_wait_s))
        want = self.stage.max_units
        if want <= 0 or not batch:
            return batch
        units = self.stage.units
        have = sum(map(units, batch))
        while have < want and (left := self.max_wait_s - (time.monotonic() - started)) > 0:
            more = self._messages(self._consumer.consume(self.max_batch, left))
            batch += more
            have += sum(map(units, more))
        return batch

    def commit(self) -> None:
        """Flush the producer (every record acknowledged, or raise), then commit what was processed."""
        self._last_commit = time.monotonic()
        if self._last_commit - self._lag_measured >= 1.0:
            self._measure_lag()
        if not self._uncommitted:
            return
        flush_or_raise(self._producer, self._tracker)
        done = self._uncommitted
        self._uncommitted = {}
        if self._floor:  # a replaying partition: never commit below what the group had committed
            for key, floor in list(self._floor.items()):
                if key in done and done[key] <= floor:
                    del done[key]
                elif key in done:
                    del self._floor[key]
        if done:
            try:
                self._consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in done.items()],
                                      asynchronous=False)
            except KafkaException as exc:
                if exc.args[0].code() not in REBALANCE_ERRORS:
                    raise
                log.warning("stage %s: commit lost to a rebalance (%s); those batches will be re-delivered",
                            self.stage.step_id, exc.args[0].name())
                return
        self.stats.last_commit_ts = time.time()
        self.stats.committed.update(done)
        if not self._dirty:
            self.stage.after_commit(done)

    def _measure_lag(self) -> None:
        """Per assigned partition, the messages between this runner's position and the high watermark the
        broker reported in its last fetch response (librdkafka's cached value: no request)."""
        self._lag_measured = time.monotonic()
        lag: dict[tuple[str, int], int] = {}
        try:
            for tp in self._consumer.position(self._consumer.assignment()):
                _, high = self._consumer.get_watermark_offsets(tp, cached=True)
                if high >= 0 and tp.offset >= 0:
                    lag[(tp.topic, tp.partition)] = max(0, high - tp.offset)
        except KafkaException:
            return  # mid-rebalance: keep the last figures
        self.stats.lag = lag

    def _guard(self, batch: list[Message], result: StepResult) -> None:
        """Count the batch in the DLQ guard; when it trips, commit what was processed, then raise."""
        if self.dlq_guard is None:
            return
        guard = self.dlq_guard
        pause = min(self.guard_pause_max_s, self.guard_pause_s * 2 ** self.guard_trips)
        try:
            guard.observe(self.stage.step_id, len(batch), result.rejected, pause_s=pause)
        except DlqRatioExceeded:
            self.commit()  # outputs and dead letters acknowledged, offsets committed: nothing lost
            raise
        if self.guard_trips and guard.seen >= guard.window:  # a whole window under the limit: the input is good
            self.guard_trips = 0

    def _handle_slow(self, batch: list[Message]) -> StepResult:
        """Run a long ``handle`` (e.g. training) in a helper thread while this one keeps the
        consumer alive in its group (partitions paused, so nothing new is consumed meanwhile)."""
        done: list[StepResult] = []
        failed: list[BaseException] = []

        def work() -> None:
            try:
                done.append(self.stage.handle(batch))
            except BaseException as exc:
                failed.append(exc)

        worker = threading.Thread(target=work, name=f"stage-{self.stage.step_id}-work", daemon=True)
        worker.start()
        self._consumer.pause(self._consumer.assignment())
        try:
            while worker.is_alive():
                self._consumer.consume(1, 0.2)  # paused: yields nothing, keeps the member alive
                worker.join(0.01)
        finally:
            self._consumer.resume(self._consumer.assignment())
        if failed:
            raise failed[0]
        return done[0]

    def _messages(self, raw: list) -> list[Message]:  # type: ignore[type-arg]
        out: list[Message] = []
        for m in raw:
            err = m.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("stage %s consume error: %s", self.stage.step_id, err)
                continue
            h = m.headers()
            headers = tuple((k, v or b"") for k, v in h) if h else ()
            out.append(Message(m.topic(), m.partition(), m.offset(), m.key(), m.value(), m.timestamp()[1], headers))
        return out

    def _hand_over(self, result: StepResult) -> tuple[int, int]:
        """Give what ``result`` produces to a fused stage's topic straight to that stage, in memory, and add its
        outputs and refusals to ``result``; returns how many of each it added. The records are still produced
        (the topic stays the log of record); this runner's commit covers both stages' outputs."""
        produced = rejected = 0
        now_ms = int(time.time() * 1000)
        handed: dict[str, list[Message]] = {}
        for rec in result.produce:
            if rec.topic in self.fused:
                partition = -1 if rec.partition is None else rec.partition
                handed.setdefault(rec.topic, []).append(
                    Message(rec.topic, partition, -1, rec.key, rec.value, now_ms, rec.headers))
        for topic, messages in handed.items():
            for stage in self.fused[topic]:
                started = time.perf_counter()
                out = stage.handle(messages)
                result.produce.extend(out.produce)
                result.rejected.extend(out.rejected)
                self.fused_stats[stage.step_id].count_batch(len(messages), len(out.produce), len(out.rejected),
                                                            time.perf_counter() - started)
                produced += len(out.produce)
                rejected += len(out.rejected)
        return produced, rejected

    def _produce(self, result: StepResult) -> None:
        now_ms = int(time.time() * 1000)
        records = result.produce + [dead_letter(self.stage.step_id, r, now_ms) for r in result.rejected]
        for i, rec in enumerate(records):
            if rec.partition is None:
                self._producer.produce(rec.topic, rec.value, rec.key, headers=list(rec.headers) or None)
            else:
                self._producer.produce(
                    rec.topic, rec.value, rec.key, partition=rec.partition, headers=list(rec.headers) or None
                )
            if i % 10_000 == 9_999:
                self._producer.poll(0)

    def _account(self, batch: list[Message], result: StepResult, busy: float, fused: tuple[int, int]) -> None:
        """Count the batch; ``fused``: the records and refusals of fused stages in ``result`` (theirs)."""
        s = self.stats
        s.count_batch(len(batch), len(result.produce) - fused[0], len(result.rejected) - fused[1], busy)
        now_ms = time.time() * 1000 - busy * 1000
        s.lag_ms_sum += now_ms * len(batch) - sum(m.timestamp_ms for m in batch)
        for topic, n in Counter(m.topic for m in batch).items():
            s.by_topic[topic] = s.by_topic.get(topic, 0) + n
