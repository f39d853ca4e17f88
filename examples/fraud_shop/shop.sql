-- The reference shop's tables. Columns are exactly the `after` Value records of
-- examples/fraud_shop/schemas/cdc.<table>/v1.avsc (Debezium maps numeric -> double and timestamptz ->
-- ZonedTimestamp). Idempotent: safe to run on every start.
-- REPLICA IDENTITY FULL makes logical decoding carry the whole old row, so CDC
-- can fill the Debezium `before` of updates.

CREATE TABLE IF NOT EXISTS customers (
    customer_id text PRIMARY KEY,
    email       text NOT NULL,
    country     text NOT NULL,
    created_at  timestamptz NOT NULL
);

CREATE TABLE IF NOT EXISTS merchants (
    merchant_id text PRIMARY KEY,
    name        text NOT NULL,
    category    text NOT NULL,
    country     text NOT NULL
);

CREATE TABLE IF NOT EXISTS orders (
    order_id    text PRIMARY KEY,
    customer_id text NOT NULL,
    total       numeric(12,2) NOT NULL,
    status      text NOT NULL,
    created_at  timestamptz NOT NULL
);

CREATE TABLE IF NOT EXISTS payments (
    payment_id        text PRIMARY KEY,
    order_id          text NOT NULL,
    customer_id       text NOT NULL,
    card_id           text NOT NULL,
    merchant_id       text NOT NULL,
    merchant_category text NOT NULL,
    amount            numeric(12,2) NOT NULL,
    currency          text NOT NULL,
    status            text NOT NULL,
    device_id         text,
    created_at        timestamptz NOT NULL
);

CREATE TABLE IF NOT EXISTS payment_labels (
    payment_id         text PRIMARY KEY,
    is_fraud           boolean NOT NULL,
    reason             text,
    payment_created_at timestamptz NOT NULL,
    labelled_at        timestamptz NOT NULL
);

-- Only where it is not FULL yet: ALTER TABLE takes an exclusive lock, which on a live table waits for
-- every writer and, with one, once deadlocked a start-up (CREATE ... IF NOT EXISTS of an existing
-- table takes none).
DO $$
DECLARE t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['customers', 'merchants', 'orders', 'payments', 'payment_labels'] LOOP
        IF (SELECT relreplident FROM pg_class WHERE oid = t::regclass) <> 'f' THEN
            EXECUTE format('ALTER TABLE %I REPLICA IDENTITY FULL', t);
        END IF;
    END LOOP;
END $$;
