"""Topic names and the partitioner internal micro-batch topics use."""

from __future__ import annotations

import zlib

CLICKS = "clickstream.events"
CDC_PAYMENTS = "cdc.payments"
CDC_LABELS = "cdc.payment_labels"
CDC_TABLES = ["customers", "merchants", "orders", "payments", "payment_labels"]
LABELS = "labels.fraud"
PREDICTIONS = "predictions.fraud"
PREDICTIONS_ONLINE = "predictions.fraud.online"
PREDICTIONS_SHADOW = "predictions.shadow.fraud"  # shadow challengers of the fraud model: nothing else
ALERTS = "alerts"
RETRAIN = "retrain"
MODEL_EVENTS = "model.events"
MODEL_METRICS = "model.metrics"
MODEL_COMMANDS = "model.commands"

# internal, micro-batched per partition (Weir's own business, see DESIGN.md)
I_CLICKS = "weir.clicks"
I_PAYMENTS = "weir.payments"
I_SCORING = "weir.scoring"
I_SCORED = "weir.scored"
I_OUTCOMES = "weir.outcomes"
I_FEATURE_LOG = "weir.feature_log"
I_AUDIT = "weir.audit"  # prediction audit records, to ClickHouse prediction_audit
REPLAY = "weir.replay"  # `weir replay`: river datasets, one partition, created on demand

PUBLIC = [CLICKS, *(f"cdc.{t}" for t in CDC_TABLES), LABELS, PREDICTIONS, PREDICTIONS_ONLINE, PREDICTIONS_SHADOW, ALERTS, RETRAIN,
          MODEL_EVENTS, MODEL_METRICS, MODEL_COMMANDS]
INTERNAL = [I_CLICKS, I_PAYMENTS, I_SCORING, I_SCORED, I_OUTCOMES, I_FEATURE_LOG, I_AUDIT]
DLQ = [f"dlq.{t}" for t in PUBLIC + INTERNAL]
ALL = PUBLIC + INTERNAL + DLQ


def partition_for(key: str, partitions: int) -> int:
    """Stable partition of an entity key (CRC-32), the same in every process."""
    return zlib.crc32(key.encode()) % partitions
