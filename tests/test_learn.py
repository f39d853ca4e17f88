"""The learn stage: delayed labels joined to the served features, and its progressive metric as river computes it."""

from __future__ import annotations

import dataclasses
import random
import uuid
from datetime import UTC, datetime
from typing import Any

import numpy as np
import redis
from river import metrics

from examples.fraud_shop.project import fraud
from models.online import RiverLearner
from streams import topics as T
from streams.base import Message, StepResult
from streams.codec import AvroCodec
from streams.replay import river_metric
from streams.stack import Endpoints
from streams.stages.learn import LearnStage, serving_snapshot
from streams.state import SignedSnapshots
from tests.conftest import SHOP

T0 = 1_700_000_000_000
FEATURE_NAMES = fraud.feature_names
ONLINE_MODEL = fraud.online_name
ONLINE = fraud.online_topic  # the online learner's predictions
LABELS = "weir.fraud_shop.silver.labels"
SCORED = T.internal(SHOP, T.I_SCORED)  # the shop's own  # the label source's silver events


def _label(payment_id: str, is_fraud: bool, payment_ms: int, label_ms: int) -> dict[str, Any]:
    """A silver event of the label source, as ingest writes it (event id = payment id, time = labelled_at)."""
    created = datetime.fromtimestamp(payment_ms / 1000, UTC).isoformat()
    return {"event_id": payment_id, "ts_ms": label_ms, "source_ms": label_ms, "payment_id": payment_id,
            "is_fraud": is_fraud, "payment_created_at": created}


