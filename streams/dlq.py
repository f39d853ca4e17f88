"""The dead-letter queues: look at them, re-send their records, and stop a stage that fills them.

Every stage's refused input goes to ``dlq.<topic>`` (:func:`streams.runtime.dead_letter`): the
original key, bytes and headers, plus ``weir.reason``, ``weir.detail``, ``weir.stage``,
``weir.topic``, ``weir.partition``, ``weir.offset`` and ``weir.time`` headers. This module is the
operator's side of that:

- :func:`inspect` / ``weir dlq inspect`` reads a DLQ without changing anything (no consumer group).
- :func:`replay` / ``weir dlq replay`` re-produces dead letters to the topic they came from, once
  the bug that refused them is fixed.
- :class:`DlqGuard` stops a :class:`~streams.runtime.BatchRunner` when most of its recent input
  goes to the DLQ: a bad deploy upstream (or of the stage itself) would otherwise quietly move the
  whole stream into the DLQ.

Readers use ``assign()`` and ``enable.partition.eof`` to know where each partition ends: the
embedded broker's ListOffsets is wrong (docs/runtime.md), fetch responses are right. Payload bytes are
never logged or printed unless asked (``--show-payload``): they may hold personal data.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer, TopicPartition

from streams.base import Reason, Rejected
from streams.kafka import DeliveryTracker, consumer_config, flush_or_raise, producer_config
from streams.stack import EndpointNotFound, endpoint

log = logging.getLogger(__name__)

DLQ_PREFIX = "dlq."
WEIR_HEADER = "weir."
REPLAYED_FROM = "weir.replayed_from"
DEFAULT_REPLAY_GROUP = "weir-dlq-replay"
PREVIEW_BYTES = 64


class DlqError(Exception):
    """A DLQ command cannot run as asked (no bootstrap, no such topic, broker unreachable)."""


# ---------------------------------------------------------------------------------------------
# reading


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One record of a ``dlq.<topic>``. ``repr`` leaves the value and headers out (personal data).

    ``topic``/``partition``/``offset`` locate the original input message; ``dlq_*`` the dead
    letter itself. Header values the runtime did not write read as ``""`` or ``-1``.
    """

    dlq_topic: str
    dlq_partition: int
    dlq_offset: int
    reason: str
    detail: str
    stage: str
    topic: str
    partition: int
    offset: int
    time_ms: int  # when the runtime dead-lettered it (wall clock of the stage), -1 if unknown
    key: bytes | None
    size: int  # bytes in ``value``
    value: bytes | None = field(repr=False)
    headers: tuple[tuple[str, bytes], ...] = field(default=(), repr=False)  # the original's, no weir.*
    replayed_from: str | None = None  # set when this record failed again after a replay

    @property
    def time(self) -> datetime | None:
        """``time_ms`` as an aware UTC datetime."""
        return None if self.time_ms < 0 else datetime.fromtimestamp(self.time_ms / 1000, UTC)


def dlq_topic_name(topic: str) -> str:
    """``dlq.x`` for ``x`` or ``dlq.x``.

    >>> dlq_topic_name("clickstream.events"), dlq_topic_name("dlq.clickstream.events")
    ('dlq.clickstream.events', 'dlq.clickstream.events')
    """
    return topic if topic.startswith(DLQ_PREFIX) else DLQ_PREFIX + topic


def _int(raw: bytes | None) -> int:
    try:
        return int(raw) if raw else -1
    except ValueError:
        return -1


def _text(raw: bytes | None) -> str:
    return raw.decode("utf-8", "backslashreplace") if raw else ""


def parse_dead_letter(
    topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None,
    headers: Iterable[tuple[str, bytes | None]],
) -> DeadLetter:
    """A :class:`DeadLetter` from a DLQ record's parts; tolerant of missing or odd headers."""
    weir: dict[str, bytes] = {}
    original: list[tuple[str, bytes]] = []
    for name, raw in headers:
        if name.startswith(WEIR_HEADER):
            weir[name] = raw or b""  # the runtime appends its headers after the original's: last wins
        else:
            original.append((name, raw or b""))
    source = _text(weir.get("weir.topic")) or topic.removeprefix(DLQ_PREFIX)
    return DeadLetter(
        dlq_topic=topic, dlq_partition=partition, dlq_offset=offset,
        reason=_text(weir.get("weir.reason")), detail=_text(weir.get("weir.detail")),
        stage=_text(weir.get("weir.stage")), topic=source,
        partition=_int(weir.get("weir.partition")), offset=_int(weir.get("weir.offset")),
        time_ms=_int(weir.get("weir.time")), key=key, size=len(value or b""), value=value,
        headers=tuple(original), replayed_from=_text(weir.get(REPLAYED_FROM)) or None,
    )


