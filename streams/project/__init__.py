"""Projects: what a team declares (sources, feature views, models) and how Weir loads and checks it.

A project module imports what it needs from here::

    from streams.project import Agg, Feature, FeatureView, Model, Project, Source, ...

See ``docs/projects.md`` for a walk-through and :mod:`streams.project.spec` for every declaration.
"""

from streams.project.spec import (
    MLP,
    TASKS,
    Agg,
    Cdc,
    Drift,
    Monitor,
    Feature,
    FeatureView,
    FirstSeen,
    GatePolicy,
    Hopping,
    LabelField,
    LabelStream,
    Model,
    Project,
    Range,
    RequestFeature,
    RetrainPolicy,
    Rules,
    Scenario,
    ScenarioRun,
    Sliding,
    Source,
    Task,
    Tumbling,
    ViewFeatures,
)

__all__ = [
    "MLP", "TASKS", "Agg", "Cdc", "Drift", "Feature", "FeatureView", "FirstSeen", "GatePolicy", "Hopping", "LabelField",
    "LabelStream", "Model", "Monitor", "Project", "Range", "RequestFeature", "RetrainPolicy", "Rules", "Scenario", "ScenarioRun", "Sliding",
    "Source", "Task", "Tumbling", "ViewFeatures",
]
