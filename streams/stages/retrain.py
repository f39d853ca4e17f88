"""Retrain: train a challenger from ClickHouse, export it to ONNX, register it, gate it, announce it.

Input: ``retrain`` requests, each naming a model of the project (from the
drift stage, the apscheduler cron, the bootstrap check, or a person). The
training set is the feature platform's point-in-time set of the model's newest
``window_rows`` labelled events (its trainer's): each event's feature values
as of its time from ``feature_log`` (:func:`streams.features.offline.training_set`;
the views over the scored source are exactly what inference scored it with).
Requests for one model in one batch coalesce into one training run, in a child
process (seeded, early stopping, progress logged every 5 epochs:
:func:`models.train.train_mlp` with the model's task and hyperparameters).

The new version is registered as a ``candidate`` with its lineage (training
set time range, rows and content hash, feature views and their fingerprints,
code version, hyperparameters, the champion it was compared with) and the
metrics the gates need, measured on the newest quarter of its training set
(after a drift, of its rows after the change) for it *and* the current
champion (:mod:`models.gates`, with the model's own policy and, for a binary
model, its decision threshold). If every gate passes
it is promoted to ``production`` (the previous one is archived); if not it
stays a candidate and the failed gates are logged and announced. Each
transition is one ``model.events`` record (actor, reason, metrics, lineage),
which the ClickHouse sink keeps in ``model_events``; inference swaps to a new
production version without a restart.

**Crash safety.** The registry (ClickHouse) is written first; the
``model.events`` records follow in the batch's output, and the request's
offset is committed only after they are acknowledged. A crash in between
leaves the request uncommitted, so it is delivered again; every version
records the requests it served (lineage ``retrain_requests``), so the stage
recognises a redelivered request as done: it finishes what the crash cut
short (a candidate whose gates passed is promoted) and announces the
version's transitions again instead of training another. Each announcement's
``event_id`` is derived from (model, version, revision, stage), so a
transition announced twice is one row of ``model_events`` (a
``ReplacingMergeTree`` on ``event_id``) and one change of serving.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from confluent_kafka import Producer

from models.base import InvalidModelInput, ModelIntegrityError
from models.export import export_onnx, export_torchscript, sha256_file
from models.feature_drift import Reference
from models.gates import decide, expected_calibration_error
from models.lineage import code_version
from models.metrics import roc_auc
from models.registry import FIRST_REVISION, ModelRegistry, ModelVersion
from models.scorer import OnnxScorer
from models.train import train_mlp
from models.variants import evaluate_variants, report_metrics
from sinks.clickhouse import ClickHouse
from streams import topics as T
from streams.base import Message, Produce, Stage, StepResult
from streams.codec import AvroCodec, decoded
from streams.features import offline
from streams.features.definitions import view_key
from streams.kafka import producer_config
from streams.project.spec import Model, Project

log = logging.getLogger(__name__)

MIN_ROWS_AFTER_CHANGE = 40  # rows after a drift's change that a run needs to validate on a quarter of them
MIN_POSITIVES_AFTER_CHANGE = 8  # and positives (a binary model): two in that quarter, on average
REFERENCE_ROWS = 1_000  # the newest training rows a version's inputs are watched against (Evidently: KS up to 1,000)
MIN_REFERENCE_ROWS = 200  # fewer complete rows: no reference (too few to tell a drift from noise)
EVENT_IDS = uuid.UUID("5b0d6c8e-2f7a-4c41-9a57-1f0e6d3b9a21")  # namespace of the derived model.events ids


def registered_because(reason: str) -> str:
    """The ``model.events`` reason of a version a training run registered (also when announced again)."""
    return f"registered after a retrain request ({reason})"


def promoted_because(gates: str) -> str:
    """The ``model.events`` reason of a version its gates promoted (also when announced again)."""
    return f"gates passed: {gates}"


class CommandRefused(ValueError):
    """A model command that cannot be carried out, with the reason a person can act on."""


def champion_of(registry: ModelRegistry, model: Model) -> ModelVersion | None:
    """The model's production version, if it was trained for the model's current definition (a version
    trained for another one expects other features: it neither serves nor is compared with)."""
    champion = registry.latest(model.name, stage="production")
    return champion if champion is not None and champion.lineage.get("model_definition") == model.definition \
        else None


def _worker_init(parent: int) -> None:
    torch.set_num_threads(1)  # the machine's other core serves the stream stages
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s retrain-worker: %(message)s")
    threading.Thread(target=_exit_with_parent, args=(parent,), name="parent-watch", daemon=True).start()


def worker_pool() -> ProcessPoolExecutor:
    """The one-process pool training runs in, its worker started (and its imports paid) now; the worker
    ends by itself when this process dies, however it dies."""
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
                               initargs=(os.getpid(),))
    pool.submit(int)  # the pool starts its worker lazily: start it now (it imports while we go on)
    return pool


def _exit_with_parent(parent: int) -> None:
    """End the worker once its parent is gone (killed with SIGKILL, it could not shut the pool down): no
    orphan keeps its memory, nor, through it, multiprocessing's resource tracker. Polled, because the
    kernel's parent-death signal follows the thread that spawned the worker, not the process."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)


