"""Features: per-entity windowed aggregates into the online store, the feature log, and on to scoring.

Inputs: the ``weir.<project>.silver.<source>`` micro-batches of every source a feature
view reads or a model scores; the views are the project's declarations
(:class:`~streams.features.definitions.FeatureView`), compiled by
:mod:`streams.features.engine`. For each batch it feeds the events in
partition order, appends one feature-log row per accepted event (the entity's
values as of that event's time) to ``weir.feature_log`` (the ClickHouse sink
writes it), writes each touched entity's newest values to Redis (one pipelined
round trip), and forwards the events of a scored source to
``weir.<project>.scoring.<source>`` on the same partition, each carrying the values of
the views over its own source (``served``), which inference uses, so serving
and the training set agree per event. Redis is written before the events are
forwarded, so inference's reads of the other views are at least as new as the
batch.

**State and recovery.** Ingest partitions each silver topic by the
source's partition key, the key of every view over it, so every entity's
events are in one partition and the window state is partition-local: one
:class:`FeatureComputer` per input (topic, partition), a function of that
partition's log alone, and the unit of state the runtime's recovery protocol
(:mod:`streams.recovery`) snapshots, restores and replays. Replayed messages
(below the committed offset) update the windows and nothing else (no Redis
write, no feature-log or scoring record, no dead letter), because they were
processed and committed before; so after a crash (kill -9 included) or a
handoff to another worker, the values and watermarks equal those of an
uninterrupted run. Replay costs time proportional to the log since the
snapshot: without one that is the whole log (the embedded broker keeps every
record in memory; on a real Kafka, the topic's retention). Memory stays
bounded by the windows (at most 1 h of event time per entity, idle entities
evicted after the view's TTL).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sinks.redis_store import OnlineStore
from streams import topics as T
from streams.base import InvalidEvent, Message, Produce, Reason, Rejected, StepResult
from streams.codec import AvroCodec, DecodeError
from streams.features.aggregations import SnapshotError, Status
from streams.features.definitions import FeatureView, view_key
from streams.features.engine import ViewState
from streams.project.contracts import scoring_topic, silver_topic
from streams.project.spec import Project
from streams.recovery import Admit, StatefulStage
from streams.state import SignedSnapshots, StateError

log = logging.getLogger(__name__)

Touched = dict[str, tuple[int, str, list[float]]]  # entity -> (event ts, last event id, values)
LogRow = tuple[FeatureView, str, str, int, list[float]]  # view, entity, event id, as-of ts, values after it
TopicPartition = tuple[str, int]

LOG_BATCH_ROWS = 4000  # feature-log rows per message: ~200 KB, well under the broker's 1 MB limit


class FeatureComputer:
    """The pure part: one :class:`~streams.features.engine.ViewState` per feature view. No I/O.

    ``add`` feeds one source record to every view computed from its topic and
    returns, per view that accepted it, the entity's values right after it, as
    of the record's own event time (an out-of-order record sees nothing later
    than itself): what serving gets for a scored event and what the feature log
    records. ``current`` gives an entity's values as of its newest event, what
    the online store holds. Both depend only on the order of the entity's
    events, never on how they were batched.
    """

    def __init__(self, views: Sequence[FeatureView], states: Sequence[ViewState] | None = None) -> None:
        """Empty states for ``views``, or the given ``states`` (restored ones)."""
        built = states if states is not None else [ViewState(view) for view in views]
        self.states = {state.view.name: state for state in built}
        self._by_source: dict[str, list[ViewState]] = {}
        for state in built:
            self._by_source.setdefault(state.view.source, []).append(state)

    def add(self, source: str, item: Mapping[str, Any], *, values: bool = True) -> list[LogRow]:
        """Feed a record of the source named ``source``; ``values`` False (replay): update the state only."""
        rows: list[LogRow] = []
        for state in self._by_source.get(source, ()):
            if state.add(item) is Status.ACCEPTED and values:
                key = item[state.view.entity]
                got = state.values(key, at=item["ts_ms"])
                if got is not None:
                    rows.append((state.view, key, item["event_id"], got[0], got[1]))
        return rows

    def current(self, view: FeatureView, key: str) -> tuple[int, list[float]] | None:
        """``key`` 's values in ``view`` as of its newest accepted event, with that event's time."""
        return self.states[view.name].values(key)

    def latest(self, rows: list[LogRow], into: dict[FeatureView, Touched] | None = None
               ) -> dict[FeatureView, Touched]:
        """Each entity of ``rows`` → (newest event time, last event id in ``rows``, values as of it), per view."""
        out: dict[FeatureView, Touched] = {} if into is None else into
        last_ids = {(view, key): event_id for view, key, event_id, _, _ in rows}  # one query per entity
        for (view, key), event_id in last_ids.items():
            got = self.current(view, key)
            if got is not None:
                out.setdefault(view, {})[key] = (got[0], event_id, got[1])
        return out

    @property
    def refused(self) -> tuple[int, int]:
        """(late, duplicate) events refused so far, over all views."""
        return (sum(s.late for s in self.states.values()), sum(s.duplicates for s in self.states.values()))

    def state(self) -> list[tuple[str, bytes]]:
        """What a snapshot holds: (view name, :meth:`ViewState.snapshot`) per view."""
        return [(name, s.snapshot()) for name, s in self.states.items()]

    @classmethod
    def from_state(cls, state: Any, views: Sequence[FeatureView]) -> FeatureComputer:
        """The inverse of :meth:`state`; raises :class:`SnapshotError` on anything else."""
        if not (isinstance(state, list) and [n for n, _ in state] == [v.name for v in views]):
            raise SnapshotError("snapshot does not hold these feature views")
        return cls(views, [ViewState.restore(view, blob) for view, (_, blob) in zip(views, state, strict=True)])


def snapshot_definition(views: Sequence[FeatureView]) -> bytes:
    """What the state means: the feature views' definitions (a changed view invalidates the snapshots)."""
    return ("features:" + ":".join(v.fingerprint for v in views)).encode()


