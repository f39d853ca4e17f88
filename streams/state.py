"""Signed snapshots of a stage's in-memory state (a river model and its joins), kept in Redis.

A river model is a graph of Python objects: only ``pickle`` stores it whole,
and unpickling runs whatever the bytes name. So a snapshot is signed:
``WSS`` + format byte + HMAC-SHA256 (32 bytes) of the payload under a key
derived from ``WEIR_PSEUDONYM_KEY`` (the deployment's secret), then the
payload. :meth:`SignedSnapshots.load` checks the signature before it
unpickles; a snapshot that someone without the key wrote or altered, or a
truncated one, raises :class:`StateError` and is never unpickled.
"""

from __future__ import annotations

import hashlib
import hmac
import pickle
import struct
from typing import Any

import redis

__all__ = ["SignedSnapshots", "StateError"]

MAGIC = b"WSS"
FORMAT = 1
_HEADER = struct.Struct(">3sB32s")


class StateError(ValueError):
    """A snapshot that must not be restored: unsigned, altered, truncated or of another format."""


def sign(key: bytes, payload: bytes) -> bytes:
    return _HEADER.pack(MAGIC, FORMAT, hmac.new(key, payload, hashlib.sha256).digest()) + payload


def verified(key: bytes, data: bytes) -> bytes:
    """The payload of a signed snapshot; raises :class:`StateError` unless the signature holds."""
    if len(data) < _HEADER.size:
        raise StateError("truncated snapshot")
    magic, fmt, mac = _HEADER.unpack_from(data)
    if magic != MAGIC or fmt != FORMAT:
        raise StateError("not a signed snapshot of this format")
    payload = data[_HEADER.size:]
    if not hmac.compare_digest(mac, hmac.new(key, payload, hashlib.sha256).digest()):
        raise StateError("signature does not match: written with another key, or altered")
    return payload


class SignedSnapshots:
    """One signed pickle per name under ``<prefix>:<name>`` in Redis (no TTL).

    >>> key = b"k" * 32
    >>> verified(key, sign(key, b"payload"))
    b'payload'
    """

    def __init__(self, client: redis.Redis, secret: bytes, prefix: str = "weir:state") -> None:
        self._redis = client
        self._key = hashlib.sha256(b"weir-state-snapshots:" + secret).digest()  # not the PII key itself
        self.prefix = prefix

    @classmethod
    def from_url(cls, url: str, secret: bytes, prefix: str = "weir:state", *, timeout_s: float = 10.0
                 ) -> SignedSnapshots:
        client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=min(timeout_s, 5))
        return cls(client, secret, prefix)

    def save(self, name: str, state: Any) -> int:
        """Pickle, sign and store ``state``; returns its size in bytes."""
        data = sign(self._key, pickle.dumps(state, protocol=5))
        self._redis.set(f"{self.prefix}:{name}", data)
        return len(data)

    def load(self, name: str) -> Any | None:
        """The state saved under ``name``, ``None`` if there is none; raises :class:`StateError`."""
        raw = self._redis.get(f"{self.prefix}:{name}")
        if not isinstance(raw, bytes):
            return None
        payload = verified(self._key, raw)
        try:
            return pickle.loads(payload)  # noqa: S301 - signed with the deployment's key, checked above
        except Exception as exc:  # a signed but unreadable state (e.g. a class that moved)
            raise StateError(f"signed snapshot does not unpickle: {exc!r}") from exc

    def delete(self, name: str) -> None:
        self._redis.delete(f"{self.prefix}:{name}")
