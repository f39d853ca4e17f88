"""Response cache for deterministic models, in Redis.

Key: ``weir:pc:<model version>:<BLAKE2b-128 of the float32 feature vector>``
-> the score as 8 bytes (float64). A registered version never changes, so a
hit is exactly what the model would return; the TTL only bounds memory.
Lookups for a batch are one ``MGET`` and the misses' scores one pipelined
write, so the cache pays two round trips per batch: worth it only where the
model costs more than that (measured in ``load_tests/inference.py``), which
is why it is off by default (``WEIR_INFERENCE_CACHE_TTL_S``).

A Redis failure makes the cache miss (and skip its writes) until Redis is
back: it never fails a prediction.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import redis

from streams.serving.resilience import Breaker

__all__ = ["ResponseCache", "feature_hash"]

_SCORE = struct.Struct("<d")


def feature_hash(row: npt.NDArray[np.float32]) -> str:
    """BLAKE2b-128 of a float32 feature vector's bytes, hex (the audit record's ``feature_hash`` too)."""
    return hashlib.blake2b(np.ascontiguousarray(row, dtype=np.float32).tobytes(), digest_size=16).hexdigest()


class ResponseCache:
    """Scores keyed by (model version, feature-vector hash); ``hit_rate`` over every lookup so far."""

    def __init__(self, client: redis.Redis, ttl_s: int, prefix: str = "weir:pc") -> None:
        self._redis = client
        self.ttl_s = ttl_s
        self.prefix = prefix
        self.lookups = 0
        self.hits = 0
        self.breaker = Breaker("response cache (Redis)")

    @classmethod
    def from_url(cls, url: str, ttl_s: int) -> ResponseCache:
        return cls(redis.Redis.from_url(url, socket_timeout=0.25, socket_connect_timeout=0.25), ttl_s)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0

    def keys(self, version: str, hashes: Sequence[str]) -> list[str]:
        return [f"{self.prefix}:{version}:{h}" for h in hashes]

    def get(self, keys: Sequence[str]) -> list[float | None]:
        """The cached score of each key (None: a miss), in one MGET."""
        self.lookups += len(keys)
        raw = self.breaker.attempt(lambda: self._redis.mget(list(keys))) if keys else None
        if raw is None:
            return [None] * len(keys)
        out = [_SCORE.unpack(r)[0] if isinstance(r, bytes) and len(r) == _SCORE.size else None for r in raw]
        self.hits += sum(v is not None for v in out)
        return out

    def put(self, keys: Sequence[str], scores: Sequence[float]) -> None:
        """Store the scores, in one pipelined round trip."""
        if not keys:
            return
        pipe = self._redis.pipeline(transaction=False)
        for key, score in zip(keys, scores, strict=True):
            pipe.set(key, _SCORE.pack(score), ex=self.ttl_s)
        self.breaker.attempt(pipe.execute)
