"""``weir drift replay``: a stream of values through Kafka and the drift stage's detector code path, beside
river's own detector on the same values.

It shows that a detector declared for a model (:class:`streams.project.spec.Drift`) behaves in Weir as it
does in river: each value (one per line of ``--values``) is produced, in order, to the single-partition
topic ``weir.replay``; a :class:`~streams.runtime.BatchRunner` runs :class:`ReplayDriftStage`, which feeds
each one to a :class:`~models.drift_detectors.Watched`, the object the drift stage feeds its signals to;
and river's detector, built from the same declaration, is fed the same values in a plain loop. The indices
(from 0) where each alarmed are printed side by side; the last line is JSON with ``weir_alarms`` and
``river_alarms``.

Run: ``.venv/bin/weir drift replay --detector "PageHinkley(threshold=20)" --values values.txt``
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.drift_detectors import DetectorSpec, InvalidDetector, Watched, parse_detector
from streams.replay import ReplayStage, produce_replay


class ReplayError(ValueError):
    """Values a detector cannot take, or a file that holds none; the message names the line."""


def read_values(path: Path, spec: DetectorSpec) -> list[float]:
    """One number per line (blank lines skipped); a detector over 0/1 values takes only 0 and 1."""
    values = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = float(line)
        except ValueError:
            raise ReplayError(f"{path}:{n}: {line.strip()!r} is not a number") from None
        if not math.isfinite(value) or (spec.binary and value not in (0.0, 1.0)):
            raise ReplayError(f"{path}:{n}: {spec.name} takes " + ("0 or 1" if spec.binary else "finite numbers")
                              + f", not {line.strip()}")
        values.append(value)
    if not values:
        raise ReplayError(f"{path} holds no value")
    return values


class ReplayDriftStage(ReplayStage):
    """Feeds each ``weir.replay`` value of one run to the declared detector, in log order."""

    step_id = "replay-drift"

    def __init__(self, run: str, spec: DetectorSpec) -> None:
        super().__init__(run)
        self.watched = Watched(spec)
        self.alarms: list[int] = []

    def apply(self, record: dict[str, Any]) -> None:
        if self.watched.update(record["x"]["value"]) is not None:
            self.alarms.append(self.next_seq)


def river_alarms(spec: DetectorSpec, values: list[float]) -> list[int]:
    """Where river's detector, built from ``spec``, alarms on ``values`` fed one by one."""
    detector = spec.build()
    alarms = []
    for i, value in enumerate(values):
        detector.update(value)
        if detector.drift_detected:
            alarms.append(i)
    return alarms


@dataclass(frozen=True)
class DriftReplayResult:
    detector: str
    values: int
    weir_alarms: list[int]
    river_alarms: list[int]
    seconds: float

    def as_json(self) -> str:
        return json.dumps({"detector": self.detector, "values": self.values, "weir_alarms": self.weir_alarms,
                           "river_alarms": self.river_alarms, "equal": self.weir_alarms == self.river_alarms,
                           "seconds": round(self.seconds, 2)})


def replay_detector(bootstrap: str, spec: DetectorSpec, values: list[float], *, timeout_s: float = 120.0
                    ) -> DriftReplayResult:
    """Replay ``values`` through Kafka and the detector; compare with river (see the module docstring)."""
    t0 = time.monotonic()
    run = uuid.uuid4().hex
    produce_replay(bootstrap, run, (({"value": v}, 0) for v in values))
    stage = ReplayDriftStage(run, spec)
    stage.run_through(bootstrap, len(values), timeout_s=timeout_s)
    return DriftReplayResult(spec.text, len(values), stage.alarms, river_alarms(spec, values),
                             time.monotonic() - t0)


def _run(args: argparse.Namespace) -> int:
    from streams.settings import WeirSettings
    from streams.stack import Stack

    try:
        spec = parse_detector(args.detector)
        values = read_values(Path(args.values), spec)
    except (InvalidDetector, ReplayError, OSError) as exc:
        print(f"weir drift replay: {exc}", file=sys.stderr)
        return 2
    with Stack(WeirSettings(), with_postgres=False) as endpoints:
        print(f"replaying {len(values):,} values through Kafka and {spec.text} ...", flush=True)
        result = replay_detector(endpoints.kafka_bootstrap, spec, values)
    print(f"{result.values:,} values, {spec.text}: weir alarmed at {result.weir_alarms}, river at "
          f"{result.river_alarms} ({'equal' if result.weir_alarms == result.river_alarms else 'DIFFERENT'}), "
          f"{result.seconds:.1f} s")
    print(result.as_json())
    return 0 if result.weir_alarms == result.river_alarms else 1


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("drift", help="drift detectors: replay one on a stream of values beside river's")
    cmds = p.add_subparsers(dest="drift_command", required=True)
    r = cmds.add_parser("replay", help="stream values (one per line) through Kafka and a drift detector; "
                                       "print where it alarmed beside river's own detector")
    r.add_argument("--detector", required=True, help='a river drift detector, e.g. "ADWIN(delta=0.002)", '
                   '"PageHinkley(threshold=50)", "KSWIN(alpha=0.005)", "DDM()", "EDDM()", "HDDM_A()", '
                   '"HDDM_W()" (docs/learning.md, "Drift")')
    r.add_argument("--values", required=True, metavar="FILE", help="one number per line (0 or 1 for DDM, "
                   "EDDM, HDDM_A, HDDM_W, FHDDM)")
    r.set_defaults(handler=_run)