def _from_kafka(msg: Any) -> DeadLetter:
    return parse_dead_letter(msg.topic(), msg.partition(), msg.offset(), msg.key(), msg.value(),
                             msg.headers() or ())


def _partitions(consumer: Consumer, topic: str) -> list[int]:
    """The partitions of an existing ``topic``; never creates it (a metadata request for one
    topic makes the embedded broker create it, so this lists them all)."""
    try:
        meta = consumer.list_topics(timeout=10)
    except KafkaException as exc:
        raise DlqError(f"cannot reach Kafka ({exc.args[0].str()}); is `weir up` running?") from exc
    if topic not in meta.topics:
        known = sorted(t for t in meta.topics if t.startswith(DLQ_PREFIX))
        raise DlqError(f"topic {topic} does not exist; dead-letter topics: {', '.join(known) or 'none'}")
    return sorted(meta.topics[topic].partitions)


def _drain(consumer: Consumer, topic: str, partitions: Sequence[int], idle_timeout_s: float) -> Iterator[Any]:
    """Yield the assigned partitions' messages until each has reported its end once.

    Records that arrive after a partition's end are not yielded, so a reader of a DLQ that a
    running stage keeps appending to (a replay whose records fail again) still finishes.
    """
    done: set[int] = set()
    last_progress = time.monotonic()
    while len(done) < len(partitions):
        batch = consumer.consume(1000, 0.1)
        if batch:
            last_progress = time.monotonic()
        elif time.monotonic() - last_progress > idle_timeout_s:
            raise DlqError(f"{topic}: no data and no end-of-partition within {idle_timeout_s:.0f}s "
                           f"(partitions still open: {sorted(set(partitions) - done)})")
        for msg in batch:
            err = msg.error()
            if err is not None:
                part = msg.partition()
                if err.code() == KafkaError._PARTITION_EOF and part is not None:
                    done.add(part)
                elif err.fatal():
                    raise KafkaException(err)
                else:  # transient (a disconnect): librdkafka retries; the idle timeout catches a stall
                    log.warning("%s [%s]: %s", topic, msg.partition(), err)
                continue
            if msg.partition() not in done:
                yield msg


def scan(bootstrap: str, dlq_topic: str, *, idle_timeout_s: float = 30.0) -> Generator[DeadLetter, None, None]:
    """Every dead letter in ``dlq_topic`` (``x`` or ``dlq.x``) present when each partition is
    reached, in offset order per partition. Read-only: no consumer group, nothing committed.
    Close the iterator (or exhaust it) to release the consumer."""
    topic = dlq_topic_name(dlq_topic)
    consumer = Consumer(consumer_config(bootstrap, "weir-dlq-inspect", **{"enable.partition.eof": True}))
    try:
        parts = _partitions(consumer, topic)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        for msg in _drain(consumer, topic, parts, idle_timeout_s):
            yield _from_kafka(msg)
    finally:
        consumer.close()


def inspect(bootstrap: str, dlq_topic: str, *, limit: int | None = 50, reason: str | None = None) -> list[DeadLetter]:
    """The first ``limit`` dead letters (``None``: all) of ``dlq_topic`` with ``reason`` (``None``:
    any), oldest first per partition. Read-only: it reads from the beginning with ``assign()``
    and commits nothing, so it never disturbs a replay's position."""
    want = _reason(reason)
    with closing(scan(bootstrap, dlq_topic)) as letters:
        matching = (d for d in letters if want is None or d.reason == want)
        return list(matching if limit is None else islice(matching, limit))


def _reason(reason: str | None) -> str | None:
    """A reason as its header text (``Reason.LATE`` and ``"late"`` alike)."""
    return None if reason is None else str(getattr(reason, "value", reason))


# ---------------------------------------------------------------------------------------------
# replay


