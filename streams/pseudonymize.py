"""Pseudonymization: PII fields, marked ``"pii": true`` in the schemas, become keyed HMAC tokens.

A token is ``"pii_" + hex(HMAC-SHA256(key, value))[:32]``: deterministic under
one key, so joins, distinct counts and features on a pseudonymized field keep
working, while the raw value cannot be recovered without the key. Ingest
applies it before anything leaves the stage; the bronze sink applies it before
writing. Only the input topics and their dead-letter topics (which must keep
the original bytes to be replayable) ever hold raw values.

>>> p = Pseudonymizer(b"k")
>>> rec = {"user_id": "u1", "ip": "10.0.0.1", "device_id": None}
>>> out = p.record({"ip", "device_id"}, rec)
>>> out["ip"].startswith("pii_"), out["device_id"], rec["ip"]
(True, None, '10.0.0.1')
>>> p.envelope({"ip"}, {"op": "c", "before": None, "after": rec})["after"]["ip"] == out["ip"]
True
"""

from __future__ import annotations

import hmac
from functools import cache
from typing import Any

from streams import schemas

TOKEN_PREFIX = "pii_"


def pii_fields(raw: dict[str, Any] | list[Any] | str) -> frozenset[str]:
    """Names of the fields marked ``"pii": true`` anywhere in a schema (records nested in
    unions, arrays and maps included: a Debezium envelope's ``before``/``after`` rows)."""
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, list):
            for branch in node:
                walk(branch)
        elif isinstance(node, dict):
            for f in node.get("fields", ()):
                if f.get("pii"):
                    found.add(f["name"])
                walk(f["type"])
            for nested in ("items", "values"):
                if nested in node:
                    walk(node[nested])

    walk(raw)
    return frozenset(found)


@cache
def topic_pii(topic: str) -> frozenset[str]:
    """PII field names of ``topic``'s current schema."""
    return pii_fields(schemas.subject(topic).raw)


class Pseudonymizer:
    """Replaces the values of PII fields by tokens; never mutates its input.

    Tokens of recently seen values are cached (``cache_size`` entries): the
    same devices and addresses recur, and the HMAC is most of the cost.
    """

    def __init__(self, key: bytes, cache_size: int = 200_000) -> None:
        if not key:
            raise ValueError("the pseudonymization key must not be empty")
        self._key = key
        self._cache: dict[str, str] = {}
        self._cache_size = cache_size

    def token(self, value: str) -> str:
        """The token of one raw value (idempotent: a token is returned unchanged)."""
        cached = self._cache.get(value)
        if cached is not None:
            return cached
        if value.startswith(TOKEN_PREFIX):
            return value
        token = TOKEN_PREFIX + hmac.digest(self._key, value.encode(), "sha256").hex()[:32]
        if len(self._cache) >= self._cache_size:
            self._cache.clear()  # cheap bound; the working set refills it
        self._cache[value] = token
        return token

    def record(self, fields: frozenset[str] | set[str], rec: dict[str, Any]) -> dict[str, Any]:
        """A copy of ``rec`` whose string values under ``fields`` are tokens (top level only)."""
        out = rec
        for name in fields:
            value = rec.get(name)
            if isinstance(value, str):
                if out is rec:
                    out = dict(rec)
                out[name] = self.token(value)
        return out

    def in_place(self, fields: frozenset[str] | set[str], rec: dict[str, Any]) -> None:
        """:meth:`record` for a dict the caller owns: tokenizes it where it is, without a copy."""
        for name in fields:
            value = rec.get(name)
            if isinstance(value, str):
                rec[name] = self.token(value)

    def envelope(self, fields: frozenset[str] | set[str], env: dict[str, Any]) -> dict[str, Any]:
        """A copy of a Debezium envelope with :meth:`record` applied to its ``before`` and ``after`` rows."""
        out = dict(env)
        for side in ("before", "after"):
            if isinstance(env.get(side), dict):
                out[side] = self.record(fields, env[side])
        return out
