"""Retrain: train a challenger from ClickHouse, export it to ONNX, register it, gate it, announce it.

Input: ``retrain`` requests (from the drift stage, the apscheduler cron, the
bootstrap check, or a person). The training set is the feature platform's
point-in-time set of the newest ``window_rows`` labelled payments: each
payment's feature values as of its event time from ``feature_log``
(:func:`streams.features.offline.training_set`; the card view is exactly what
inference scored the payment with). Requests in one batch coalesce into one
training run, in a child process (seeded, early stopping, class weights,
progress logged every 5 epochs: :func:`models.train.train_mlp`).

The new version is registered as a ``candidate`` with its lineage (training
set time range, rows and content hash, feature views and their fingerprints,
code version, hyperparameters, the champion it was compared with) and the
metrics the gates need, measured on the newest quarter of its training set
for it *and* the current champion (:mod:`models.gates`). If every gate passes
it is promoted to ``production`` (the previous one is archived); if not it
stays a candidate and the failed gates are logged and announced. Each
transition is one ``model.events`` record (actor, reason, metrics, lineage),
which the ClickHouse sink keeps in ``model_events``; inference swaps to a new
production version without a restart.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from confluent_kafka import Producer

from models.base import InvalidModelInput, ModelIntegrityError
from models.export import export_onnx, export_torchscript, sha256_file
from models.gates import GatePolicy, decide, expected_calibration_error
from models.lineage import code_version
from models.metrics import roc_auc
from models.registry import ModelRegistry, ModelVersion
from models.scorer import OnnxScorer
from models.train import train_mlp
from models.variants import evaluate_variants, report_metrics
from sinks.clickhouse import ClickHouse
from streams import topics as T
from streams.base import Message, Produce, StepResult
from streams.codec import AvroCodec, decoded
from streams.features.definitions import FEATURE_NAMES, VIEWS, view_key
from streams.features import offline
from streams.kafka import producer_config
from streams.stages.inference import DECISION_THRESHOLD, MODEL_NAME, model_version_name

log = logging.getLogger(__name__)

class CommandRefused(ValueError):
    """A model command that cannot be carried out, with the reason a person can act on."""


HYPERPARAMETERS: dict[str, Any] = {"hidden": [32, 16], "max_epochs": 60, "patience": 6, "batch_size": 256,
                                   "lr": 3e-3, "val_fraction": 0.25}


def _worker_init() -> None:
    torch.set_num_threads(1)  # the machine's other core serves the stream stages
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s retrain-worker: %(message)s")


def _progress(epoch: int, loss_train: float, loss_val: float) -> None:
    """Training progress, one line every 5 epochs (the worker process logs to stderr)."""
    if epoch == 1 or epoch % 5 == 0:
        log.info("epoch %d: train loss %.4f, validation loss %.4f", epoch, loss_train, loss_val)


def train_and_export(X: np.ndarray, y: np.ndarray, ts: np.ndarray, seed: int, path: Path,
                     champion: str | None = None) -> tuple[dict[str, float], list[tuple[int, float, float, float]]]:
    """Train the MLP, write its ONNX export to ``path`` (and its TorchScript companion, for the torch serving
    backend, to ``path.with_suffix(".pt")``) and measure what the gates need (runs in the training process).
    Returns the metrics and the learning curve ((epoch, train loss, validation loss, validation AUC) per epoch).

    Besides the trainer's metrics: ``missed_fraud_val`` (the share of validation frauds scored below the
    decision threshold, the baseline the drift stage holds the model to), ``ece_val``, the FP32 and INT8
    variants' parity, latency, accuracy and size (:func:`models.variants.report_metrics`; ``p50_ms`` is the
    FP32 file's, batches of 256 on CPU) and, when ``champion`` (its ONNX path) is given, the champion's
    ``champion_auc_val`` and ``champion_ece_val`` on the same validation window."""
    log.info("training on %d rows (%d positive), %d features", len(y), int(y.sum()), X.shape[1])
    trained = train_mlp(X, y, ts, seed=seed, progress=_progress, **HYPERPARAMETERS)
    log.info("trained: best epoch %d of %d, validation AUC %.4f", trained.metrics["best_epoch"],
             trained.metrics["epochs_run"], trained.metrics["auc_val"])
    export_onnx(trained.module, X.shape[1], path)
    export_torchscript(trained.module, X.shape[1], path.with_suffix(".pt"))
    metrics = {k: float(v) for k, v in trained.metrics.items()}
    n_val = int(metrics["n_val"])  # the split is the newest n_val rows by event time (X is sorted)
    X_val, y_val = X[-n_val:], y[-n_val:]
    with torch.no_grad():
        scores = trained.module(torch.from_numpy(X_val)).numpy()
    frauds = y_val == 1
    metrics["frauds_val"] = float(frauds.sum())
    metrics["missed_fraud_val"] = float((scores[frauds] < DECISION_THRESHOLD).mean()) if frauds.any() else float("nan")
    metrics["ece_val"] = expected_calibration_error(y_val, scores)
    # FP32 (served) and INT8 variants: parity with torch, latency, accuracy and size, recorded at registration
    metrics |= report_metrics(evaluate_variants(trained.module, path, X_val, y_val, out_dir=path.parent))
    metrics["p50_ms"] = metrics["fp32_p50_ms"]  # what the latency gate reads: the variant that serves
    if champion is not None:
        champion_scores = OnnxScorer(Path(champion), "champion", prefer_gpu=False).predict(X_val)
        metrics["champion_auc_val"] = roc_auc(y_val, champion_scores)
        metrics["champion_ece_val"] = expected_calibration_error(y_val, champion_scores)
    return metrics, trained.curve


class RetrainStage:
    step_id = "retrain"
    topics = (T.RETRAIN, T.MODEL_COMMANDS)
    slow = True  # training takes seconds to minutes: the runner keeps the consumer alive meanwhile

    def __init__(self, ch: ClickHouse, registry: ModelRegistry, *, window_rows: int = 4000, min_rows: int = 300,
                 seed: int = 0, clock: Callable[[], float] = time.time, policy: GatePolicy = GatePolicy(),
                 label_maturity_ms: int = 600_000) -> None:
        self.ch = ch
        self.policy = policy
        self.label_maturity_ms = label_maturity_ms
        self.registry = registry
        self.window_rows = window_rows
        self.min_rows = min_rows
        self.seed = seed
        self.clock = clock
        self.runs: list[dict[str, Any]] = []
        self.busy = False  # a training run is in progress
        # Training runs in a child process: in this one it would share the GIL with every stream
        # stage (measured: 0.1 s alone, 9 s beside the stages at 2,000 events/s). The worker is
        # spawned now, so its imports are paid before the first retrain.
        self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_worker_init)
        self._pool.submit(int)  # the pool starts its worker lazily: start it now
        self._in = {T.RETRAIN: AvroCodec(T.RETRAIN), T.MODEL_COMMANDS: AvroCodec(T.MODEL_COMMANDS)}
        self._out = AvroCodec(T.MODEL_EVENTS)

    def handle(self, batch: list[Message]) -> StepResult:
        result = StepResult()
        reasons = []
        for msg, req in decoded(batch, self._in, result):
            if msg.topic == T.MODEL_COMMANDS:
                result.produce.append(self.command(req))
                continue
            since = req["since_ts"]
            reasons.append((req["reason"], int(since.timestamp() * 1000) if since else 0))
        if reasons:
            self.busy = True
            try:
                transitions = self.train(", ".join(r for r, _ in reasons), min(s for _, s in reasons))
            finally:
                self.busy = False
            result.produce.extend(self._announce(v, why) for v, why in transitions)
        return result

    def training_set(self, since_ms: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
        """The feature platform's point-in-time training set of the newest ``window_rows`` labelled payments
        whose labels are mature (:func:`streams.features.offline.training_set`): (X, y, event times) sorted by
        time, and its SHA-256.

        Mature: paid at least ``label_maturity_ms`` before the newest label. Frauds are labelled later than
        legitimate payments (chargebacks), so the newest labelled payments are nearly all legitimate; trained
        on, they bias the model, and as its validation window they may hold no fraud at all (no AUC: the
        quality gate refuses the model)."""
        newest_label = self.ch.scalar("SELECT toUnixTimestamp64Milli(max(label_ts)) FROM labels")
        until = int(newest_label) - self.label_maturity_ms if newest_label else None
        ts_set = offline.training_set(self.ch, since_ms=since_ms or None, until_ms=until, limit=self.window_rows)
        order = np.argsort(ts_set.event_ts, kind="stable")
        return (ts_set.X[order], ts_set.y[order].astype(np.float32), ts_set.event_ts[order], ts_set.sha256)

    def train(self, reason: str, since_ms: int = 0) -> list[tuple[ModelVersion, str]]:
        """One training run: register the model as a candidate, judge it with the gates, promote it to
        production if they pass. Returns the transitions to announce (none when the data cannot train one)."""
        X, y, ts, content = self.training_set(since_ms)
        run: dict[str, Any] = {"reason": reason, "rows": len(y), "positives": int(y.sum())}
        self.runs.append(run)
        if len(y) < self.min_rows or y.min(initial=1) == y.max(initial=0):
            run["skipped"] = f"{len(y)} labelled rows, {int(y.sum())} positive: not enough to train"
            log.warning("retrain skipped: %s", run["skipped"])
            return []
        champion = self.registry.latest(MODEL_NAME, stage="production")
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.onnx"
            try:
                metrics, curve = self._pool.submit(train_and_export, X, y, ts, self.seed, path,
                                                   champion.artifact_uri if champion else None).result()
            except ValueError as exc:  # e.g. the time-based split left one class in the training part
                run["skipped"] = str(exc)
                log.warning("retrain skipped: %s", exc)
                return []
            metrics["train_seconds"] = time.perf_counter() - started
            decision = decide(metrics, self.policy)
            metrics |= decision.as_metrics()
            torchscript = path.with_suffix(".pt")
            lineage = self.lineage(reason, X, y, ts, content, champion) | {
                "gates": decision.summary(), "learning_curve": json.dumps([[round(x, 6) for x in row] for row in curve]),
                "torchscript_sha256": sha256_file(torchscript)}
            version = self.registry.register(MODEL_NAME, path, metrics=metrics, lineage=lineage, stage="candidate",
                                             companions=[torchscript])
        run.update(version=version.version, gates=decision.summary(), **metrics)
        transitions = [(version, f"registered after a retrain request ({reason})")]
        if decision.passed:
            version = self.registry.set_stage(MODEL_NAME, version.version, "production")
            transitions.append((version, f"gates passed: {decision.summary()}"))
            run["promoted"] = True
            log.warning("retrained %s on %d rows (%s), promoted: %s", model_version_name(version.version), len(y),
                        reason, decision.summary())
        else:
            run["blocked"] = decision.failed()
            log.warning("retrained %s on %d rows (%s), NOT promoted: %s", model_version_name(version.version),
                        len(y), reason, decision.failed())
        return transitions

    def lineage(self, reason: str, X: np.ndarray, y: np.ndarray, ts: np.ndarray, content: str,
                champion: ModelVersion | None) -> dict[str, str]:
        """Everything needed to trace the model to its data and code."""
        return {
            "reason": reason, "rows": str(len(y)), "positives": str(int(y.sum())), "features": ",".join(FEATURE_NAMES),
            "ts_min_ms": str(int(ts.min())), "ts_max_ms": str(int(ts.max())), "training_set_sha256": content,
            "label_maturity_ms": str(self.label_maturity_ms),
            "training_set": "point-in-time: feature_log as of each labelled payment (weir features training-set)",
            "feature_views": ",".join(f"{view_key(v)}@{v.fingerprint}" for v in VIEWS),
            "code_version": code_version(), "seed": str(self.seed),
            "hyperparameters": json.dumps(HYPERPARAMETERS, sort_keys=True),
            "champion": "" if champion is None else model_version_name(champion.version),
        }

    # --- a person's commands (weir models promote|rollback): this stage is the registry's one writer ---

    def command(self, cmd: dict[str, Any]) -> Produce:
        """Execute a ``model.commands`` record; the result (the transition, or why it was refused) is one
        ``model.events`` record whose reason names the command."""
        asked = f"{cmd['reason']} (command {cmd['command_id']})"
        try:
            if cmd["action"] == "promote":
                v = self.promote(cmd["model_name"], cmd["version"], cmd["stage"], force=cmd["force"])
                forced = cmd["force"] and v.metrics.get("gates_passed") != 1.0
                return self._announce(v, ("FORCED past failed gates: " if forced else "") + asked, cmd["actor"])
            if cmd["action"] == "rollback":
                return self._announce(self.rollback(cmd["model_name"]), f"rollback: {asked}", cmd["actor"])
            raise CommandRefused(f"unknown action {cmd['action']!r} (promote or rollback)")
        except (CommandRefused, KeyError, ModelIntegrityError, InvalidModelInput) as exc:
            detail = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)  # KeyError quotes its str
            log.warning("model command refused: %s", detail)
            return self._refusal(cmd, f"refused: {detail}; asked: {asked}")

    def promote(self, name: str, version: int, stage: str, *, force: bool = False) -> ModelVersion:
        """Move a version to ``stage``; to canary or production only if its gates passed (or ``force``)."""
        mv = self.registry.get(name, version)  # KeyError if unknown; the artifact's checksum is verified
        if stage in ("canary", "production") and mv.metrics.get("gates_passed") != 1.0 and not force:
            raise CommandRefused(f"{name} v{version} did not pass its gates ({mv.lineage.get('gates', 'not gated')}); "
                                 "promote with --force and a reason to override")
        return self.registry.set_stage(name, version, stage)

    def rollback(self, name: str) -> ModelVersion:
        """Put back the production version that preceded the current one (from the audit log)."""
        current = self.registry.latest(name, stage="production")
        if current is None:
            raise CommandRefused(f"{name} has no production version to roll back")
        history = [int(v) for (v,) in self.ch.rows(
            "SELECT version FROM model_events FINAL WHERE model_name = {n:String} AND stage = 'production' "
            "ORDER BY ts DESC", {"n": name})]
        previous = next((v for v in history if v != current.version), None)
        if previous is None:
            raise CommandRefused(f"{name} v{current.version} is the only version that was ever in production")
        return self.registry.set_stage(name, previous, "production")

    def _refusal(self, cmd: dict[str, Any], reason: str) -> Produce:
        return self._event(cmd["model_name"], cmd["version"], "refused", cmd["actor"], reason)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _announce(self, v: ModelVersion, reason: str, actor: str = "retrain") -> Produce:
        return self._event(v.name, v.version, v.stage, actor, reason, artifact_uri=v.artifact_uri, sha256=v.sha256,
                           metrics={k: float(x) for k, x in v.metrics.items()}, lineage=dict(v.lineage))

    def _event(self, name: str, version: int, stage: str, actor: str, reason: str, *, artifact_uri: str = "",
               sha256: str = "", metrics: dict[str, float] | None = None, lineage: dict[str, str] | None = None
               ) -> Produce:
        """One ``model.events`` record (a transition, or a refused command with empty artifact fields)."""
        event = {
            "event_id": str(uuid.uuid4()), "ts": int(self.clock() * 1000), "model_name": name, "version": version,
            "stage": stage, "artifact_uri": artifact_uri, "sha256": sha256, "metrics": metrics or {},
            "actor": actor, "reason": reason, "lineage": lineage or {},
        }
        return Produce(T.MODEL_EVENTS, name.encode(), self._out.encode(event))


class RetrainScheduler:
    """apscheduler jobs that request retrains: a cron, and a bootstrap check while no champion exists."""

    def __init__(self, bootstrap: str, ch: ClickHouse, registry: ModelRegistry, cron: str, *,
                 bootstrap_rows: int = 600, check_every_s: float = 2.0, bootstrap_retry_s: float = 20.0,
                 label_maturity_ms: int = 600_000) -> None:
        self.ch = ch
        self.label_maturity_ms = label_maturity_ms
        self.registry = registry
        self.bootstrap_rows = bootstrap_rows
        self.bootstrap_retry_s = bootstrap_retry_s
        self._last_bootstrap = 0.0
        self._producer = Producer(producer_config(bootstrap))
        self._codec = AvroCodec(T.RETRAIN)
        self._bootstrapped = False
        self._scheduler = BackgroundScheduler(timezone="UTC")
        self._scheduler.add_job(self.request, CronTrigger.from_crontab(cron, timezone="UTC"), args=["schedule"])
        self._scheduler.add_job(self._bootstrap_check, "interval", seconds=check_every_s)

    def start(self) -> None:
        self._scheduler.start()

    def stop(self) -> None:
        self._scheduler.shutdown(wait=False)
        self._producer.flush(10)

    def request(self, reason: str) -> None:
        req = {"request_id": str(uuid.uuid4()), "ts": int(time.time() * 1000), "reason": reason, "since_ts": None}
        self._producer.produce(T.RETRAIN, self._codec.encode(req), MODEL_NAME.encode())
        self._producer.flush(10)

    def _bootstrap_check(self) -> None:
        """While no champion exists, request a retrain once enough labels are in; again after
        ``bootstrap_retry_s`` if that run could not train one (e.g. too few frauds yet)."""
        if self._bootstrapped or time.monotonic() - self._last_bootstrap < self.bootstrap_retry_s:
            return
        if self.registry.latest(MODEL_NAME, stage="production") is not None:
            self._bootstrapped = True
            return
        labelled = self.ch.scalar(  # mature labels: what the retrain stage will train on
            "SELECT count() FROM labels WHERE toUnixTimestamp64Milli(payment_ts) <= "
            "(SELECT toUnixTimestamp64Milli(max(label_ts)) FROM labels) - {m:Int64}", {"m": self.label_maturity_ms})
        if labelled is not None and labelled >= self.bootstrap_rows:
            self._last_bootstrap = time.monotonic()
            self.request(f"bootstrap: no champion yet, {labelled} mature labels")