def _progress(epoch: int, loss_train: float, loss_val: float) -> None:
    """Training progress, one line every 5 epochs (the worker process logs to stderr)."""
    if epoch == 1 or epoch % 5 == 0:
        log.info("epoch %d: train loss %.4f, validation loss %.4f", epoch, loss_train, loss_val)


def train_and_export(X: np.ndarray, y: np.ndarray, ts: np.ndarray, seed: int, path: Path,
                     champion: str | None = None, *, task: str = "binary", threshold: float = 0.5,
                     hyperparameters: dict[str, Any] | None = None, weights: np.ndarray | None = None,
                     val_after: int | None = None, reference_from: int | None = None,
                     ) -> tuple[dict[str, float], list[tuple[int, float, float, float]]]:
    """Train the MLP, write its ONNX export to ``path`` (and its TorchScript companion, for the torch serving
    backend, to ``path.with_suffix(".pt")``; with ``reference_from``, the rows of ``X`` from that index on
    and their scores, the reference the drift stage watches its inputs against, to
    ``path.with_suffix(".npz")``) and measure what the gates need (runs in the training process).
    Returns the metrics and the learning curve ((epoch, train loss, validation loss, validation quality) per
    epoch).

    Besides the trainer's metrics: for a binary model ``missed_positive_val`` (the share of validation
    positives scored below ``threshold``, the baseline the drift stage holds the model to),
    ``positives_val`` and ``ece_val``; the FP32 and INT8 variants' parity, latency, quality and size
    (:func:`models.variants.report_metrics`; ``p50_ms`` is the FP32 file's, batches of 256 on CPU) and, when
    ``champion`` (its ONNX path) is given, the champion's ``champion_auc_val`` and ``champion_ece_val``
    (binary) or ``champion_mae_val`` (regression) on the same validation window."""
    log.info("training a %s model on %d rows, %d features", task, len(y), X.shape[1])
    trained = train_mlp(X, y, ts, task=task, seed=seed, progress=_progress, weights=weights, val_after=val_after,
                        **(hyperparameters or {}))
    quality = "auc_val" if task == "binary" else "mae_val"
    log.info("trained: best epoch %d of %d, validation %s %.4f", trained.metrics["best_epoch"],
             trained.metrics["epochs_run"], quality, trained.metrics[quality])
    export_onnx(trained.module, X.shape[1], path)
    export_torchscript(trained.module, X.shape[1], path.with_suffix(".pt"))
    metrics = {k: float(v) for k, v in trained.metrics.items()}
    n_val = int(metrics["n_val"])  # the split is the newest n_val rows by event time (X is sorted)
    X_val, y_val = X[-n_val:], y[-n_val:]
    with torch.no_grad():
        scores = trained.module(torch.from_numpy(X_val)).numpy()
    if reference_from is not None:  # what the drift stage compares live inputs with
        with torch.no_grad():
            reference = trained.module(torch.from_numpy(X[reference_from:])).numpy()
        Reference(X[reference_from:], reference).save(path.with_suffix(".npz"))
    if task == "binary":
        positives = y_val == 1
        metrics["positives_val"] = float(positives.sum())
        metrics["missed_positive_val"] = (float((scores[positives] < threshold).mean()) if positives.any()
                                          else float("nan"))
        metrics["ece_val"] = expected_calibration_error(y_val, scores)
    # FP32 (served) and INT8 variants: parity with torch, latency, quality and size, recorded at registration
    metrics |= report_metrics(evaluate_variants(trained.module, path, X_val, y_val, out_dir=path.parent))
    metrics["p50_ms"] = metrics["fp32_p50_ms"]  # what the latency gate reads: the variant that serves
    if champion is not None:
        champion_scores = OnnxScorer(Path(champion), "champion", prefer_gpu=False).predict(X_val)
        if task == "binary":
            metrics["champion_auc_val"] = roc_auc(y_val, champion_scores)
            metrics["champion_ece_val"] = expected_calibration_error(y_val, champion_scores)
        else:
            metrics["champion_mae_val"] = float(np.mean(np.abs(y_val - champion_scores)))
    return metrics, trained.curve


