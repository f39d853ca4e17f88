"""River's drift detectors, declared by name, and the one code path that feeds them a signal.

A detector is declared as text, ``Name(arguments)``, the arguments Python literals passed to river's class
(nothing is evaluated): over any value, ``ADWIN(delta=0.002)``, ``PageHinkley(threshold=50)``,
``KSWIN(alpha=0.005, window_size=100)``; over 0/1 values (an error, a miss), ``DDM()``, ``EDDM()``,
``HDDM_A()``, ``HDDM_W()``, ``FHDDM()``. A ``drift.`` or ``drift.binary.`` prefix is accepted, and river's
own spellings ``HDDMA``/``HDDMW``. A detector that takes a seed (KSWIN) gets :data:`SEED` unless the
declaration sets one, so that a run can be replayed.

:class:`Watched` is what the drift stage (:mod:`streams.stages.drift`) and ``weir drift replay`` feed: one
value at a time into the detector, and, when it alarms, an :class:`Alarm`: the signal's mean before and now,
and the event time where the change began: the split of the values since the last alarm that best separates
their means in the alarm's direction (the statistic of binary segmentation), so that the retrain stage can
weigh what came after it (:class:`~streams.project.spec.RetrainPolicy`).

>>> w = Watched(parse_detector("PageHinkley(min_instances=10, threshold=5)"))
>>> [i for i, v in enumerate([0.0] * 50 + [1.0] * 50) if w.update(v, at_ms=i) is not None]
[55]
>>> w = Watched(parse_detector("ADWIN(clock=1)"))
>>> next(a for i, v in enumerate([0.0] * 300 + [1.0] * 300) if (a := w.update(v, at_ms=i)) is not None)
Alarm(before=0.035..., now=0.048..., since_ms=300)
"""

from __future__ import annotations

import ast
import inspect
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
from river import drift
from river.drift import binary

SEED = 42
RECENT = 100
"""How many of the latest values make the "now" mean of a detector that keeps no estimate of its own."""
HISTORY = 5_000
"""How many of the values since the last alarm (with their event times) a :class:`Watched` keeps to place a
change."""

CONTINUOUS: dict[str, type] = {"ADWIN": drift.ADWIN, "PageHinkley": drift.PageHinkley, "KSWIN": drift.KSWIN}
BINARY: dict[str, type] = {"DDM": binary.DDM, "EDDM": binary.EDDM, "HDDM_A": binary.HDDMA, "HDDM_W": binary.HDDMW,
                           "FHDDM": binary.FHDDM}
_ALIASES = {"HDDMA": "HDDM_A", "HDDMW": "HDDM_W"}
_PREFIXES = ("river.drift.binary.", "river.drift.", "drift.binary.", "drift.")


class InvalidDetector(ValueError):
    """A declaration that names no river drift detector, or arguments it refuses; the message says which."""


@dataclass(frozen=True)
class DetectorSpec:
    """A parsed declaration: the detector's name (one of :data:`CONTINUOUS` or :data:`BINARY`) and arguments."""

    name: str
    kwargs: tuple[tuple[str, Any], ...]
    text: str

    @property
    def binary(self) -> bool:
        """Whether the detector takes 0/1 values only."""
        return self.name in BINARY

    def build(self) -> Any:
        """A new river detector as declared."""
        cls = {**CONTINUOUS, **BINARY}[self.name]
        kwargs = dict(self.kwargs)
        if "seed" in inspect.signature(cls).parameters:
            kwargs.setdefault("seed", SEED)
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise InvalidDetector(f"drift detector {self.text!r}: {exc}") from None


