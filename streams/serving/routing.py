"""Which model versions serve, and which entity each one serves.

A :class:`ModelSet` is the whole serving configuration of one model name:
the champion, an optional canary with the fraction of entities it takes,
and the shadow challengers. It is immutable; :class:`ModelSlot` holds the
current one and replaces it with one reference assignment, so an inference
batch that read ``slot.current`` once is served entirely by one set, and a
set is only ever published after every scorer in it was loaded and warmed.

The canary takes an entity when a keyed BLAKE2b hash of its id falls below
the fraction: stable across processes and restarts, and independent of the
CRC-32 that partitions topics (a canary by partition would be a canary of
whichever entities share a partition).
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field, replace

from models.base import BatchScorer

__all__ = ["CANARY", "CHAMPION", "SHADOW", "ModelSet", "ModelSlot", "in_canary"]

CHAMPION = "champion"
CANARY = "canary"
SHADOW = "shadow"

_SALT = b"weir-canary"
_SCALE = float(1 << 64)


def in_canary(entity_id: str, fraction: float) -> bool:
    """Whether the canary serves ``entity_id`` at ``fraction`` (0: nobody, 1: everybody).

    The same entity gets the same answer everywhere, and raising the fraction
    only ever adds entities (the buckets are nested):

    >>> in_canary("card-1", 0.0), in_canary("card-1", 1.0)
    (False, True)
    >>> all(in_canary(f"c{i}", 0.5) for i in range(100) if in_canary(f"c{i}", 0.2))
    True
    """
    digest = hashlib.blake2b(entity_id.encode(), digest_size=8, key=_SALT).digest()
    return int.from_bytes(digest, "big") / _SCALE < fraction


@dataclass(frozen=True)
class ModelSet:
    """One model's serving configuration: champion, canary (with its entity fraction) and shadows."""

    champion: BatchScorer
    canary: BatchScorer | None = None
    canary_fraction: float = 0.0
    shadows: tuple[BatchScorer, ...] = field(default=())

    def __post_init__(self) -> None:
        if not 0.0 <= self.canary_fraction <= 1.0:
            raise ValueError(f"canary_fraction must be within [0, 1], got {self.canary_fraction}")

    def route(self, entity_id: str) -> str:
        """``canary`` for the entities the canary takes, else ``champion``."""
        if self.canary is not None and in_canary(entity_id, self.canary_fraction):
            return CANARY
        return CHAMPION

    def serving(self, route: str) -> BatchScorer:
        """The scorer of ``route`` (champion or canary)."""
        if route == CANARY and self.canary is not None:
            return self.canary
        return self.champion

    def versions(self) -> dict[str, str | list[str]]:
        """Versions per route, for logs and ``weir`` output."""
        return {CHAMPION: self.champion.version, CANARY: self.canary.version if self.canary else "",
                SHADOW: [s.version for s in self.shadows]}

    def with_champion(self, champion: BatchScorer) -> ModelSet:
        return replace(self, champion=champion)


class ModelSlot:
    """Holds the current :class:`ModelSet`; ``swap`` replaces it atomically (a reference assignment).

    ``ModelSlot(scorer)`` serves one scorer as the champion."""

    def __init__(self, initial: BatchScorer | ModelSet) -> None:
        self._set = initial if isinstance(initial, ModelSet) else ModelSet(initial)
        self._lock = threading.Lock()
        self.swaps = 0

    @property
    def models(self) -> ModelSet:
        return self._set

    @property
    def current(self) -> BatchScorer:
        """The champion now serving."""
        return self._set.champion

    def swap(self, new: BatchScorer | ModelSet) -> None:
        """Serve ``new`` from the next batch on (a scorer replaces the champion only)."""
        with self._lock:
            self._set = new if isinstance(new, ModelSet) else self._set.with_champion(new)
            self.swaps += 1