def _payments(n: int, seed: int = 5) -> list[tuple[dict[str, Any], bool]]:
    """Scored items (features as float32, as weir.scored carries them) and their labels."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        features = [float(np.float32(rng.gauss(0, 1))) for _ in FEATURE_NAMES]
        is_fraud = features[0] + 0.5 * features[5] + rng.gauss(0, 0.5) > 1.0
        out.append(({"event_id": f"p{i}", "model_name": fraud.name, "entity_id": f"c{i % 7}", "ts_ms": T0 + i,
                     "features": features, "score": round(rng.random(), 3), "model_version": "rules"}, is_fraud))
    return out


def _messages(payments: list[tuple[dict[str, Any], bool]], label_delay: int) -> list[Message]:
    """One scored message per payment; each label ``label_delay`` payments later (negative: before it)."""
    scored, labels = AvroCodec(SCORED), AvroCodec(LABELS)
    slots: list[tuple[float, Message]] = []
    for i, (item, is_fraud) in enumerate(payments):
        slots.append((i, Message(SCORED, 0, i, None, scored.encode({"items": [item]}), 0)))
        label = _label(item["event_id"], is_fraud, item["ts_ms"], item["ts_ms"] + 1)
        slots.append((i + label_delay + 0.5, Message(LABELS, 0, i, None, labels.encode({"items": [label]}), 0)))
    return [m for _, m in sorted(slots, key=lambda s: s[0])]


def test_progressive_metric_with_immediate_labels_is_rivers() -> None:
    payments = _payments(400)
    stage = LearnStage(SHOP, fraud, RiverLearner("logreg"), "river-logreg", metric="rocauc", publish_every=100)
    result = stage.handle(_messages(payments, label_delay=0))
    rows = [(dict(zip(FEATURE_NAMES, item["features"])), is_fraud) for item, is_fraud in payments]
    assert stage.learned == 400 and stage.evaluator.value == river_metric(rows, "logreg", "rocauc", seed=42)
    codec = AvroCodec(T.MODEL_METRICS)
    published = [codec.decode(p.value) for p in result.produce if p.topic == T.MODEL_METRICS]
    online = [m for m in published if m["model_name"] == ONLINE_MODEL]
    assert [m["labels"] for m in online] == [100, 200, 300, 400] and online[-1]["value"] == stage.evaluator.value
    # beside it, the ROC AUC of the champion's served scores on the same labels (river's metric, fed directly)
    champion = [m for m in published if m["model_name"] == "fraud"]
    reference = metrics.ROCAUC()
    for item, is_fraud in payments:
        reference.update(is_fraud, {True: item["score"], False: 1.0 - item["score"]})
    assert [m["labels"] for m in champion] == [100, 200, 300, 400] and champion[-1]["model_version"] == "rules"
    assert champion[-1]["value"] == reference.get()


def test_challengers_score_learn_and_publish_beside_the_primary() -> None:
    payments = _payments(300, seed=4)
    stage = LearnStage(SHOP, fraud, RiverLearner("logreg"), "v", publish_every=100,
                       challengers={"hat": (RiverLearner("hoeffding_adaptive"), "river-hat")})
    result = stage.handle(_messages(payments, label_delay=0))
    preds = AvroCodec(ONLINE)
    names = [preds.decode(p.value)["model_name"] for p in result.produce if p.topic == ONLINE]
    assert names.count(ONLINE_MODEL) == names.count(f"{ONLINE_MODEL}-hat") == 300
    rows = [(dict(zip(FEATURE_NAMES, item["features"])), is_fraud) for item, is_fraud in payments]
    version, hat = stage.challengers[f"{ONLINE_MODEL}-hat"]
    assert version == "river-hat" and hat.value == river_metric(rows, "hoeffding_adaptive", "rocauc", seed=42)
    assert stage.evaluator.value == river_metric(rows, "logreg", "rocauc", seed=42)  # the primary is unaffected
    codec = AvroCodec(T.MODEL_METRICS)
    published = [codec.decode(p.value) for p in result.produce if p.topic == T.MODEL_METRICS]
    theirs = [m for m in published if m["model_name"] == f"{ONLINE_MODEL}-hat"]
    # every 100 labels; "labels" counts metric updates (an untrained tree's empty prediction updates none)
    assert len(theirs) == 3 and (theirs[-1]["labels"], theirs[-1]["value"]) == (hat.n, hat.value)


def test_delayed_and_early_labels_use_the_prediction_made_when_served() -> None:
    payments = _payments(300, seed=9)
    for delay in (25, -3):  # labels 25 payments late, and labels arriving before their scored record
        stage = LearnStage(SHOP, fraud, RiverLearner("logreg"), "v", metric="accuracy")
        stage.handle(_messages(payments, label_delay=delay))
        assert stage.learned == 300 and not stage.pending and not stage.early_labels
        # the reference: each payment tested when its scored record arrives, trained when both have arrived
        ev = stage.evaluator.__class__(RiverLearner("logreg"), "accuracy")
        order = sorted([(i, "scored", i) for i in range(300)] + [(i + delay + 0.5, "label", i) for i in range(300)])
        preds: dict[int, Any] = {}
        early: set[int] = set()
        for _, kind, i in order:
            x, is_fraud = dict(zip(FEATURE_NAMES, payments[i][0]["features"])), payments[i][1]
            if kind == "scored":
                preds[i] = ev.test(x)
                if i in early:
                    ev.train(x, is_fraud, preds.pop(i))
            elif i in preds:
                ev.train(x, is_fraud, preds.pop(i))
            else:
                early.add(i)
        assert stage.evaluator.value == ev.value and stage.evaluator.n == ev.n


# ---------------------------------------------------------------- recovery, with the real Redis


def _online_scores(result: StepResult) -> list[float]:
    """The primary online model's scores, in order."""
    codec = AvroCodec(ONLINE)
    preds = [codec.decode(p.value) for p in result.produce if p.topic == ONLINE]
    return [p["score"] for p in preds if p["model_name"] == ONLINE_MODEL]


def _feed(stage: LearnStage, msgs: list[Message], size: int = 50) -> list[float]:
    scores: list[float] = []
    for i in range(0, len(msgs), size):
        scores += _online_scores(stage.handle(msgs[i:i + size]))
    return scores


def _committed(msgs: list[Message]) -> dict[tuple[str, int], int]:
    return {(m.topic, m.partition): m.offset + 1 for m in msgs}


