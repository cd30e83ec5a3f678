"""Prometheus metrics of the cache and loads, served on KServe's /metrics (default registry)."""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from mlkube.model_servers.sources import ModelSource

_LOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)


class ServerMetrics:
    """Implements cache.CacheObserver plus artifact and batch counters."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.loads = Counter(
            "mlkube_model_loads", "Model loads into memory", ["model", "outcome"], registry=registry
        )
        self.load_seconds = Histogram(
            "mlkube_model_load_seconds",
            "Seconds to load a model",
            ["model"],
            buckets=_LOAD_BUCKETS,
            registry=registry,
        )
        self.hits = Counter(
            "mlkube_model_cache_hits",
            "Requests served by a loaded model",
            ["model"],
            registry=registry,
        )
        self.misses = Counter(
            "mlkube_model_cache_misses",
            "Requests that found no loaded model",
            ["model"],
            registry=registry,
        )
        self.evictions = Counter(
            "mlkube_model_cache_evictions",
            "Models dropped from memory",
            ["model", "reason"],
            registry=registry,
        )
        self.bytes = Gauge(
            "mlkube_model_cache_bytes",
            "Resident bytes each loaded model added to the process (what --memory-budget counts)",
            ["model"],
            registry=registry,
        )
        self.downloads = Counter(
            "mlkube_artifact_downloads",
            "Artifact downloads into the disk cache",
            ["model"],
            registry=registry,
        )
        self.download_seconds = Histogram(
            "mlkube_artifact_download_seconds",
            "Seconds to download",
            ["model"],
            buckets=_LOAD_BUCKETS,
            registry=registry,
        )
        self.disk_hits = Counter(
            "mlkube_artifact_cache_hits",
            "Loads served from the disk cache",
            ["model"],
            registry=registry,
        )
        self.batch_rows = Histogram(
            "mlkube_batch_rows",
            "Rows in one predict call",
            ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 1024),
            registry=registry,
        )
        self.batch_requests = Histogram(
            "mlkube_batch_requests",
            "Requests in one predict call",
            ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=registry,
        )

    # cache.CacheObserver
    def hit(self, key: str) -> None:
        self.hits.labels(key).inc()

    def miss(self, key: str) -> None:
        self.misses.labels(key).inc()

    def loaded(self, key: str, seconds: float, size: int) -> None:
        self.loads.labels(key, "success").inc()
        self.load_seconds.labels(key).observe(seconds)

    def load_failed(self, key: str) -> None:
        self.loads.labels(key, "failure").inc()

    def evicted(self, key: str, reason: str) -> None:
        self.evictions.labels(key, reason).inc()

    def held(self, key: str, size: int) -> None:
        self.bytes.labels(key).set(size)

    # artifacts.ArtifactCache callbacks
    def downloaded(self, source: ModelSource, seconds: float) -> None:
        self.downloads.labels(source.name).inc()
        self.download_seconds.labels(source.name).observe(seconds)

    def disk_hit(self, source: ModelSource) -> None:
        self.disk_hits.labels(source.name).inc()

    def batch(self, model: str, requests: int, rows: int) -> None:
        self.batch_requests.labels(model).observe(requests)
        self.batch_rows.labels(model).observe(rows)