@dataclass
class ReplayReport:
    """What a replay did (or, with ``dry_run``, would do)."""

    dlq_topic: str
    group: str
    dry_run: bool
    replayed: int = 0
    skipped: int = 0  # read but left out by the reason filter
    by_reason: dict[str, int] = field(default_factory=dict)  # every dead letter read
    by_topic: dict[str, int] = field(default_factory=dict)  # replayed, per original topic


def replay_group(group: str, reason: str | None) -> str:
    """The consumer group that holds a replay's position: one per reason filter, so replaying
    reason A first does not move past the records of reason B.

    >>> replay_group("weir-dlq-replay", None), replay_group("weir-dlq-replay", "late")
    ('weir-dlq-replay', 'weir-dlq-replay.late')
    """
    return group if reason is None else f"{group}.{reason}"


def replay(
    bootstrap: str,
    dlq_topic: str,
    *,
    reason: str | None = None,
    dry_run: bool = False,
    group: str = DEFAULT_REPLAY_GROUP,
    from_beginning: bool = False,
    progress: bool | None = None,
    commit_every: int = 10_000,
    idle_timeout_s: float = 30.0,
) -> ReplayReport:
    """Re-produce the dead letters of ``dlq_topic`` to the topics they came from.

    Each record goes back with its original key, value bytes and non-``weir.*`` headers plus
    ``weir.replayed_from = dlq.<t>:<partition>:<offset>``, to its original partition when the
    topic still has it. The DLQ itself is left as it is (a log); the position lives in the
    consumer group :func:`replay_group` (``group``, plus ``.<reason>`` when filtered), read with
    ``assign()`` (no group join) and committed only after the producer flushed with every record
    acknowledged (``RuntimeError`` otherwise, nothing committed), every ``commit_every`` records
    and at the end. So a second replay continues where the first stopped and sends nothing twice;
    a crash between flush and commit re-sends that chunk (at-least-once: stages dedup on event id).
    Records that do not match ``reason`` are passed over, and the position moves past them for
    this filter only. ``from_beginning`` re-reads the whole DLQ. ``dry_run`` counts and sends and
    commits nothing. A replay stops at the end each partition had when reached, so records that
    fail again while it runs wait for the next replay. ``progress``: a tqdm bar on stderr
    (``None``: only when stderr is a terminal).
    """
    topic = dlq_topic_name(dlq_topic)
    want = _reason(reason)
    report = ReplayReport(topic, replay_group(group, want), dry_run)
    consumer = Consumer(consumer_config(bootstrap, report.group, **{"enable.partition.eof": True}))
    tracker = DeliveryTracker()
    producer = Producer(producer_config(bootstrap), on_delivery=tracker)
    bar = _progress_bar(topic, progress)
    try:
        parts = _partitions(consumer, topic)
        targets = _topic_partitions(consumer)
        consumer.assign(_start_offsets(consumer, topic, parts, from_beginning))
        pending: dict[int, int] = {}  # dlq partition -> next offset, read but not yet committed

        def checkpoint() -> None:
            if dry_run or not pending:
                return
            flush_or_raise(producer, tracker)
            consumer.commit(offsets=[TopicPartition(topic, p, o) for p, o in pending.items()], asynchronous=False)
            pending.clear()

        since_commit = 0
        for msg in _drain(consumer, topic, parts, idle_timeout_s):
            letter = _from_kafka(msg)
            report.by_reason[letter.reason] = report.by_reason.get(letter.reason, 0) + 1
            if want is not None and letter.reason != want:
                report.skipped += 1
            else:
                if letter.topic not in targets:
                    checkpoint()  # what was sent so far stays sent
                    raise DlqError(f"{letter.dlq_topic}:{letter.dlq_partition}:{letter.dlq_offset}: its topic "
                                   f"{letter.topic!r} does not exist; replayed {report.replayed} before it")
                if not dry_run:
                    _send(producer, letter, targets[letter.topic])
                report.replayed += 1
                report.by_topic[letter.topic] = report.by_topic.get(letter.topic, 0) + 1
                since_commit += 1
                if bar is not None:
                    bar.update(1)
            pending[letter.dlq_partition] = letter.dlq_offset + 1
            if since_commit >= commit_every:
                checkpoint()
                since_commit = 0
        checkpoint()
    finally:
        if bar is not None:
            bar.close()
        consumer.close()
    return report


