"""Prefect flows: train (the pipeline), retrain (scheduled), ingest sources."""
