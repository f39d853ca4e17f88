"""Writers into the stores Weir serves from: the Redis online store and ClickHouse."""
