"""The reference scenario: a simulated online shop (pure generator) and a driver that writes it into
Kafka (clickstream) and Postgres (rows that CDC turns into ``cdc.*`` topics)."""

from streams.scenario.shop import Click, Row, ShopConfig, ShopEvent, ShopSimulator

__all__ = ["Click", "Row", "ShopConfig", "ShopEvent", "ShopSimulator"]
