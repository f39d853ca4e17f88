"""The one store of stage state snapshots (feature windows, a river model and its joins): signed, in Redis.

A river model is a graph of Python objects: only ``pickle`` stores it whole,
and unpickling runs whatever the bytes name. So every snapshot is signed:
``WSS`` + format byte + HMAC-SHA256 (32 bytes) under a key derived from
``WEIR_PSEUDONYM_KEY`` (the deployment's secret) + a 16-byte fingerprint of
the state's *definition* (what it means: the feature views, the model's
inputs), then the pickled payload; the signature covers the fingerprint and
the payload. :meth:`SignedSnapshots.load` checks the signature and the
definition before it unpickles: a snapshot that someone without the key
wrote or altered, a truncated one, or one of another definition raises
:class:`StateError` and is never unpickled. The recovery protocol built on
it is :mod:`streams.recovery`.
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
FORMAT = 2
_HEADER = struct.Struct(">3sB32s")
_DEFINITION = 16  # bytes of sha256(definition) after the header, covered by the signature


class StateError(ValueError):
    """A snapshot that must not be restored: unsigned, altered, truncated or of another format."""


def fingerprint(definition: bytes) -> bytes:
    return hashlib.sha256(definition).digest()[:_DEFINITION]


def sign(key: bytes, payload: bytes, definition: bytes = b"") -> bytes:
    body = fingerprint(definition) + payload
    return _HEADER.pack(MAGIC, FORMAT, hmac.new(key, body, hashlib.sha256).digest()) + body


def verified(key: bytes, data: bytes, definition: bytes = b"") -> bytes:
    """The payload of a signed snapshot; raises :class:`StateError` unless the signature and the definition
    hold."""
    if len(data) < _HEADER.size + _DEFINITION:
        raise StateError("truncated snapshot")
    magic, fmt, mac = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise StateError("not a signed snapshot")
    if fmt != FORMAT:
        raise StateError(f"snapshot format {fmt}, this code reads {FORMAT}")
    body = data[_HEADER.size:]
    if not hmac.compare_digest(mac, hmac.new(key, body, hashlib.sha256).digest()):
        raise StateError("signature does not match: written with another key, or altered")
    if body[:_DEFINITION] != fingerprint(definition):
        raise StateError("snapshot of another definition (the views or the model changed)")
    return body[_DEFINITION:]


class SignedSnapshots:
    """One signed pickle per name under ``<prefix>:<name>`` in Redis (no TTL).

    A write replaces the previous snapshot in one ``SET``: a crash between two
    writes leaves the older one. Redis failures surface as ``redis.RedisError``.

    >>> key = b"k" * 32
    >>> verified(key, sign(key, b"payload", b"views v1"), b"views v1")
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

    def key(self, name: str) -> str:
        return f"{self.prefix}:{name}"

    def save(self, name: str, state: Any, definition: bytes = b"") -> int:
        """Pickle, sign and store ``state`` as a state of ``definition``; returns its size in bytes."""
        data = sign(self._key, pickle.dumps(state, protocol=5), definition)
        self._redis.set(self.key(name), data)
        return len(data)

    def load(self, name: str, definition: bytes = b"") -> Any | None:
        """The state saved under ``name``, ``None`` if there is none; raises :class:`StateError` for one that is
        not signed with this key, altered, truncated, or of another ``definition``."""
        raw = self._redis.get(self.key(name))
        if not isinstance(raw, bytes):
            return None
        payload = verified(self._key, raw, definition)
        try:
            return pickle.loads(payload)  # signed with the deployment's key, checked above
        except Exception as exc:  # a signed but unreadable state (e.g. a class that moved)
            raise StateError(f"signed snapshot does not unpickle: {exc!r}") from exc

    def delete(self, name: str) -> None:
        self._redis.delete(self.key(name))
