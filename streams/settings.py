"""One frozen settings model for a Weir deployment (env prefix ``WEIR_``).

Unset service URLs mean "start the embedded one". Stages never see this
object: the CLI reads it and hands plain values to what it builds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class WeirSettings(BaseSettings):
    """Settings read from ``WEIR_*`` environment variables."""

    model_config = SettingsConfigDict(env_prefix="WEIR_", frozen=True, extra="ignore")

    project: str | None = Field(
        None, description="The project Weir runs: package.module:attribute (the current directory is importable) "
        "or path/to/project.py[:attribute]; unset: project.py in the current directory. See docs/projects.md.")
    data_dir: Path = Field(Path(".weir"), description="Where embedded services and artifacts keep their data.")
    kafka_bootstrap: str | None = Field(None, description="Kafka bootstrap servers; unset starts embedded Tansu.")
    redis_url: str | None = Field(None, description="Redis URL; unset starts embedded valkey.")
    clickhouse_url: str | None = Field(
        None, description="ClickHouse http(s) URL, or chdb://<dir>; unset uses chdb under data_dir/clickhouse."
    )
    postgres_dsn: SecretStr | None = Field(
        None, description="PostgreSQL DSN with logical replication; unset starts embedded PostgreSQL."
    )
    schema_registry_url: str | None = Field(
        None, description="Confluent-compatible schema registry URL; unset serves Weir's own (state in `_schemas`)."
    )
    pseudonym_key: SecretStr = Field(
        SecretStr("weir-dev-pseudonym-key"),
        description="HMAC key for PII tokens; set a secret of your own in production (changing it changes tokens).",
    )
    dedup_horizon_s: int = Field(900, ge=1, description="How long ingest remembers an event id (in Redis).")
    event_max_future_s: int = Field(300, ge=0, description="Refuse events whose time is further ahead of the clock.")
    event_max_age_s: int = Field(7 * 86_400, ge=1, description="Refuse events older than this (snapshots excepted).")
    allowed_lateness_s: int = Field(600, ge=0, description="How far behind its partition's watermark base "
                                                          "(its third newest event) an event may be before it is "
                                                          "refused as late.")
    features_checkpoint_s: float = Field(
        5.0, gt=0, description="How often the features stage snapshots its window state to Redis (after a commit)."
    )
    learn_checkpoint_s: float = Field(
        30.0, gt=0, description="How often the learn stage snapshots its online model, metric and pending label "
        "joins to Redis (signed; after a commit)."
    )
    partitions: int = Field(4, ge=1, description="Partitions for topics Weir creates.")
    batch_max_size: int = Field(500, ge=1, description="Max events per micro-batch in the hot path.")
    batch_max_wait_ms: int = Field(5, ge=1, description="Max time a hot-path micro-batch waits to fill.")
    fetch_wait_ms: int = Field(10, ge=1, description="Hot-path consumers' fetch.wait.max.ms (latency vs broker CPU).")
    inference_max_batch: int = Field(256, ge=1, description="Max events per inference batch (one model run).")
    inference_max_wait_ms: int = Field(5, ge=1, description="Max time a scored event waits for its inference batch "
                                                            "to fill (the inference consumer's batch wait).")
    inference_backend: Literal["onnx", "torch"] = Field(
        "onnx", description="onnx: ONNX Runtime (CUDA EP with I/O binding when a GPU is present, else CPU); torch: "
        "the version's TorchScript companion (CUDA when present).")
    inference_model_timeout_ms: int = Field(
        500, ge=1, description="A model run that takes longer is given up on: the batch is served by the online "
        "learner (else the rule score), and the model is retried after inference_model_cooldown_s.")
    inference_model_cooldown_s: float = Field(5.0, gt=0, description="How long a failed model version is skipped.")
    inference_redis_timeout_ms: int = Field(
        250, ge=1, description="Inference's Redis socket timeout: past it a batch is served with last-known or "
        "default features, flagged degraded, and Redis is retried after a second.")
    inference_cache_ttl_s: int = Field(
        0, ge=0, description="Response cache TTL in Redis (keyed by model version and feature-vector hash); 0 "
        "disables it. It costs two Redis round trips per batch: enable it for models slower than that.")
    canary_fraction: float = Field(
        0.1, ge=0, le=1, description="Share of entities (by stable hash) a model version in stage canary serves.")
    audit_features: Literal["vector", "hash"] = Field(
        "vector", description="What the prediction audit table keeps of each feature vector: the vector, or only "
        "its BLAKE2b hash (always kept).")
    drift_delta: float = Field(0.002, gt=0, description="ADWIN confidence parameter for error drift.")
    retrain_cron: str = Field("*/30 * * * *", description="apscheduler cron for scheduled retrains.")
    log_level: str = Field("WARNING", description="Python log level.")
    shutdown_timeout_s: float = Field(
        30.0, gt=0, description="On SIGTERM (or Ctrl-C) every stage commits what it processed and stops; a "
        "process still stopping after this long exits anyway (what it had not committed is processed again).")
    kafka_port: int = Field(19092, ge=0, le=65535, description="The embedded Kafka broker's loopback port (when "
                            "kafka_bootstrap is unset); 0: a free one at each start.")
    redis_port: int = Field(16379, ge=0, le=65535, description="The embedded valkey's loopback port (when redis_url "
                            "is unset); 0: a free one at each start.")
    postgres_port: int = Field(15432, ge=0, le=65535, description="The embedded PostgreSQL's loopback port (when "
                               "postgres_dsn is unset); 0: a free one at each start.")
    schema_registry_port: int = Field(18081, ge=0, le=65535, description="The port of the schema registry Weir "
                                      "serves (when schema_registry_url is unset); 0: a free one at each start.")
    schema_registry_host: str = Field("127.0.0.1", description="The address the schema registry Weir serves "
                                      "listens on: 0.0.0.0 when workers on other machines use it.")
    health_port: int = Field(18088, ge=0, le=65535, description="`weir up` and `weir worker` serve GET /healthz on "
                             "this port (200 when every stage runs, else 503, with each stage's state) and GET "
                             "/metrics (Prometheus); 0: a free port. Written to endpoints.json as health_url. "
                             "`weir worker` takes a free port unless this is set (it runs beside `weir up`), as do the "
                             "workers of `weir up --workers N`.")
    health_host: str = Field("127.0.0.1", description="The address /healthz and /metrics listen on: 0.0.0.0 in a "
                             "container, for the orchestrator's probes and Prometheus.")
    dlq_max_ratio: float = Field(
        0.5, ge=0, description="Pause a stage when more than this share of its last dlq_window input messages "
                               "went to the dead-letter queue (a bad deploy upstream); >= 1 disables the guard.")
    dlq_pause_s: float = Field(30.0, gt=0, description="How long the DLQ ratio guard pauses a stage; doubled per "
                                                      "consecutive trip, up to 15 min.")
    dlq_window: int = Field(1000, ge=0, description="Input messages per stage the DLQ ratio guard looks back "
                                                    "over; 0 disables the guard.")
    dlq_min_events: int = Field(200, ge=0, description="The DLQ ratio guard never trips before its window holds "
                                                       "this many messages (at most dlq_window).")