def _progress_bar(topic: str, progress: bool | None) -> Any:
    if progress is None:
        progress = sys.stderr.isatty()
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(desc=f"replaying {topic}", unit="rec", file=sys.stderr)


def _topic_partitions(consumer: Consumer) -> dict[str, int]:
    return {name: len(meta.partitions) for name, meta in consumer.list_topics(timeout=10).topics.items()}


def _start_offsets(consumer: Consumer, topic: str, parts: Sequence[int], from_beginning: bool) -> list[TopicPartition]:
    if from_beginning:
        return [TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts]
    committed = consumer.committed([TopicPartition(topic, p) for p in parts], timeout=10)
    return [TopicPartition(topic, tp.partition, tp.offset if tp.offset >= 0 else OFFSET_BEGINNING)
            for tp in committed]


def _send(producer: Producer, letter: DeadLetter, partitions: int) -> None:
    origin = f"{letter.dlq_topic}:{letter.dlq_partition}:{letter.dlq_offset}"
    headers: list[tuple[str, str | bytes | None]] = [*letter.headers, (REPLAYED_FROM, origin.encode())]
    if 0 <= letter.partition < partitions:
        producer.produce(letter.topic, letter.value, letter.key, partition=letter.partition, headers=headers)
    else:  # the topic shrank or the header is missing: the key decides, as it did for the producer
        producer.produce(letter.topic, letter.value, letter.key, headers=headers)
    producer.poll(0)


# ---------------------------------------------------------------------------------------------
# the ratio guard


class DlqRatioExceeded(RuntimeError):
    """Too much of a stage's recent input went to the DLQ; the message says what to do."""

    def __init__(self, stage: str, rejected: int, seen: int, max_ratio: float,
                 top: Sequence[tuple[tuple[str, str], int]], duplicates: int = 0, pause_s: float = 0.0) -> None:
        self.stage, self.rejected, self.seen, self.max_ratio = stage, rejected, seen, max_ratio
        self.duplicates, self.pause_s = duplicates, pause_s
        self.top = list(top)  # ((topic, reason), count), most frequent first
        reasons = ", ".join(f"{reason} from {topic}: {n}" for (topic, reason), n in self.top)
        first_topic, first_reason = self.top[0][0] if self.top else ("<topic>", "")
        inspect_cmd = f"weir dlq inspect {dlq_topic_name(first_topic)}" + (f" --reason {first_reason}" if first_reason else "")
        topics = sorted({t for (t, _), _n in self.top})
        replays = "; ".join(f"weir dlq replay {dlq_topic_name(t)}" for t in topics) or "weir dlq replay dlq.<topic>"
        super().__init__(
            f"stage {stage} paused for {pause_s:.0f} s: {rejected} of its last {seen} input messages went to the "
            f"dead-letter queue ({rejected / seen:.0%}, limit {max_ratio:.0%}). Top reasons: {reasons or 'none'} "
            f"(duplicates, expected after a producer or the CDC connector sent again, are not counted: "
            f"{duplicates} in the same messages). Only this stage pauses, and it resumes by itself: after a burst "
            f"of invalid records it goes on; if the input stays invalid it pauses again, each time twice as long. This "
            f"usually means a producer (or this stage) was deployed with a change that breaks the input. What was "
            f"processed is committed and the rejected records are in the DLQ: nothing is lost. To do: look "
            f"at them with `{inspect_cmd}`, fix or roll back the producer (or this stage), then send "
            f"them again with `{replays}`. Tune with WEIR_DLQ_MAX_RATIO / WEIR_DLQ_WINDOW / WEIR_DLQ_MIN_EVENTS / "
            f"WEIR_DLQ_PAUSE_S."
        )


