"""Dead-letter queues against the real embedded broker: inspect, replay, and the ratio guard.

Every test uses topics of its own; readers use ``assign()`` and partition EOF (no group joins).
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from streams.base import InvalidEvent, Message, Produce, Reason, Rejected, Stage, StepResult
from streams.dlq import (
    REPLAYED_FROM,
    DlqError,
    DlqGuard,
    DlqRatioExceeded,
    add_parser,
    inspect,
    replay,
)
from streams.kafka import consumer_config, ensure_topics, producer_config
from streams.runtime import BatchRunner, dead_letter
from streams.stack import Endpoints

NOW_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def fresh(prefix: str) -> str:
    return f"{prefix}.{uuid.uuid4().hex[:10]}"


def topics_with_dlq(bootstrap: str, partitions: int = 2) -> str:
    src = fresh("dlqtest")
    ensure_topics(bootstrap, [src, f"dlq.{src}"], partitions)
    return src


def rejected(topic: str, partition: int, offset: int, reason: Reason, *, key: bytes | None = b"k",
             value: bytes | None = b"\x00payload", headers: tuple[tuple[str, bytes], ...] = ()) -> Rejected:
    msg = Message(topic, partition, offset, key, value, NOW_MS - 5, headers)
    return Rejected(msg, InvalidEvent(reason, f"{reason.value} at {offset}"))


def put_dead_letters(bootstrap: str, rejs: Sequence[Rejected], stage: str = "ingest", to: str | None = None) -> None:
    """Produce the runtime's dead letters for ``rejs`` (to ``to`` instead of ``dlq.<topic>`` if given)."""
    producer = Producer(producer_config(bootstrap))
    for r in rejs:
        rec = dead_letter(stage, r, NOW_MS)
        producer.produce(to or rec.topic, rec.value, rec.key, headers=list(rec.headers))
    assert producer.flush(30) == 0


def read_topic(bootstrap: str, topic: str) -> list[Any]:
    """Every message in ``topic`` now, via assign() and partition EOF."""
    consumer = Consumer(consumer_config(bootstrap, "test-reader", **{"enable.partition.eof": True}))
    try:
        parts = sorted(consumer.list_topics(timeout=10).topics[topic].partitions)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        done: set[int] = set()
        out: list[Any] = []
        deadline = time.monotonic() + 30
        while len(done) < len(parts):
            assert time.monotonic() < deadline, f"no EOF on {topic}"
            for m in consumer.consume(1000, 0.1):
                err = m.error()
                if err is None:
                    out.append(m)
                elif err.code() == KafkaError._PARTITION_EOF:
                    done.add(m.partition() or 0)
        return out
    finally:
        consumer.close()