def test_a_restarted_learner_continues_from_its_snapshot(endpoints: Endpoints) -> None:
    msgs = _messages(_payments(400, seed=11), label_delay=10)
    reference = LearnStage(SHOP, fraud, RiverLearner("logreg"), "v",
                           challengers={"hat": (RiverLearner("hoeffding_adaptive"), "h")})
    expected = _feed(reference, msgs)
    snaps = SignedSnapshots.from_url(endpoints.redis_url, b"secret", prefix=f"test-{uuid.uuid4().hex}")
    now = [0.0]

    def stage() -> LearnStage:
        return LearnStage(SHOP, fraud, RiverLearner("logreg"), "v", snapshots=snaps, checkpoint_every_s=10,
                          monotonic=lambda: now[0], challengers={"hat": (RiverLearner("hoeffding_adaptive"), "h")})

    first = stage()
    _feed(first, msgs[:300])
    now[0] += 10
    first.after_commit({})  # a checkpoint after 300 messages
    serving = snaps.load(serving_snapshot(fraud))  # and the learner alone, for inference's fallback
    assert serving["version"] == "v" and serving["learner"].predict_proba_one(dict.fromkeys(FEATURE_NAMES, 0.3)) == \
        first.learner.predict_proba_one(dict.fromkeys(FEATURE_NAMES, 0.3))
    _feed(first, msgs[300:500])  # committed, but not checkpointed: then a crash
    committed = _committed(msgs[:500])

    second = stage()
    starts = second.on_assign(list(committed), committed)
    assert starts == _committed(msgs[:300]) and second.restored[second.snapshot_name] == "snapshot"
    scores = _feed(second, msgs)  # what the runner re-delivers from the start offsets on, and the rest
    assert second.replayed == 200  # 300..499: state only, nothing produced again
    assert scores == expected[len(_online_scores_of(msgs[:500])):]
    assert second.evaluator.value == reference.evaluator.value and second.learned == reference.learned
    hat = f"{ONLINE_MODEL}-hat"
    assert second.challengers[hat][1].value == reference.challengers[hat][1].value  # restored with the primary
    x = dict.fromkeys(FEATURE_NAMES, 0.3)
    assert second.learner.predict_proba_one(x) == reference.learner.predict_proba_one(x)

    # an altered snapshot is refused (never unpickled): the model is relearned from the log instead
    key = f"{snaps.prefix}:{second.snapshot_name}"
    raw = redis.Redis.from_url(endpoints.redis_url).get(key)
    assert isinstance(raw, bytes)
    redis.Redis.from_url(endpoints.redis_url).set(key, raw[:-1] + bytes([raw[-1] ^ 1]))
    third = stage()
    assert third.on_assign(list(committed), committed) == dict.fromkeys(committed, -2)
    assert third.restored[third.snapshot_name] == "log"
    assert _feed(third, msgs) == expected[len(_online_scores_of(msgs[:500])):]
    assert third.evaluator.value == reference.evaluator.value and third.replayed == 500


def _online_scores_of(msgs: list[Message]) -> list[str]:
    """The payments (scored records) among ``msgs``: one online prediction each."""
    return [m.topic for m in msgs if m.topic == SCORED]


def test_joins_are_given_up_after_the_horizon() -> None:
    """A payment whose label never comes, and a label whose payment was never scored, do not wait forever."""
    payments = _payments(50, seed=2)
    model = dataclasses.replace(fraud, label=dataclasses.replace(fraud.label, horizon_s=0.010))  # 10 ms
    stage = LearnStage(SHOP, model, RiverLearner("logreg"), "v")  # payments are 1 ms apart
    assert stage.join_horizon_ms == 10
    scored, labels = AvroCodec(SCORED), AvroCodec(LABELS)
    msgs = [Message(SCORED, 0, i, None, scored.encode({"items": [item]}), 0) for i, (item, _) in enumerate(payments)]
    orphan = _label("never-scored", True, T0, T0)
    late = _label("also-never", True, T0, T0 + 11)
    msgs += [Message(LABELS, 0, i, None, labels.encode({"items": [lb]}), 0) for i, lb in enumerate((orphan, late))]
    stage.handle(msgs)
    assert stage.expired == {"unlabelled": 39, "unscored_labels": 1}  # ts 0..38 are > 10 ms behind ts 49
    assert len(stage.pending) == 11 and list(stage.early_labels) == ["also-never"]
