"""The KServe predictor: MLflow models loaded on first request, kept while used, evicted idle.

Pieces, one file each: settings (what to serve), sources (MLflow URI -> pinned version),
artifacts (disk cache of downloads), cache (memory cache: single-flight, TTL, LRU budget),
codec (request <-> model input through the MLflow signature), batching (micro-batches),
loader (source -> loaded model), model (the kserve.Model), repository (multi-model),
metrics, server (process wiring), commands (the `mlkube serve|predict` CLI).

Importing this package is cheap: kserve, mlflow and the flavours are imported by server.py.
"""

from mlkube.model_servers.settings import ServerSettings, parse_quantity

__all__ = ["ServerSettings", "parse_quantity"]