def committed(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    consumer = Consumer(consumer_config(bootstrap, group))
    try:
        tps = consumer.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
        return {tp.partition: tp.offset for tp in tps}
    finally:
        consumer.close()


# --- inspect -------------------------------------------------------------------------------


def test_inspect_returns_what_the_runtime_dead_lettered(endpoints: Endpoints) -> None:
    b = endpoints.kafka_bootstrap
    src = topics_with_dlq(b)
    rejs = [
        rejected(src, 1, 7, Reason.UNDECODABLE, key=b"user-1", value=b"\x00\xffnot avro",
                 headers=(("trace", b"t-1"),)),
        rejected(src, 0, 3, Reason.MISSING_FIELD, key=None, value=b"{}"),
        rejected(src, 0, 4, Reason.MISSING_FIELD, value=None),
    ]
    put_dead_letters(b, rejs)

    letters = sorted(inspect(b, src, limit=None), key=lambda d: d.offset)
    assert [(d.topic, d.partition, d.offset, d.reason) for d in letters] == [
        (src, 0, 3, "missing_field"), (src, 0, 4, "missing_field"), (src, 1, 7, "undecodable")]
    first = letters[2]
    assert first.dlq_topic == f"dlq.{src}" and first.dlq_offset >= 0
    assert first.detail == "undecodable at 7" and first.stage == "ingest"
    assert first.time_ms == NOW_MS and first.time is not None and first.time.year == 2026
    assert first.key == b"user-1" and first.value == b"\x00\xffnot avro" and first.size == 10
    assert first.headers == (("trace", b"t-1"),) and first.replayed_from is None
    assert letters[0].key is None and letters[1].value is None and letters[1].size == 0
    assert "not avro" not in repr(first) and "t-1" not in repr(first)  # no payload in logs

    only = inspect(b, f"dlq.{src}", reason=Reason.MISSING_FIELD, limit=1)
    assert len(only) == 1 and only[0].reason == "missing_field"
    assert inspect(b, src, reason="late") == []


def test_inspect_of_a_missing_topic_is_a_clear_error_and_creates_nothing(endpoints: Endpoints) -> None:
    b = endpoints.kafka_bootstrap
    name = fresh("nosuch")
    with pytest.raises(DlqError, match=f"dlq.{name} does not exist"):
        inspect(b, name)
    assert f"dlq.{name}" not in AdminClient({"bootstrap.servers": b}).list_topics(timeout=10).topics


# --- replay --------------------------------------------------------------------------------


def test_replay_restores_bytes_key_headers_and_partition_once(endpoints: Endpoints) -> None:
    b = endpoints.kafka_bootstrap
    src = topics_with_dlq(b)
    group = fresh("replay")
    rejs = [rejected(src, i % 2, 100 + i, Reason.UNDECODABLE, key=f"k{i}".encode(), value=bytes([i, 0, 255]),
                     headers=(("trace", f"t{i}".encode()),)) for i in range(6)]
    put_dead_letters(b, rejs)

    report = replay(b, src, group=group)
    assert (report.replayed, report.skipped, report.by_reason) == (6, 0, {"undecodable": 6})
    assert report.by_topic == {src: 6} and not report.dry_run

    back = read_topic(b, src)
    assert len(back) == 6
    dlq_coords = {(d.dlq_partition, d.dlq_offset) for d in inspect(b, src, limit=None)}
    seen_from = set()
    for m in back:
        i = int(m.key()[1:])
        assert m.value() == bytes([i, 0, 255]) and m.partition() == i % 2
        headers = m.headers()
        assert headers[0] == ("trace", f"t{i}".encode())
        assert [k for k, _ in headers] == ["trace", REPLAYED_FROM]  # no weir.reason etc. on the replay
        dlq_name, part, off = headers[1][1].decode().rsplit(":", 2)
        assert dlq_name == f"dlq.{src}"
        seen_from.add((int(part), int(off)))
    assert seen_from == dlq_coords

    again = replay(b, src, group=group)
    assert again.replayed == 0 and len(read_topic(b, src)) == 6  # a second replay repeats nothing

    put_dead_letters(b, [rejected(src, 0, 200, Reason.UNDECODABLE, key=b"k9", value=b"new")])
    assert replay(b, src, group=group).replayed == 1  # continues where the first stopped
    assert replay(b, src, group=group, from_beginning=True).replayed == 7
    assert len(read_topic(b, src)) == 6 + 1 + 7


def test_replay_by_reason_and_dry_run(endpoints: Endpoints) -> None:
    b = endpoints.kafka_bootstrap
    src = topics_with_dlq(b, partitions=1)
    group = fresh("replay")
    put_dead_letters(b, [rejected(src, 0, i, Reason.LATE if i % 3 == 0 else Reason.UNDECODABLE,
                                  value=f"v{i}".encode()) for i in range(9)])

    dry = replay(b, f"dlq.{src}", group=group, reason="undecodable", dry_run=True)
    assert (dry.replayed, dry.skipped, dry.dry_run) == (6, 3, True)
    assert dry.by_reason == {"undecodable": 6, "late": 3}
    assert read_topic(b, src) == []  # a dry run sends nothing ...

    first = replay(b, src, group=group, reason=Reason.UNDECODABLE)
    assert (first.replayed, first.skipped) == (6, 3)  # ... and commits nothing
    assert sorted(m.value() for m in read_topic(b, src)) == sorted(f"v{i}".encode() for i in range(9) if i % 3)
    assert replay(b, src, group=group, reason="undecodable").replayed == 0

    late = replay(b, src, group=group, reason="late")  # its own position: the late ones were not passed over
    assert (late.replayed, late.skipped) == (3, 6) and late.group == f"{group}.late"
    assert len(read_topic(b, src)) == 9


def test_replay_stops_at_a_record_for_a_missing_topic_after_committing_what_went_before(
        endpoints: Endpoints) -> None:
    b = endpoints.kafka_bootstrap
    src = topics_with_dlq(b, partitions=1)
    gone = fresh("gone")  # not created yet
    group = fresh("replay")
    put_dead_letters(b, [rejected(src, 0, 1, Reason.UNDECODABLE, value=b"one"),
                         rejected(gone, 0, 2, Reason.UNDECODABLE, value=b"lost?"),
                         rejected(src, 0, 3, Reason.UNDECODABLE, value=b"three")], to=f"dlq.{src}")

    with pytest.raises(DlqError, match=f"its topic '{gone}' does not exist; replayed 1 before it"):
        replay(b, src, group=group)
    assert [m.value() for m in read_topic(b, src)] == [b"one"]
    assert committed(b, group, f"dlq.{src}", 1) == {0: 1}  # past the one acknowledged, not further
    assert gone not in AdminClient({"bootstrap.servers": b}).list_topics(timeout=10).topics  # not auto-created

    ensure_topics(b, [gone], 1)
    report = replay(b, src, group=group)
    assert report.replayed == 2 and report.by_topic == {gone: 1, src: 1}
    assert [m.value() for m in read_topic(b, gone)] == [b"lost?"]


# --- the ratio guard -----------------------------------------------------------------------


def test_guard_window_slides_over_whole_batches() -> None:
    g = DlqGuard(max_ratio=0.5, window=10, min_events=5)
    g.add(4, {("t", "undecodable"): 4})
    assert (g.seen, g.rejected, g.tripped) == (4, 4, False)  # under min_events
    g.add(4, {})
    assert (g.seen, g.rejected, g.ratio, g.tripped) == (8, 4, 0.5, False)  # at the limit is not over it
    g.add(4, {("t", "late"): 1})
    assert (g.seen, g.rejected) == (12, 5)  # the first batch still needed: without it, 8 < 10
    g.add(4, {})
    assert (g.seen, g.rejected) == (12, 1)  # the first batch left: 3 batches cover >= 10
    g.add(20, {("t", "late"): 15})
    assert (g.seen, g.rejected, g.tripped) == (20, 15, True)  # a batch bigger than the window is the window
    g.add(20, {("u", "late"): 9})
    assert (g.seen, g.rejected, g.tripped) == (20, 9, False)


def test_guard_raises_an_actionable_error_with_top_reasons() -> None:
    g = DlqGuard(max_ratio=0.25, window=100, min_events=10)
    msgs = [Message("clickstream.events", 0, i, None, b"x", 0) for i in range(10)]
    g.observe("ingest", 10, [])
    rej = [Rejected(m, InvalidEvent(Reason.UNDECODABLE, "bad")) for m in msgs[:7]]
    rej += [Rejected(msgs[7], InvalidEvent(Reason.MISSING_FIELD, "no user_id"))]
    with pytest.raises(DlqRatioExceeded) as info:
        g.observe("ingest", 10, rej)
    err = info.value
    text = str(err)
    assert isinstance(err, RuntimeError) and (err.rejected, err.seen) == (8, 20)
    for part in ("stage ingest", "8 of its last 20", "40%", "limit 25%", "undecodable from clickstream.events: 7",
                 "missing_field from clickstream.events: 1",
                 "weir dlq inspect dlq.clickstream.events --reason undecodable",
                 "weir dlq replay dlq.clickstream.events", "nothing is lost"):
        assert part in text, part
    assert "bad" not in text.replace("bad deploy", "")  # details (possibly input) stay out


def test_guard_counts_duplicates_apart_from_bad_input() -> None:
    """Duplicates are what a producer or the CDC connector sends again after a failure: dead letters, but no
    bad deploy (a PostgreSQL restart re-sent 1,291 changes and the guard stopped ingest on them)."""
    g = DlqGuard(max_ratio=0.5, window=100, min_events=10)
    msgs = [Message("cdc.payments", 0, i, None, b"x", 0) for i in range(100)]
    g.observe("ingest", 100, [Rejected(m, InvalidEvent(Reason.DUPLICATE, "seen")) for m in msgs[:90]])
    assert (g.seen, g.rejected, g.duplicates, g.tripped) == (100, 0, 90, False)
    with pytest.raises(DlqRatioExceeded) as info:
        g.observe("ingest", 100, [Rejected(m, InvalidEvent(Reason.UNDECODABLE, "bad")) for m in msgs[:60]] +
                  [Rejected(m, InvalidEvent(Reason.DUPLICATE, "seen")) for m in msgs[60:70]])
    text = str(info.value)
    assert "60 of its last 100" in text and "duplicate" not in text.split("Top reasons:")[1].split("(")[0]
    assert "not counted: 10 in the same messages" in text and "Only this stage pauses" in text


@pytest.mark.parametrize(("ratio", "window"), [(1.0, 100), (1.5, 100), (0.5, 0)])
def test_guard_disabled(ratio: float, window: int) -> None:
    g = DlqGuard(max_ratio=ratio, window=window, min_events=0)
    msg = Message("t", 0, 0, None, b"", 0)
    g.observe("s", 1000, [Rejected(msg, InvalidEvent(Reason.LATE, "x"))] * 1000)
    assert not g.enabled and not g.tripped


def test_guard_rejects_settings_that_never_trip() -> None:
    with pytest.raises(ValueError, match="min_events"):
        DlqGuard(max_ratio=0.5, window=100, min_events=101)
    with pytest.raises(ValueError):
        DlqGuard(max_ratio=-0.1, window=100, min_events=1)


@dataclass
class SortingStage(Stage):
    """Forwards ``good-*`` values to ``out`` and refuses the rest as undecodable."""

    step_id: str
    topics: tuple[str, ...]
    out: str

    def handle(self, batch: list[Message]) -> StepResult:
        result = StepResult()
        for m in batch:
            if m.value is not None and m.value.startswith(b"good"):
                result.produce.append(Produce(self.out, m.key, m.value))
            else:
                result.rejected.append(Rejected(m, InvalidEvent(Reason.UNDECODABLE, "not avro")))
        return result


def feed(bootstrap: str, topic: str, good: Sequence[bool]) -> None:
    producer = Producer(producer_config(bootstrap))
    for i, ok in enumerate(good):
        producer.produce(topic, f"{'good' if ok else 'bad'}-{i}".encode(), f"k{i}".encode(), partition=0)
    assert producer.flush(30) == 0


def runner_for(bootstrap: str, src: str, guard: DlqGuard, **kwargs: float) -> tuple[BatchRunner, str, str]:
    out = fresh("dlqout")
    ensure_topics(bootstrap, [out], 1)
    group = fresh("guard")
    stage = SortingStage(fresh("sorter"), (src,), out)
    return BatchRunner(stage, bootstrap, group_id=group, max_batch=10, dlq_guard=guard, **kwargs), out, group


def index(value: bytes) -> int:
    return int(value.rsplit(b"-", 1)[1])


def run_until_consumed(runner: BatchRunner, n: int, timeout: float = 90.0) -> set[str]:
    """Run until ``n`` messages are consumed; the states the runner went through."""
    states = set()
    runner.start()
    try:
        deadline = time.monotonic() + timeout
        while runner.stats.consumed < n and time.monotonic() < deadline:
            states.add(runner.health()["state"])
            time.sleep(0.05)
    finally:
        runner.stop()
    return states


def test_guard_pauses_a_runner_on_mostly_bad_input_and_loses_nothing(endpoints: Endpoints) -> None:
    """A broken producer deploy: the stage pauses, resumes, pauses again (each time longer), and every input
    ends up forwarded or in the DLQ, once. It used to stop the stage for good (and, before that, the process)."""
    b = endpoints.kafka_bootstrap
    src = topics_with_dlq(b, partitions=1)
    feed(b, src, [i % 10 == 0 for i in range(300)])  # 90% bad
    runner, out, group = runner_for(b, src, DlqGuard(max_ratio=0.5, window=50, min_events=30),
                                    guard_pause_s=0.2, guard_pause_max_s=0.4)
    states = run_until_consumed(runner, 300)
    assert runner.error is None and "paused" in states and runner.guard_trips >= 2
    text = str(runner.health()["error"])
    assert f"stage {runner.stage.step_id} paused" in text and f"weir dlq inspect dlq.{src}" in text
    assert f"weir dlq replay dlq.{src}" in text and "undecodable" in text

    assert committed(b, group, src, 1)[0] == 300
    forwarded = [index(m.value()) for m in read_topic(b, out)]
    dead = [d.offset for d in inspect(b, src, limit=None)]
    assert sorted(forwarded + dead) == list(range(300))  # every input is out or in the DLQ, once
    assert all(i % 10 == 0 for i in forwarded) and all(i % 10 for i in dead)


def test_a_burst_of_garbage_costs_one_pause(endpoints: Endpoints) -> None:
    """1,500 garbage records in a chaos run stopped ingest for good; now the stage pauses once and goes on."""
    b = endpoints.kafka_bootstrap
    src = topics_with_dlq(b, partitions=1)
    feed(b, src, [i >= 60 for i in range(300)])  # a burst of 60 bad records, then good input
    runner, out, _ = runner_for(b, src, DlqGuard(max_ratio=0.5, window=50, min_events=30), guard_pause_s=0.2)
    states = run_until_consumed(runner, 300)
    assert runner.error is None and "paused" in states
    assert runner.guard_trips == 0 and runner.health()["state"] == "running"  # a good window reset the count
    assert len(read_topic(b, out)) == 240


def test_guard_does_not_trip_under_the_ratio_or_below_min_events(endpoints: Endpoints) -> None:
    b = endpoints.kafka_bootstrap
    mixed, few = topics_with_dlq(b, partitions=1), topics_with_dlq(b, partitions=1)
    feed(b, mixed, [i % 10 >= 4 for i in range(300)])  # 40% bad, under 50%
    feed(b, few, [False] * 20)  # all bad, but fewer than min_events
    runners = [runner_for(b, t, DlqGuard(max_ratio=0.5, window=50, min_events=30))[0] for t in (mixed, few)]
    for r in runners:
        r.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and [r.stats.consumed for r in runners] != [300, 20]:
            assert all(r.error is None for r in runners), [r.error for r in runners]
            time.sleep(0.1)
        assert [r.stats.consumed for r in runners] == [300, 20]
        assert [r.stats.dead_lettered for r in runners] == [120, 20]
    finally:
        for r in runners:
            r.stop()
    assert all(r.error is None for r in runners)


# --- the command line ----------------------------------------------------------------------


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="weir")
    add_parser(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(argv)
    return int(args.handler(args))


def test_cli_inspect_hides_payloads_unless_asked(endpoints: Endpoints, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    b = endpoints.kafka_bootstrap
    src = topics_with_dlq(b, partitions=1)
    secret = b"alice@example.com;" + bytes(range(100))
    put_dead_letters(b, [rejected(src, 0, 1, Reason.UNDECODABLE, value=secret),
                         rejected(src, 0, 2, Reason.LATE, key=b"evt-2"),
                         rejected(src, 0, 3, Reason.LATE)])
    (tmp_path / "endpoints.json").write_text(json.dumps({"kafka_bootstrap": b}))
    monkeypatch.setenv("WEIR_DATA_DIR", str(tmp_path))

    assert cli(["dlq", "inspect", src]) == 0  # bootstrap from <WEIR_DATA_DIR>/endpoints.json, TOPIC as x
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "alice" not in out and "payload" not in out
    assert lines[0].startswith("2026-01-01T00:00:00.000+00:00 undecodable stage=ingest ")
    assert f"src={src}:0:1 key=k size=118B detail=undecodable at 1" in lines[0]
    assert "key=evt-2" in lines[1]
    assert lines[3:] == [f"3 shown of 3 dead letters in dlq.{src}.", "  late: 2", "  undecodable: 1"]

    assert cli(["dlq", "inspect", f"dlq.{src}", "--bootstrap", b, "--show-payload", "--reason", "undecodable",
                "--limit", "5"]) == 0
    out = capsys.readouterr().out
    payload_line = out.splitlines()[1]
    assert payload_line.startswith("    payload: alice@example.com;\\x00\\x01")
    assert payload_line.endswith("... (118 bytes)") and "\\x2e" not in payload_line and "\\x2d" not in payload_line
    assert "1 shown of 3 dead letters" in out


def test_cli_replay_and_missing_bootstrap(endpoints: Endpoints, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    b = endpoints.kafka_bootstrap
    src = topics_with_dlq(b, partitions=1)
    put_dead_letters(b, [rejected(src, 0, 1, Reason.UNDECODABLE)])
    monkeypatch.setenv("WEIR_DATA_DIR", str(tmp_path))  # no endpoints.json there

    assert cli(["dlq", "replay", src]) == 1
    err = capsys.readouterr().err
    assert "--bootstrap" in err and "weir up" in err and str(tmp_path / "endpoints.json") in err

    assert cli(["dlq", "replay", src, "--bootstrap", b, "--dry-run"]) == 0
    assert "would replay 1 dead letters" in capsys.readouterr().out
    assert cli(["dlq", "replay", src, "--bootstrap", b, "--from-beginning"]) == 0
    out = capsys.readouterr().out
    assert f"replayed 1 dead letters from dlq.{src} ({src}: 1)" in out and "undecodable: 1 read" in out
    assert len(read_topic(b, src)) == 1
    assert cli(["dlq", "inspect", fresh("nosuch"), "--bootstrap", b]) == 1
    assert "does not exist" in capsys.readouterr().err