class DlqGuard:
    """Trips when more than ``max_ratio`` of the last ``window`` input messages were dead-lettered.

    The window slides over whole batches: it holds the newest batches that together cover at
    least ``window`` messages (the oldest batch leaves once the rest cover ``window``), so it
    may hold up to one batch more than ``window``. Each :meth:`observe` is O(1) in the window
    size. It never trips while the window holds fewer than ``min_events`` messages (a restart
    on a few bad records is not a bad deploy). ``max_ratio >= 1`` or ``window == 0`` disables it.
    One guard per runner: it is stateful and not thread-safe.

    >>> g = DlqGuard(max_ratio=0.5, window=10, min_events=4)
    >>> g.add(5, {("t", "undecodable"): 3}); g.ratio
    0.6
    >>> g.tripped
    True
    """

    def __init__(self, max_ratio: float, window: int, min_events: int) -> None:
        if max_ratio < 0 or window < 0 or min_events < 0:
            raise ValueError("DlqGuard: max_ratio, window and min_events must not be negative")
        self.enabled = max_ratio < 1 and window > 0
        if self.enabled and min_events > window:
            raise ValueError(f"DlqGuard: min_events ({min_events}) > window ({window}) would never trip")
        self.max_ratio, self.window, self.min_events = max_ratio, window, min_events
        self._batches: deque[tuple[int, int, Counter[tuple[str, str]], int]] = deque()
        self.seen = 0  # input messages in the window
        self.rejected = 0  # of which dead-lettered
        self._reasons: Counter[tuple[str, str]] = Counter()  # (topic, reason) -> count in the window
        self.duplicates = 0  # of which duplicates: dead letters, but not counted as rejected

    @property
    def ratio(self) -> float:
        return self.rejected / self.seen if self.seen else 0.0

    @property
    def tripped(self) -> bool:
        return self.enabled and self.seen >= self.min_events and self.ratio > self.max_ratio

    def add(self, n_in: int, rejected: dict[tuple[str, str], int] | Counter[tuple[str, str]],
            duplicates: int = 0) -> None:
        """Count one batch of ``n_in`` input messages, ``rejected`` of them by (topic, reason), and
        ``duplicates`` more that were dead-lettered as duplicates (not counted as rejected)."""
        if not self.enabled or n_in <= 0:
            return
        counts = Counter(rejected)
        n_rej = sum(counts.values())
        self._batches.append((n_in, n_rej, counts, duplicates))
        self.seen += n_in
        self.rejected += n_rej
        self.duplicates += duplicates
        self._reasons.update(counts)
        while len(self._batches) > 1 and self.seen - self._batches[0][0] >= self.window:
            old_in, old_rej, old_counts, old_dups = self._batches.popleft()
            self.seen -= old_in
            self.rejected -= old_rej
            self.duplicates -= old_dups
            self._reasons.subtract(old_counts)
            for k in old_counts:
                if self._reasons[k] <= 0:
                    del self._reasons[k]

    def reset(self) -> None:
        """Forget the window (a paused stage starts counting afresh when it resumes)."""
        self._batches.clear()
        self.seen = self.rejected = self.duplicates = 0
        self._reasons.clear()

    def observe(self, stage: str, n_in: int, rejected: Sequence[Rejected], pause_s: float = 0.0) -> None:
        """Count a processed batch; raise :class:`DlqRatioExceeded` if the guard trips. Duplicates are dead
        letters but not bad input (a producer or the CDC connector sent again after a failure): they count as
        input, not as rejected."""
        if not self.enabled:
            return
        bad = Counter((r.message.topic, r.error.reason.value) for r in rejected if r.error.reason != Reason.DUPLICATE)
        self.add(n_in, bad, duplicates=len(rejected) - bad.total())
        if self.tripped:
            raise DlqRatioExceeded(stage, self.rejected, self.seen, self.max_ratio, self._reasons.most_common(3),
                                   duplicates=self.duplicates, pause_s=pause_s)


# ---------------------------------------------------------------------------------------------
# the command line


def resolve_bootstrap(explicit: str | None, data_dir: Path | None = None) -> str:
    """``explicit``, else ``kafka_bootstrap`` from ``<data_dir>/endpoints.json`` (``weir up``)."""
    try:
        return endpoint("kafka_bootstrap", explicit, flag="--bootstrap HOST:PORT", data_dir=data_dir)
    except EndpointNotFound as exc:
        raise DlqError(str(exc)) from None


def preview(value: bytes | None, limit: int = PREVIEW_BYTES) -> str:
    r"""At most ``limit`` bytes, printable ASCII as is and the rest escaped.

    >>> print(preview(b"ok\x00\xff" * 30, 8))
    ok\x00\xffok\x00\xff... (120 bytes)
    """
    if value is None:
        return "<null>"
    shown = repr(value[:limit])[2:-1]
    return shown + (f"... ({len(value)} bytes)" if len(value) > limit else "")


