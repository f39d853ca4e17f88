"""A stand-in for ``weir up``'s hold on the embedded ClickHouse, for ``tests/test_clickhouse_remote.py``.

``python -m tests.hub_process DATA_DIR ROWS`` takes ``DATA_DIR``'s lock, opens chdb under it (the fraud
shop's database), writes ``ROWS`` labelled payments with their feature-log rows, reads the fraud model's
training set directly, then serves ``POST /clickhouse/query`` as ``weir up`` does (a free loopback port,
written to ``DATA_DIR/endpoints.json`` as ``health_url``) and prints one JSON line: the training set's
``rows`` and ``sha256``, and how long the direct read took. A line ``stop-serving`` on stdin stops the
server (the lock and the engine stay held); end of stdin ends the process.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from examples.fraud_shop.project import card, fraud, user
from sinks.clickhouse import ClickHouse
from sinks.events import FLOG_COLS
from streams.clickhouse_hub import hub_queries
from streams.features import offline
from streams.features.definitions import view_key
from streams.health import HealthServer
from streams.project.contracts import tables
from streams.stack import DataDirLock
from tests.conftest import SHOP

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
PAYMENT_COLS = ("event_id", "ts", "source_ts", *SHOP.source("payments").fields)
LABEL_COLS = ("event_id", "ts", "source_ts", *SHOP.source("labels").fields)


def _dt(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def fill(ch: ClickHouse, rows: int) -> None:
    """``rows`` payments a second apart on 97 cards and 193 customers, each labelled (every 7th fraud),
    with a card and a user feature-log row at its time (every 5th user row half a day old: stale)."""
    card_v, user_v = view_key(card), view_key(user)
    log, pay, lab = [], [], []
    for i in range(rows):
        ts, pid, c, u = T0 + i * 1000, f"p{i:06d}", f"c{i % 97}", f"u{i % 193}"
        log.append([card_v, c, f"fc{i}", _dt(ts), [float(i % 11) + j / 8 for j in range(len(card.features))]])
        user_ts = ts - 12 * 3_600_000 if i % 5 == 0 else ts
        log.append([user_v, u, f"fu{i}", _dt(user_ts), [float(i % 13) / 4 + j for j in range(len(user.features))]])
        pay.append([pid, _dt(ts), _dt(ts), pid, c, u, "m1", "digital_goods" if i % 3 else "grocery",
                    1.0 + (i % 500) / 4, None])
        lab.append([pid, _dt(ts + 600_000), _dt(ts + 600_000), pid, i % 7 == 0, _dt(ts).isoformat()])
    ch.insert("feature_log", log, FLOG_COLS)
    ch.insert("silver_payments", pay, PAYMENT_COLS)
    ch.insert("silver_labels", lab, LABEL_COLS)


def main(data_dir: Path, rows: int) -> None:
    lock = DataDirLock(data_dir)
    lock.acquire()
    dsn = f"chdb://{data_dir.resolve() / 'clickhouse'}"
    ch = ClickHouse.for_project(dsn, SHOP.name)
    ch.ensure_schema(tables(SHOP))
    fill(ch, rows)
    started = time.perf_counter()
    ts = offline.training_set(ch, SHOP, fraud)
    direct_s = time.perf_counter() - started
    server = HealthServer(lambda: {"ok": True}, port=0, query=hub_queries(dsn)).start()
    (data_dir / "endpoints.json").write_text(json.dumps({"clickhouse_dsn": dsn, "health_url": server.url}))
    print(json.dumps({"rows": ts.rows, "sha256": ts.sha256, "direct_s": direct_s, "url": server.url}), flush=True)
    for line in sys.stdin:
        if line.strip() == "stop-serving":
            server.stop()
            print(json.dumps({"stopped": True}), flush=True)
    ch.close()
    lock.release()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
