"""One module per stage: ingest, features, inference, learn, drift, retrain, sinks."""
