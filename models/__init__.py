"""Weir models: online learners (river), batch trainers (torch), ONNX export,
ONNX Runtime scorers and the ClickHouse-backed model registry.

Implementations depend only on the interfaces in :mod:`models.base`. Heavy
imports (torch, onnxruntime, clickhouse) live in their own modules, so
``import models`` stays cheap; import what you need from the submodule::

    from models.train import train_mlp
    from models.export import export_onnx
    from models.scorer import OnnxScorer, RuleScorer
    from models.registry import ModelRegistry
"""

from models.base import BatchScorer, InvalidModelInput, ModelIntegrityError, OnlineLearner

__all__ = ["BatchScorer", "InvalidModelInput", "ModelIntegrityError", "OnlineLearner"]
