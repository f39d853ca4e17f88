"""Serving: routing between model versions, the response cache, and what keeps inference answering when a
dependency fails. The inference stage (:mod:`streams.stages.inference`) is built from these."""
