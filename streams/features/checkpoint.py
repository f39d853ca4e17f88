"""Snapshots of one partition's feature state, and where they are kept (Redis).

A snapshot is the window state built from one input partition's log, up to
(not including) an offset: ``state after offset O``. The features stage writes
one after a successful commit, so ``O`` is never past the group's committed
offset; on assignment it restores the snapshot and replays the log from ``O``
(see :class:`streams.stages.features.FeaturesStage`).

Wire format, versioned: magic ``WFS``, format byte, a 16-byte fingerprint of
what the state means (the feature views' definitions), the offset (int64),
then a pickle of builtins only: for the features stage, one
(view name, :meth:`~streams.features.engine.ViewState.snapshot`) pair per view,
each of which carries its own view fingerprint and per-lane CRC-checked
:meth:`~streams.features.aggregations.Aggregators.snapshot` s. Unpickling
refuses any class or function, so a snapshot cannot name code. A snapshot
with another format, another fingerprint or a corrupt body raises
:class:`SnapshotError`; the caller then recomputes the state from the log.

>>> codec = SnapshotCodec(b"example")
>>> codec.decode(codec.encode(42, [("card", b"...")]))
(42, [('card', b'...')])
"""

from __future__ import annotations

import hashlib
import pickle
import struct
from typing import Any

import redis

from streams.features.aggregations import SnapshotError, plain_loads

__all__ = ["RedisSnapshots", "SnapshotCodec", "SnapshotError"]

MAGIC = b"WFS"
FORMAT = 2
_HEADER = struct.Struct(">3sB16sq")


class SnapshotCodec:
    """Encodes (offset, state) with a header naming the format and ``definition``.

    ``definition`` is anything that changes when the meaning of the state
    changes (e.g. the feature views' fingerprints): a snapshot written under
    another definition is refused rather than restored into the wrong shape.
    """

    def __init__(self, definition: bytes) -> None:
        self.fingerprint = hashlib.sha256(definition).digest()[:16]

    def encode(self, offset: int, state: Any) -> bytes:
        return _HEADER.pack(MAGIC, FORMAT, self.fingerprint, offset) + pickle.dumps(state, protocol=5)

    def decode(self, data: bytes) -> tuple[int, Any]:
        """(offset, state) of a snapshot; raises :class:`SnapshotError`."""
        if len(data) < _HEADER.size:
            raise SnapshotError("truncated snapshot header")
        magic, fmt, fingerprint, offset = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise SnapshotError("not a feature-state snapshot")
        if fmt != FORMAT:
            raise SnapshotError(f"snapshot format {fmt}, this code reads {FORMAT}")
        if fingerprint != self.fingerprint:
            raise SnapshotError("snapshot of another feature definition")
        if offset < 0:
            raise SnapshotError(f"negative snapshot offset {offset}")
        try:
            state = plain_loads(memoryview(data)[_HEADER.size:])
        except SnapshotError:
            raise
        except Exception as exc:  # pickle raises many types on corrupt input
            raise SnapshotError(f"corrupt snapshot body: {type(exc).__name__}") from exc
        return offset, state


class RedisSnapshots:
    """One snapshot per (topic, partition) under ``<prefix>:<topic>:<partition>``, no TTL.

    A write replaces the previous snapshot in one ``SET``; a crash between two
    writes leaves the older one, which is still valid (its offset is at or
    below the committed offset). Redis failures surface as ``redis.RedisError``.
    """

    def __init__(self, client: redis.Redis, prefix: str = "weir:state:features") -> None:
        self._redis = client
        self.prefix = prefix

    @classmethod
    def from_url(cls, url: str, prefix: str = "weir:state:features") -> RedisSnapshots:
        return cls(redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5), prefix)

    def key(self, topic: str, partition: int) -> str:
        return f"{self.prefix}:{topic}:{partition}"

    def save(self, topic: str, partition: int, data: bytes) -> None:
        self._redis.set(self.key(topic, partition), data)

    def load(self, topic: str, partition: int) -> bytes | None:
        raw = self._redis.get(self.key(topic, partition))
        return raw if isinstance(raw, bytes) else None

    def delete(self, topic: str, partition: int) -> None:
        self._redis.delete(self.key(topic, partition))
