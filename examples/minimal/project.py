"""A minimal Weir project: one source, one feature view, one model that learns from a field of each event.

Machines report sensor readings to ``sensor.readings``; each reading is scored
("is the machine faulty?") from the sensor's last minute of readings and the
reading itself, and its label comes with it (an inline check), so the online
learner learns right after scoring. ``docs/projects.md`` walks through it;
``tests/test_minimal_project.py`` runs it; ``weir init DIR --template minimal``
starts a project from it; ``weir --project examples/minimal/project.py demo``
drives it with :mod:`examples.minimal.scenario` (a second failure mode appears
half way).
"""

from pathlib import Path

from examples.minimal.scenario import SensorScenario
from streams.project import (
    Agg,
    Feature,
    FeatureView,
    LabelField,
    Model,
    Project,
    Range,
    RequestFeature,
    Sliding,
    Source,
    ViewFeatures,
)

MINUTE = 60_000

readings = Source(
    "readings", "sensor.readings", event_id="reading_id", event_time="ts", keys=("sensor_id",),
    fields=("sensor_id", "temperature", "vibration", "faulty"),
    required=("sensor_id",), ranges=(Range("temperature", -50.0, 150.0), Range("vibration", 0.0, 100.0)),
)

sensor = FeatureView(
    "sensor", "sensor_id", 1, source="readings", ttl_ms=60 * MINUTE,
    specs=(
        Feature("readings_1m", Agg.COUNT, Sliding(MINUTE), "readings in the last minute"),
        Feature("mean_temperature_1m", Agg.MEAN, Sliding(MINUTE), "mean temperature, 1 min", value="temperature"),
        Feature("max_vibration_1m", Agg.MAX, Sliding(MINUTE), "highest vibration, 1 min", value="vibration"),
        Feature("secs_since_last", Agg.SINCE_LAST, Sliding(MINUTE), "seconds since the previous reading",
                default=60.0),
    ),
)

fault = Model(
    "fault", "binary", source="readings",
    features=(ViewFeatures(sensor),
              RequestFeature("temperature", "temperature"),
              RequestFeature("hot", "temperature > 90", "1 above 90 °C")),
    label=LabelField("faulty"),
    carry=("sensor_id",),
)

project = Project("sensors", Path(__file__).parent / "schemas", sources=(readings,), views=(sensor,),
                  models=(fault,), scenario=SensorScenario())