def parse_detector(text: str) -> DetectorSpec:
    """Parse (and try) a declaration; raises :class:`InvalidDetector` with what is wrong.

    >>> parse_detector("drift.ADWIN(delta=0.01)")
    DetectorSpec(name='ADWIN', kwargs=(('delta', 0.01),), text='drift.ADWIN(delta=0.01)')
    >>> parse_detector("HDDMA()").name, parse_detector("KSWIN").kwargs
    ('HDDM_A', ())
    """
    body = text.strip()
    for prefix in _PREFIXES:
        if body.startswith(prefix):
            body = body[len(prefix):]
            break
    try:
        node = ast.parse(body if "(" in body else f"{body}()", mode="eval").body
    except SyntaxError as exc:
        raise InvalidDetector(f"drift detector {text!r} is not Name(arguments): {exc.msg}") from None
    known = ", ".join([*CONTINUOUS, *BINARY])
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.args):
        raise InvalidDetector(f"drift detector {text!r}: write Name(keyword=value, ...), Name one of {known}")
    name = _ALIASES.get(node.func.id, node.func.id)
    if name not in CONTINUOUS and name not in BINARY:
        raise InvalidDetector(f"drift detector {text!r}: {node.func.id!r} is not one of {known}")
    kwargs = []
    for k in node.keywords:
        try:
            kwargs.append((str(k.arg), ast.literal_eval(k.value)))
        except ValueError:
            raise InvalidDetector(f"drift detector {text!r}: {ast.unparse(k.value)!r} is not a literal") from None
    spec = DetectorSpec(name, tuple(kwargs), text.strip())
    spec.build()  # river checks the arguments
    return spec


@dataclass(frozen=True)
class Alarm:
    """A detector's alarm: the signal's mean ``before`` and ``now``, and ``since_ms``, the event time where
    :func:`change_start` places the change among the values since the last alarm (None when the values came
    without times)."""

    before: float
    now: float
    since_ms: int | None


class Watched:
    """A declared detector over one signal. :meth:`update` feeds it a value (and its event time) and, when it
    alarms, answers an :class:`Alarm`: the detector's own estimates where it keeps one (ADWIN's window mean and
    width), else the mean since its last alarm and the mean of the latest :data:`RECENT` values."""

    def __init__(self, spec: DetectorSpec) -> None:
        self.spec = spec
        self.detector = spec.build()
        self.seen = 0
        self.alarms = 0
        self._sum = 0.0
        self._n = 0
        self._recent: deque[float] = deque(maxlen=RECENT)
        self._history: deque[tuple[float, int]] = deque(maxlen=HISTORY)

    def update(self, value: float, at_ms: int | None = None) -> Alarm | None:
        own = hasattr(self.detector, "estimation")
        before = float(self.detector.estimation) if own else (self._sum / self._n if self._n else value)
        self.detector.update(value)
        self.seen += 1
        self._sum += value
        self._n += 1
        self._recent.append(value)
        if at_ms is not None:
            self._history.append((value, at_ms))
        if not self.detector.drift_detected:
            return None
        self.alarms += 1
        now = float(self.detector.estimation) if own else sum(self._recent) / len(self._recent)
        since = change_start([v for v, _ in self._history], [t for _, t in self._history], up=now >= before)
        self._sum, self._n = 0.0, 0  # the next alarm is measured against what came after this one
        self._history.clear()
        return Alarm(before, now, since)


def change_start(values: list[float], times: list[int], *, up: bool = True) -> int | None:
    """The event time of the split of ``values``, in event-time order, whose two sides' means differ most in the
    direction ``up`` (an increase, else a decrease), weighted as binary segmentation weighs a split
    (``sqrt(k (n - k) / n)``); None for fewer than two values. Values come in label order: sorted by their event
    times first, so that one late label does not drag the change back by its delay.

    >>> change_start([0, 0, 0, 1, 1], [10, 11, 12, 13, 14]), change_start([1, 1, 0, 0], [1, 2, 3, 4], up=False)
    (13, 3)
    >>> change_start([0, 0, 1, 0, 1, 1], [10, 11, 13, 2, 14, 15])  # the 0 at event time 2 was labelled late
    13
    """
    n = len(values)
    if n < 2:
        return None
    order = np.argsort(np.asarray(times, dtype=np.int64), kind="stable")
    v = np.asarray(values, dtype=np.float64)[order]
    k = np.arange(1, n)
    head = np.cumsum(v)[:-1]
    gap = (v.sum() - head) / (n - k) - head / k
    split = int(np.argmax((gap if up else -gap) * np.sqrt(k * (n - k) / n))) + 1
    return int(times[order[split]])