@dataclass(frozen=True, slots=True)
class _Input:
    """One input topic: the source it carries, its decoder, and where its events go on to be scored."""

    source: str
    key: str  # the source's partition key: every view over it is keyed by it
    codec: AvroCodec
    scoring: tuple[str, AvroCodec] | None


class FeaturesStage(StatefulStage):
    """The features stage: see the module docstring for what it writes and how it recovers.

    ``project`` gives the views and the sources; ``rename`` maps one of the project's topic names
    (``weir.<project>.silver.<source>``, ``…scoring.<source>``, ``…feature_log``) to the one
    actually used (tests run on topics of their own).
    ``snapshots`` None: no checkpoints, every assignment of a partition that has a
    committed offset replays its log from the beginning (correct, slower).
    ``clock`` is the clock checkpoints are paced by (seconds, monotonic).
    ``after_commit_hook`` runs after every successful commit (the pipeline passes a
    :class:`~streams.gcpolicy.StateFreezer`).
    """

    step_id = "features"
    by_partition = True  # a unit per input partition: its entities' windows

    def __init__(self, project: Project, store: OnlineStore, *, snapshots: SignedSnapshots | None = None,
                 checkpoint_every_s: float = 5.0, clock: Callable[[], float] = time.monotonic,
                 rename: Mapping[str, str] | None = None,
                 after_commit_hook: Callable[[], None] | None = None) -> None:
        super().__init__(snapshots, checkpoint_every_s=checkpoint_every_s, clock=clock)
        self.store = store
        self.views = project.views
        self.definition = snapshot_definition(self.views)
        self._after_commit_hook = after_commit_hook
        names = dict(rename or {})
        scored = {m.source for m in project.models}
        self._inputs: dict[str, _Input] = {}  # input topic -> what it carries
        for source in project.sources:
            if source.name not in scored and not any(v.source == source.name for v in self.views):
                continue
            out = scoring_topic(project, source)
            scoring = (names.get(out, out), AvroCodec(out)) if source.name in scored else None
            topic = silver_topic(project, source)
            self._inputs[names.get(topic, topic)] = _Input(source.name, source.partition_key, AvroCodec(topic),
                                                           scoring)
        self.topics: tuple[str, ...] = tuple(self._inputs)
        self.scoring_topics = tuple(i.scoring[0] for i in self._inputs.values() if i.scoring is not None)
        self.partitions: dict[TopicPartition, FeatureComputer] = {}  # the state of each input partition
        self.late = self.duplicates = 0  # events the views refused (outside replay), for tests and metrics
        log_topic = T.internal(project, T.I_FEATURE_LOG)
        self._log_topic = names.get(log_topic, log_topic)
        self._log = AvroCodec(T.I_FEATURE_LOG)

    def handle(self, batch: list[Message]) -> StepResult:
        result = StepResult()
        rows_of: dict[TopicPartition, list[LogRow]] = {}  # the rows of each partition's computer
        late, duplicates = self._refused()
        for msg in batch:
            admitted = self.admit(msg)
            if admitted is Admit.SEEN:
                continue
            replay = admitted is Admit.REPLAY
            computer = self.partitions.get((msg.topic, msg.partition))
            if computer is None:  # handled without on_assign (a test driving the stage): an empty state
                computer = self.partitions[(msg.topic, msg.partition)] = FeatureComputer(self.views)
            source = self._inputs[msg.topic]
            try:
                record = source.codec.decode(msg.value)
            except DecodeError as exc:
                if not replay:  # a replayed one was dead-lettered the first time
                    result.rejected.append(Rejected(msg, exc))
                continue
            items = record["items"]
            if any(not item.get(source.key) for item in items):  # not ingest's: it never emits one
                if not replay:
                    result.rejected.append(Rejected(msg, InvalidEvent(
                        Reason.MISSING_FIELD, f"an event without its key {source.key!r}: the views are keyed by it")))
                continue
            if replay:
                for item in items:
                    computer.add(source.source, item, values=False)
                continue
            rows = rows_of.setdefault((msg.topic, msg.partition), [])
            for item in items:
                got = computer.add(source.source, item)
                rows.extend(got)
                if source.scoring is not None:  # serving uses the values as of this event, as logged
                    item["served"] = {view_key(view): values for view, _, _, _, values in got} or None
            if source.scoring is not None:
                topic, codec = source.scoring
                result.produce.append(Produce(topic, None, codec.encode({"items": items}), partition=msg.partition))
        last: dict[FeatureView, Touched] = {}
        for tp, rows in rows_of.items():
            self.partitions[tp].latest(rows, last)
        for view, entities in last.items():
            self.store.write(view, ((k, ts, v) for k, (ts, _, v) in entities.items()))
        # Redis first, then forward: the scoring records must come after the writes.
        per_view: dict[FeatureView, list[LogRow]] = {}
        for rows in rows_of.values():
            for row in rows:
                per_view.setdefault(row[0], []).append(row)
        result.produce[:0] = [self._log_batch(view, view_rows[i:i + LOG_BATCH_ROWS])
                              for view, view_rows in per_view.items()
                              for i in range(0, len(view_rows), LOG_BATCH_ROWS)]
        self._report_refused(late, duplicates)
        return result

    def _refused(self) -> tuple[int, int]:
        counts = [c.refused for c in self.partitions.values()]
        return sum(c[0] for c in counts), sum(c[1] for c in counts)

    def _report_refused(self, late_before: int, duplicates_before: int) -> None:
        """Count (and log) events the views refused in this batch: they stay in silver and are still scored,
        but do not enter the windows."""
        late, duplicates = self._refused()
        if late > late_before or duplicates > duplicates_before:
            self.late += late - late_before
            self.duplicates += duplicates - duplicates_before
            log.warning("features: %d late and %d duplicate events left out of the windows (totals %d, %d)",
                        late - late_before, duplicates - duplicates_before, self.late, self.duplicates)

    # --- the units of state of the recovery protocol (streams.recovery): one per input partition ---

    def unit_of(self, tp: TopicPartition) -> str:
        return f"features:{tp[0]}:{tp[1]}"

    @staticmethod
    def _partition(unit: str) -> TopicPartition:
        topic, partition = unit.removeprefix("features:").rsplit(":", 1)
        return topic, int(partition)

    def dump_unit(self, unit: str) -> Any:
        computer = self.partitions.get(self._partition(unit))
        return (computer or FeatureComputer(self.views)).state()

    def load_unit(self, unit: str, state: Any | None) -> None:
        try:
            computer = FeatureComputer(self.views) if state is None else FeatureComputer.from_state(state, self.views)
        except SnapshotError as exc:
            raise StateError(str(exc)) from exc
        self.partitions[self._partition(unit)] = computer

    def drop_unit(self, unit: str) -> None:
        self.partitions.pop(self._partition(unit), None)

    def after_commit(self, offsets: dict[TopicPartition, int]) -> None:
        if self._after_commit_hook is not None:
            self._after_commit_hook()
        super().after_commit(offsets)

    def _log_batch(self, view: FeatureView, rows: list[LogRow]) -> Produce:
        record = {
            "view": view_key(view), "n_features": len(view.features),
            "entity_ids": [r[1] for r in rows], "event_ids": [r[2] for r in rows], "ts_ms": [r[3] for r in rows],
            "values": [x for r in rows for x in r[4]],
        }
        return Produce(self._log_topic, None, self._log.encode(record))
