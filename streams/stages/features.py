"""Features: per-entity windowed aggregates into the online store, the feature log, and on to scoring.

Inputs: ``weir.clicks`` (user view) and ``weir.payments`` (card view) micro-batches.
For each batch it updates the windows in event order, writes each touched
entity's newest values to Redis (one pipelined round trip), appends one
feature-log row per touched entity to ``weir.feature_log`` (the ClickHouse
sink writes it), and forwards the payments to ``weir.scoring`` on the same
partition. Redis is written before the payments are forwarded, so inference
always reads values that include the payment itself.
"""

from __future__ import annotations

from typing import Any

from sinks.redis_store import OnlineStore
from streams import topics as T
from streams.base import Message, Produce, StepResult
from streams.codec import AvroCodec, decoded
from streams.features.definitions import CARD, USER, CardState, FeatureView, UserState
from streams.features.windows import EntityStates

Touched = dict[str, tuple[int, str, list[float]]]  # entity -> (event ts, last event id, values)

LOG_BATCH_ROWS = 4000  # feature-log rows per message: ~200 KB, well under the broker's 1 MB limit


def _chunks(touched: Touched, size: int) -> list[Touched]:
    items = list(touched.items())
    return [dict(items[i:i + size]) for i in range(0, len(items), size)]


class FeatureComputer:
    """The pure part: window state per card and per user. No I/O."""

    def __init__(self) -> None:
        self.cards: EntityStates[CardState] = EntityStates(CardState, CARD.ttl_ms)
        self.users: EntityStates[UserState] = EntityStates(UserState, USER.ttl_ms)

    def add_payment(self, p: dict[str, Any], touched: Touched) -> None:
        state = self.cards.get(p["card_id"], p["ts_ms"])
        state.update(p["ts_ms"], p["amount"], p["merchant_id"])
        now = max(p["ts_ms"], touched.get(p["card_id"], (0,))[0])
        touched[p["card_id"]] = (now, p["event_id"], state.values(now))

    def add_click(self, c: dict[str, Any], touched: Touched) -> None:
        state = self.users.get(c["user_id"], c["ts_ms"])
        state.update(c["ts_ms"], c["event_type"], c.get("device_id"))
        now = max(c["ts_ms"], touched.get(c["user_id"], (0,))[0])
        touched[c["user_id"]] = (now, c["event_id"], state.values(now))


class FeaturesStage:
    step_id = "features"
    topics = (T.I_CLICKS, T.I_PAYMENTS)

    def __init__(self, store: OnlineStore) -> None:
        self.store = store
        self.computer = FeatureComputer()
        self._codecs = {t: AvroCodec(t) for t in self.topics}
        self._scoring = AvroCodec(T.I_SCORING)
        self._log = AvroCodec(T.I_FEATURE_LOG)

    def handle(self, batch: list[Message]) -> StepResult:
        result = StepResult()
        cards: Touched = {}
        users: Touched = {}
        for msg, record in decoded(batch, self._codecs, result):
            items = record["items"]
            if msg.topic == T.I_PAYMENTS:
                for p in items:
                    self.computer.add_payment(p, cards)
                result.produce.append(Produce(T.I_SCORING, None, self._scoring.encode({"items": items}),
                                              partition=msg.partition))
            else:
                for c in items:
                    self.computer.add_click(c, users)
        self.store.write(CARD, ((k, ts, v) for k, (ts, _, v) in cards.items()))
        self.store.write(USER, ((k, ts, v) for k, (ts, _, v) in users.items()))
        # Redis first, then forward: the scoring records must come after the writes.
        logs = [self._log_batch(view, chunk) for view, touched in ((CARD, cards), (USER, users))
                for chunk in _chunks(touched, LOG_BATCH_ROWS)]
        result.produce[:0] = logs
        return result

    def _log_batch(self, view: FeatureView, touched: Touched) -> Produce:
        record = {
            "view": f"{view.name}:v{view.version}", "n_features": len(view.features),
            "entity_ids": list(touched), "event_ids": [eid for _, eid, _ in touched.values()],
            "ts_ms": [ts for ts, _, _ in touched.values()],
            "values": [x for _, _, v in touched.values() for x in v],
        }
        return Produce(T.I_FEATURE_LOG, None, self._log.encode(record))