def _one_line(text: str, limit: int = 200) -> str:
    text = text.replace("\n", "\\n").replace("\r", "\\r")
    return text if len(text) <= limit else text[:limit] + "..."


def format_dead_letter(d: DeadLetter, *, show_payload: bool = False) -> str:
    """One line for a person: time, reason, stage, source coordinates, key, size, detail."""
    when = d.time.isoformat(timespec="milliseconds") if d.time else "?"
    key = "<null>" if d.key is None else preview(d.key)
    line = (f"{when} {d.reason or '?'} stage={d.stage or '?'} src={d.topic}:{d.partition}:{d.offset} "
            f"key={key} size={d.size}B detail={_one_line(d.detail)!s}")
    if d.replayed_from:
        line += f" replayed_from={d.replayed_from}"
    if show_payload:
        line += f"\n    payload: {preview(d.value)}"
    return line


def _cmd_inspect(args: argparse.Namespace, out: Callable[[str], None] = print) -> int:
    bootstrap = resolve_bootstrap(args.bootstrap)
    topic = dlq_topic_name(args.topic)
    want = _reason(args.reason)
    counts: Counter[str] = Counter()
    shown = 0
    with closing(scan(bootstrap, topic)) as letters:
        for d in letters:
            counts[d.reason or "?"] += 1
            if (want is None or d.reason == want) and (args.limit <= 0 or shown < args.limit):
                out(format_dead_letter(d, show_payload=args.show_payload))
                shown += 1
    total = sum(counts.values())
    out(f"{shown} shown of {total} dead letters in {topic}" + (f" (reason {want})" if want else "") + ".")
    for reason, n in counts.most_common():
        out(f"  {reason}: {n}")
    return 0


def _cmd_replay(args: argparse.Namespace, out: Callable[[str], None] = print) -> int:
    bootstrap = resolve_bootstrap(args.bootstrap)
    report = replay(bootstrap, args.topic, reason=args.reason, dry_run=args.dry_run,
                    from_beginning=args.from_beginning, progress=True if args.progress else None)
    verb = "would replay" if report.dry_run else "replayed"
    targets = ", ".join(f"{t}: {n}" for t, n in sorted(report.by_topic.items())) or "nothing"
    out(f"{verb} {report.replayed} dead letters from {report.dlq_topic} ({targets}); "
        f"{report.skipped} skipped by --reason; position kept in consumer group {report.group}.")
    for reason, n in sorted(report.by_reason.items(), key=lambda kv: -kv[1]):
        out(f"  {reason or '?'}: {n} read")
    return 0


def _handle(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except (DlqError, KafkaException, RuntimeError) as exc:
            print(f"weir dlq: error: {exc}", file=sys.stderr)
            return 1

    return run


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``dlq inspect`` and ``dlq replay`` to the ``weir`` command's subparsers.

    Each sets ``handler(args) -> int`` (the exit code) with ``set_defaults``.
    """
    dlq = sub.add_parser("dlq", help="look at and replay dead-letter queues")
    dlq_sub = dlq.add_subparsers(dest="dlq_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("topic", metavar="TOPIC", help="the DLQ, as dlq.<topic> or <topic>")
        p.add_argument("--bootstrap", default=None,
                       help="Kafka bootstrap servers (default: kafka_bootstrap in <WEIR_DATA_DIR>/endpoints.json)")
        p.add_argument("--reason", default=None, help="only dead letters with this weir.reason")

    i = dlq_sub.add_parser("inspect", help="list dead letters without their payload; counts per reason")
    common(i)
    i.add_argument("--limit", type=int, default=50, help="dead letters to list, 0 = all (default 50)")
    i.add_argument("--show-payload", action="store_true",
                   help=f"also print up to {PREVIEW_BYTES} bytes of each payload (may hold personal data)")
    i.set_defaults(handler=_handle(_cmd_inspect))

    r = dlq_sub.add_parser("replay", help="re-send dead letters to their original topic, once")
    common(r)
    r.add_argument("--dry-run", action="store_true", help="count what would be replayed; send and commit nothing")
    r.add_argument("--from-beginning", action="store_true",
                   help="re-read the whole DLQ, including what an earlier replay already sent")
    r.add_argument("--progress", action="store_true", help="show a progress bar even when not on a terminal")
    r.set_defaults(handler=_handle(_cmd_replay))
