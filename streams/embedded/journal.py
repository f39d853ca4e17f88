"""What must outlive the embedded broker, kept by Weir: a few small topics journaled to files and restored.

The embedded broker keeps everything in memory (docs/runtime.md, "Ports, and what a restart keeps"), so a restart of
``weir up`` would forget the schema registry's subjects and ids (``_schemas``), the model registry's
transitions (``model.events``) and what was applied of each project (``weir.projects``). :class:`TopicJournal`
tails those topics and appends every record, as it is in the topic (partition, key, value, headers,
timestamp), to ``<dir>/<topic>.jsonl``, flushed to disk after each poll; at the next start, before anything
reads them, :meth:`TopicJournal.restore` produces the journal back into the new broker's empty topics in its
order. A stop drains the tail first (every acknowledged record is on disk); a SIGKILL can lose what was
acknowledged in the last poll interval (``POLL_S``). A torn last line (killed mid-write) is cut off the file
at the next restore, so what is appended after it is read again.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition

from streams.kafka import DeliveryTracker, flush_or_raise, producer_config

log = logging.getLogger(__name__)

POLL_S = 0.1
"""How long the tail waits for records; at most this much of what was acknowledged is not yet on disk."""


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode()


def _unb64(text: str | None) -> bytes | None:
    return None if text is None else base64.b64decode(text)


def encode(msg: Any) -> str:
    """One journal line for a consumed message."""
    headers = [[k, _b64(v)] for k, v in (msg.headers() or [])]
    return json.dumps({"p": msg.partition(), "k": _b64(msg.key()), "v": _b64(msg.value()), "h": headers,
                       "ts": msg.timestamp()[1]}, separators=(",", ":"))


def read(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The records of a journal file, in order, and the length of the part they fill: a line that does not
    parse (a write cut short) ends it, with a warning."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], 0
    records, good = [], 0
    for n, line in enumerate(io.BytesIO(data), 1):
        try:
            if not line.endswith(b"\n"):
                raise ValueError("no newline: cut short")
            if line.strip():
                records.append(json.loads(line))
        except ValueError:
            rest = data[good:].count(b"\n")
            log.warning("%s: line %d is torn (a write cut short)%s; the journal ends before it", path, n,
                        f" and {rest} line(s) follow it" if rest else "")
            break
        good += len(line)
    return records, good


class TopicJournal:
    """``topics`` of the broker at ``bootstrap`` journaled under ``directory`` (see the module docstring)."""

    def __init__(self, bootstrap: str, directory: Path, topics: Sequence[str]) -> None:
        self.bootstrap = bootstrap
        self.directory = directory
        self.topics = tuple(topics)
        self._ends: dict[tuple[str, int], int] = {}  # where the tail starts: what restore() produced
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.appended = 0

    def path(self, topic: str) -> Path:
        return self.directory / f"{topic}.jsonl"

    def restore(self) -> dict[str, int]:
        """Produce every journaled record into its topic (empty: the broker is new), keeping each partition's
        order; returns the records restored per topic. Partitions past the topic's count wrap around."""
        self.directory.mkdir(parents=True, exist_ok=True)
        tracker = DeliveryTracker()
        producer = Producer(producer_config(self.bootstrap, **{"linger.ms": 20}), on_delivery=tracker)
        counts = producer.list_topics(timeout=30).topics
        restored: dict[str, int] = {}
        for topic in self.topics:
            partitions = len(counts[topic].partitions) if topic in counts else 1
            n = 0
            path = self.path(topic)
            records, good = read(path)
            if path.exists() and path.stat().st_size > good:
                with path.open("r+b") as f:  # a torn last line: the tail appends after the last whole one
                    f.truncate(good)
            for r in records:
                p = int(r["p"]) % partitions
                producer.produce(topic, _unb64(r["v"]), _unb64(r["k"]), partition=p, timestamp=int(r["ts"]),
                                 headers=[(k, _unb64(v)) for k, v in r["h"]])
                self._ends[(topic, p)] = self._ends.get((topic, p), 0) + 1
                n += 1
                if n % 10_000 == 0:
                    producer.poll(0)
            restored[topic] = n
        flush_or_raise(producer, tracker, timeout=60)
        if any(restored.values()):
            log.info("restored from %s: %s", self.directory,
                     ", ".join(f"{t} {n} record(s)" for t, n in restored.items()))
        return restored

    def start(self) -> TopicJournal:
        """Tail the topics from where :meth:`restore` left them, appending to the journal."""
        consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": "weir-journal",
                             "enable.auto.commit": False, "auto.offset.reset": "earliest",
                             "fetch.wait.max.ms": int(POLL_S * 1000)})
        known = consumer.list_topics(timeout=30).topics
        consumer.assign([TopicPartition(t, p, self._ends.get((t, p), 0)) for t in self.topics if t in known
                         for p in sorted(known[t].partitions)])
        self._thread = threading.Thread(target=self._tail, args=(consumer,), name="journal", daemon=True)
        self._thread.start()
        return self

    def _tail(self, consumer: Consumer) -> None:
        files: dict[str, Any] = {}
        try:
            files = {t: self.path(t).open("ab") for t in self.topics}
            drained = 0
            while drained < 3:  # after stop(): until three polls in a row bring nothing
                batch = []
                for m in consumer.consume(1000, POLL_S):
                    if m.error() is None:
                        batch.append(m)
                    else:
                        log.warning("journal: %s", m.error())
                if self._stop.is_set():
                    drained = 0 if batch else drained + 1
                self._append(files, batch)
        except BaseException as exc:  # kept for stop() and the log: the journal must not die silently
            self.error = exc
            log.exception("the journal of %s stopped: what changes from now on is not kept across a restart",
                          ", ".join(self.topics))
        finally:
            for f in files.values():
                f.close()
            consumer.close()

    def _append(self, files: dict[str, Any], batch: Iterable[Any]) -> None:
        touched = set()
        for msg in batch:
            files[msg.topic()].write(encode(msg).encode() + b"\n")
            touched.add(msg.topic())
            self.appended += 1
        for topic in touched:
            files[topic].flush()
            os.fsync(files[topic].fileno())

    def stop(self, timeout: float = 10.0) -> None:
        """Append what the topics hold that is not on disk yet, then stop tailing."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("the journal did not drain within %.0f s", timeout)
            self._thread = None
        if self.error is not None:
            log.error("the journal of %s had stopped early (%r): changes after that are not kept",
                      ", ".join(self.topics), self.error)