class RetrainStage(Stage):
    """Trains, registers and gates every model of a project; the model registry's one writer."""

    step_id = "retrain"
    topics = (T.RETRAIN, T.MODEL_COMMANDS)
    slow = True  # training takes seconds to minutes: the runner keeps the consumer alive meanwhile

    def __init__(self, ch: ClickHouse, registry: ModelRegistry, project: Project, *, seed: int = 0,
                 clock: Callable[[], float] = time.time) -> None:
        self.ch = ch
        self.project = project
        self.registry = registry
        self.seed = seed
        self.clock = clock
        self.runs: list[dict[str, Any]] = []
        self.busy = False  # a training run is in progress
        # Training runs in a child process: in this one it would share the GIL with every stream
        # stage (measured: 0.1 s alone, 9 s beside the stages at 2,000 events/s). The worker is
        # spawned now, so its imports are paid before the first retrain.
        self._pool = worker_pool()
        self._in = {T.RETRAIN: AvroCodec(T.RETRAIN), T.MODEL_COMMANDS: AvroCodec(T.MODEL_COMMANDS)}
        self._out = AvroCodec(T.MODEL_EVENTS)
        self._alert = AvroCodec(T.ALERTS)

    def handle(self, batch: list[Message]) -> StepResult:
        result = StepResult()
        requests: dict[str, list[tuple[str, int, str]]] = {}  # model -> (reason, since ms, request id)
        changes: dict[str, int] = {}  # request id -> the change it placed (event time, ms)
        for msg, req in decoded(batch, self._in, result):
            if msg.topic == T.MODEL_COMMANDS:
                result.produce.append(self.command(req))
                continue
            name = req.get("model_name") or (msg.key or b"").decode(errors="replace")
            if name not in {m.name for m in self.project.models}:
                log.warning("retrain request %s names no model of project %s (%r): ignored", req["request_id"],
                            self.project.name, name)
                continue
            since, change = req["since_ts"], req.get("change_ts")
            if change is not None:
                changes[req["request_id"]] = int(change.timestamp() * 1000)
            requests.setdefault(name, []).append((req["reason"], int(since.timestamp() * 1000) if since else 0,
                                                  req["request_id"]))
        for name, reqs in requests.items():
            model = self.project.model(name)
            served = self._served(model, [r for _, _, r in reqs])
            for version in {v.version: v for v in served.values()}.values():
                transitions = self._finish(model, version)
                result.produce.extend(self._announce(v, why) for v, why in transitions)
                result.produce.extend(self._gates_alert(model, transitions[-1][0]))
            todo = [r for r in reqs if r[2] not in served]
            if not todo:
                continue
            # several requests in one run: the latest change any of them placed weighs (a cron's places none)
            change = max((changes[r] for _, _, r in todo if r in changes), default=None)
            self.busy = True
            try:
                transitions = self.train(model, ", ".join(r for r, _, _ in todo), min(s for _, s, _ in todo),
                                         request_ids=[r for _, _, r in todo], change_ms=change)
            finally:
                self.busy = False
            result.produce.extend(self._announce(v, why) for v, why in transitions)
            if transitions:
                result.produce.extend(self._gates_alert(model, transitions[-1][0]))
        return result

    def _served(self, model: Model, request_ids: list[str]) -> dict[str, ModelVersion]:
        """The versions that already served some of ``request_ids`` (by request id): a redelivery after a
        crash between the registry write and the commit."""
        wanted = set(request_ids)
        served: dict[str, ModelVersion] = {}
        for v in self.registry.list(model.name):
            for rid in v.lineage.get("retrain_requests", "").split(","):
                if rid in wanted:
                    served[rid] = v
        if served:
            log.warning("retrain request(s) %s already served by %s (delivered again after a restart): "
                        "announced again, not retrained", ", ".join(sorted(served)),
                        ", ".join(sorted({model.version_name(v.version) for v in served.values()})))
        return served

    def _finish(self, model: Model, v: ModelVersion) -> list[tuple[ModelVersion, str]]:
        """The transitions of a version a run registered before a crash, completed: a candidate whose gates
        passed is promoted, as the run would have done; the same announcements (and event ids) as the run's."""
        transitions = [(replace(v, stage="candidate", revision=FIRST_REVISION),
                        registered_because(v.lineage.get("reason", "")))]
        if v.stage == "candidate" and v.revision == FIRST_REVISION and v.metrics.get("gates_passed") == 1.0:
            v = self.registry.set_stage(model.name, v.version, "production")
        if v.stage == "production":
            transitions.append((v, promoted_because(v.lineage.get("gates", ""))))
        return transitions

    @staticmethod
    def _usable_change(model: Model, change_ms: int | None, ts: np.ndarray, y: np.ndarray) -> int | None:
        """``change_ms`` if the training set has enough rows after it to validate on a quarter of them
        (:data:`MIN_ROWS_AFTER_CHANGE`, and for a binary model :data:`MIN_POSITIVES_AFTER_CHANGE` positives),
        else None (logged): the run then validates on the newest quarter of the whole window, unweighed, as
        without a change."""
        if change_ms is None:
            return None
        after = ts >= change_ms
        positives = int(y[after].sum())
        if int(after.sum()) >= MIN_ROWS_AFTER_CHANGE and (model.task != "binary"
                                                         or positives >= MIN_POSITIVES_AFTER_CHANGE):
            return change_ms
        log.warning("retrain of %s: %d labelled rows (%d positive) after the change at %d are too few to "
                    "validate on; validating on the newest quarter of the window", model.name, int(after.sum()),
                    positives, change_ms)
        return None

    def training_set(self, model: Model, since_ms: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
        """The feature platform's point-in-time training set of the model's newest ``window_rows`` labelled
        events whose labels are mature (:func:`streams.features.offline.training_set`): (X, y, event times)
        sorted by time, and its SHA-256.

        Mature: at least the label's ``maturity_s`` older than the newest label. When some labels come later
        than others (a positive's later than a negative's, a long delivery's later than a short one's), the
        newest labelled events are biased toward the early kind; trained on, they bias the model, and as its
        validation window they may hold no positive at all (no AUC: the quality gate refuses the model)."""
        newest_label = offline.newest_label_ms(self.ch, self.project, model)
        until = newest_label - model.maturity_ms if newest_label else None
        ts_set = offline.training_set(self.ch, self.project, model, since_ms=since_ms or None, until_ms=until,
                                      limit=model.trainer.window_rows)
        order = np.argsort(ts_set.event_ts, kind="stable")
        return (ts_set.X[order], ts_set.y[order].astype(np.float32), ts_set.event_ts[order], ts_set.sha256)

    def _reference_from(self, model: Model, ts: np.ndarray) -> int | None:
        """Where the version's reference starts in its training rows (sorted by time): the newest
        :data:`REFERENCE_ROWS` whose windowed features were complete (:func:`streams.features.offline.warm_from_ms`),
        or None (no reference: the version's inputs are not watched) when fewer than :data:`MIN_REFERENCE_ROWS`
        are."""
        start = max(int(np.searchsorted(ts, offline.warm_from_ms(self.ch, model))), len(ts) - REFERENCE_ROWS)
        if len(ts) - start < MIN_REFERENCE_ROWS:
            log.warning("%s: %d of its %d training rows have complete windowed features: no reference, its inputs "
                        "will not be watched", model.name, len(ts) - start, len(ts))
            return None
        return start

    def train(self, model: Model, reason: str, since_ms: int = 0, *,
              request_ids: list[str] | tuple[str, ...] = (), change_ms: int | None = None,
              ) -> list[tuple[ModelVersion, str]]:
        """One training run of ``model``: register it as a candidate, judge it with the gates, promote it to
        production if they pass. Returns the transitions to announce (none when the data cannot train one).
        ``request_ids``: the retrain requests it serves, kept in the lineage; ``change_ms``: where a drift
        began (rows at or after it weigh the model's ``retrain.recency_weight``, and the validation window,
        on which the gates compare the candidate with the champion, is the newest of them)."""
        X, y, ts, content = self.training_set(model, since_ms)
        change_ms = self._usable_change(model, change_ms, ts, y)
        weights = None if change_ms is None else np.where(ts >= change_ms, model.retrain.recency_weight, 1.0)
        binary = model.task == "binary"
        run: dict[str, Any] = {"model": model.name, "reason": reason, "rows": len(y)}
        if binary:
            run["positives"] = int(y.sum())
        self.runs.append(run)
        if len(y) < model.trainer.min_rows or (binary and y.min(initial=1) == y.max(initial=0)):
            run["skipped"] = f"{len(y)} labelled rows" + (f", {int(y.sum())} positive" if binary else "") + \
                ": not enough to train"
            log.warning("retrain of %s skipped: %s", model.name, run["skipped"])
            return []
        champion = champion_of(self.registry, model)
        reference_from = self._reference_from(model, ts)
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.onnx"
            try:
                metrics, curve = self._pool.submit(
                    train_and_export, X, y, ts, self.seed, path, champion.artifact_uri if champion else None,
                    task=model.task, threshold=model.threshold,
                    hyperparameters=model.trainer.hyperparameters(), weights=weights, val_after=change_ms,
                    reference_from=reference_from).result()
            except ValueError as exc:  # e.g. the time-based split left one class in the training part
                run["skipped"] = str(exc)
                log.warning("retrain of %s skipped: %s", model.name, exc)
                return []
            metrics["train_seconds"] = time.perf_counter() - started
            decision = decide(metrics, model.gates, model.task)
            metrics |= decision.as_metrics()
            torchscript, reference = path.with_suffix(".pt"), path.with_suffix(".npz")
            lineage = self.lineage(model, reason, X, y, ts, content, champion) | {
                "gates": decision.summary(), "learning_curve": json.dumps([[round(x, 6) for x in row] for row in curve]),
                "torchscript_sha256": sha256_file(torchscript), "retrain_requests": ",".join(request_ids),
                "reference_rows": str(0 if reference_from is None else len(ts) - reference_from)}
            if reference_from is not None:
                lineage |= {"reference_sha256": sha256_file(reference), "reference_from_ms": str(ts[reference_from])}
            if weights is not None:
                lineage |= {"change_ts_ms": str(change_ms), "rows_after_change": str(int((ts >= change_ms).sum())),
                            "recency_weight": str(model.retrain.recency_weight)}
            version = self.registry.register(model.name, path, metrics=metrics, lineage=lineage, stage="candidate",
                                             companions=[torchscript] + [reference] * (reference_from is not None))
        run.update(version=version.version, gates=decision.summary(), **metrics)
        transitions = [(version, registered_because(reason))]
        if decision.passed:
            version = self.registry.set_stage(model.name, version.version, "production")
            transitions.append((version, promoted_because(decision.summary())))
            run["promoted"] = True
            log.warning("retrained %s on %d rows (%s), promoted: %s", model.version_name(version.version), len(y),
                        reason, decision.summary())
        else:
            run["blocked"] = decision.failed()
            log.warning("retrained %s on %d rows (%s), NOT promoted: %s", model.version_name(version.version),
                        len(y), reason, decision.failed())
        return transitions

    def _gates_alert(self, model: Model, v: ModelVersion) -> list[Produce]:
        """The alert of a candidate its gates refused (the champion keeps serving); none for one they passed.
        Its id derives from the version, so a crash's redelivery repeats the same alert."""
        if v.stage != "candidate" or v.metrics.get("gates_passed") == 1.0:
            return []
        name = model.version_name(v.version)
        failed = "; ".join(c for c in v.lineage.get("gates", "").split("; ") if " FAILED: " in c)
        alert = {"alert_id": str(uuid.uuid5(EVENT_IDS, f"gates/{v.name}/v{v.version}")),
                 "ts": int(self.clock() * 1000), "detector": "gates", "metric": "gates_passed", "value": 0.0,
                 "threshold": 1.0, "model_version": name, "model_name": model.name, "kind": "model",
                 "severity": "warning", "features": [], "event_ts": None, "change_ts": None,
                 "message": f"candidate {name} was not promoted, the champion keeps serving: {failed}"}
        return [Produce(T.ALERTS, b"gates", self._alert.encode(alert))]

    def lineage(self, model: Model, reason: str, X: np.ndarray, y: np.ndarray, ts: np.ndarray, content: str,
                champion: ModelVersion | None) -> dict[str, str]:
        """Everything needed to trace the model to its data and code."""
        labels = {"positives": str(int(y.sum()))} if model.task == "binary" else {"label_mean": f"{float(y.mean()):.6g}"}
        return {
            "reason": reason, "rows": str(len(y)), **labels, "features": ",".join(model.feature_names),
            "task": model.task, "model_definition": model.definition,
            "ts_min_ms": str(int(ts.min())), "ts_max_ms": str(int(ts.max())), "training_set_sha256": content,
            "label_maturity_ms": str(model.maturity_ms),
            "training_set": "point-in-time: feature_log as of each labelled event (weir features training-set)",
            "feature_views": ",".join(f"{view_key(r.view)}@{r.view.fingerprint}" for r in model.views),
            "code_version": code_version(), "seed": str(self.seed),
            "hyperparameters": json.dumps(model.trainer.hyperparameters(), sort_keys=True),
            "threshold": str(model.threshold) if model.task == "binary" else "",
            "champion": "" if champion is None else model.version_name(champion.version),
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
        return self._event(cmd["model_name"], cmd["version"], "refused", cmd["actor"], reason,
                           key=f"refused/{cmd['command_id']}")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _announce(self, v: ModelVersion, reason: str, actor: str = "retrain") -> Produce:
        return self._event(v.name, v.version, v.stage, actor, reason, artifact_uri=v.artifact_uri, sha256=v.sha256,
                           metrics={k: float(x) for k, x in v.metrics.items()}, lineage=dict(v.lineage),
                           key=f"{v.name}/v{v.version}/r{v.revision}/{v.stage}/{v.sha256}")

    def _event(self, name: str, version: int, stage: str, actor: str, reason: str, *, key: str,
               artifact_uri: str = "", sha256: str = "", metrics: dict[str, float] | None = None,
               lineage: dict[str, str] | None = None) -> Produce:
        """One ``model.events`` record (a transition, or a refused command with empty artifact fields); its
        ``event_id`` derives from ``key``, so the same transition announced twice is one event downstream."""
        event = {
            "event_id": str(uuid.uuid5(EVENT_IDS, key)), "ts": int(self.clock() * 1000), "model_name": name,
            "version": version,
            "stage": stage, "artifact_uri": artifact_uri, "sha256": sha256, "metrics": metrics or {},
            "actor": actor, "reason": reason, "lineage": lineage or {},
        }
        return Produce(T.MODEL_EVENTS, name.encode(), self._out.encode(event))


class RetrainScheduler:
    """apscheduler jobs that request retrains of every model of a project: a cron, and a bootstrap check
    for each model while it has no champion."""

    def __init__(self, bootstrap: str, ch: ClickHouse, registry: ModelRegistry, project: Project, cron: str, *,
                 check_every_s: float = 2.0, bootstrap_retry_s: float = 20.0) -> None:
        self.ch = ch
        self.project = project
        self.registry = registry
        self.bootstrap_retry_s = bootstrap_retry_s
        self._last_bootstrap: dict[str, float] = {}
        self._producer = Producer(producer_config(bootstrap))
        self._codec = AvroCodec(T.RETRAIN)
        self._bootstrapped: set[str] = set()
        self._scheduler = BackgroundScheduler(timezone="UTC")
        self._scheduler.add_job(self._request_all, CronTrigger.from_crontab(cron, timezone="UTC"), args=["schedule"])
        self._scheduler.add_job(self._bootstrap_check, "interval", seconds=check_every_s)

    def start(self) -> None:
        self._scheduler.start()

    def stop(self) -> None:
        self._scheduler.shutdown(wait=False)
        self._producer.flush(10)

    def _request_all(self, reason: str) -> None:
        for model in self.project.models:
            self.request(model, reason)

    def request(self, model: Model, reason: str) -> None:
        req = {"request_id": str(uuid.uuid4()), "model_name": model.name, "ts": int(time.time() * 1000),
               "reason": reason, "since_ts": None}
        self._producer.produce(T.RETRAIN, self._codec.encode(req), model.name.encode())
        self._producer.flush(10)

    def _bootstrap_check(self) -> None:
        """While a model has no champion, request a retrain once enough of its labels are mature; again after
        ``bootstrap_retry_s`` if that run could not train one (e.g. too few positives yet)."""
        for model in self.project.models:
            if model.name in self._bootstrapped or \
                    time.monotonic() - self._last_bootstrap.get(model.name, 0.0) < self.bootstrap_retry_s:
                continue
            if champion_of(self.registry, model) is not None:
                self._bootstrapped.add(model.name)
                continue
            # mature labels: what the retrain stage will train on
            labelled = offline.mature_labels(self.ch, self.project, model, model.maturity_ms)
            if labelled >= model.trainer.bootstrap_rows:
                self._last_bootstrap[model.name] = time.monotonic()
                self.request(model, f"bootstrap: no champion yet, {labelled} mature labels")
