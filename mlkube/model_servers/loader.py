"""From a model URI to a model in memory: resolve -> disk cache -> mlflow.pyfunc.load_model."""

from __future__ import annotations

import gc
import importlib
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mlkube.model_servers.artifacts import ArtifactCache, tree_bytes
from mlkube.model_servers.batching import MicroBatcher, Trust, judge_batching
from mlkube.model_servers.codec import Codec, Rows, codec_for_schema, describe_outputs
from mlkube.model_servers.memory import PAGE_BYTES, ResidentMeter
from mlkube.model_servers.sources import ModelSource, resolve

log = logging.getLogger(__name__)

# Imported at start-up so the first request pays only for reading the weights.
STARTUP_IMPORTS = ("mlflow.pyfunc", "mlflow.sklearn", "sklearn", "skops.io", "pandas")
# Flavour name in MLmodel -> modules worth importing before the load.
FLAVOUR_IMPORTS = {
    "sklearn": ("mlflow.sklearn", "sklearn", "skops.io"),
    "pytorch": ("mlflow.pytorch", "torch"),
    "python_function": ("mlflow.pyfunc",),
}

Explainer = Callable[[Any], Any]


class Unloadable(Exception):
    """The version's artifacts are on disk (downloaded afresh) and still do not load."""


@dataclass
class LoadedModel:
    source: ModelSource
    pyfunc: Any
    codec: Codec
    batcher: MicroBatcher
    explainer: Explainer | None
    size: int


def import_modules(names: tuple[str, ...] | list[str]) -> None:
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as error:  # an image without torch still serves sklearn
            log.debug("not importing %s: %s", name, error)


def limit_threads(threads: int | None) -> None:
    """Cap OpenMP/BLAS threads of the libraries loaded so far. The server also sets
    OMP_NUM_THREADS & co. before importing them, which covers libraries loaded later and
    OpenMP's per-thread setting in the predict threads; this call catches what came before.

    A 1-row predict gains nothing from a thread team, and on a busy machine OpenMP threads
    that wait for each other turn a 3 ms HistGradientBoosting predict into 100+ ms.
    """
    if not threads:
        return
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=threads)
    except ImportError:
        pass
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def warm_up() -> None:
    """Imports and one-off work MLflow would otherwise do inside the first load.

    `pyfunc.load_model` compares the model's requirements with the installed packages; the
    first comparison builds a map of all installed distributions (about 1 s).
    """
    import_modules(STARTUP_IMPORTS)
    try:
        from mlflow.utils.requirements_utils import warn_dependency_requirement_mismatches

        warn_dependency_requirement_mismatches(["mlflow"])
    except Exception as error:  # an internal helper: its absence only costs the first load
        log.debug("requirements warm-up skipped: %s", error)


def freeze_long_lived() -> None:
    """Keep what the imports made out of the garbage collector's full collections.

    MLflow, scikit-learn, pandas and kserve leave about 400,000 objects; a full collection
    walks all of them (0.2-0.9 s on two busy cores) with every request in flight waiting,
    and serving's allocations start one every few seconds: that was the c16 p99. Frozen
    objects are never freed by a collection, so only imports go there (modules live for
    the whole process), not loaded models, which eviction must be able to free.
    """
    gc.collect()
    gc.freeze()


def flavours(model_dir: Path) -> list[str]:
    try:
        meta = yaml.safe_load((model_dir / "MLmodel").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return []
    return list(meta.get("flavors", {}))


def find_explainer(pyfunc: Any) -> Explainer | None:
    """The `explain(model_input)` of a pyfunc's python model, if it has one (the contract)."""
    try:
        python_model = pyfunc.unwrap_python_model()
    except Exception:  # not a PythonModel-based flavour
        return None
    explain = getattr(python_model, "explain", None)
    return explain if callable(explain) else None


def example_rows(pyfunc: Any, path: Path, codec: Codec, count: int = 16) -> list[Rows]:
    """One-row inputs from the model's input example, repeated up to `count` rows."""
    try:
        example = pyfunc.metadata.load_input_example(str(path))
    except Exception:
        return []
    if example is None:
        return []
    try:
        if hasattr(example, "to_dict"):
            records = example.to_dict(orient="records")
            rows = [codec.decode_v1({"instances": [record]}) for record in records]
        else:
            array = example if not isinstance(example, dict) else next(iter(example.values()))
            rows = [codec.decode_v1({"instances": [item]}) for item in list(array)]
    except Exception:  # an example the codec cannot read: no batching
        return []
    return [rows[i % len(rows)] for i in range(count)] if rows else []


_TRUST_LOG = {
    Trust.ON: "on",
    Trust.OFF: "off (predictions depend on the batch)",
    Trust.PROBATION: "on probation (no input example: live batches are checked row by row)",
}


@dataclass(frozen=True)
class ModelMetadata:
    """Open Inference Protocol inputs and outputs, from the signature in the MLmodel file."""

    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]


def read_metadata(model_dir: Path) -> ModelMetadata:
    from mlflow.models import Model

    model: Any = Model.load(str(model_dir / "MLmodel"))
    codec = codec_for_schema(model.get_input_schema())
    return ModelMetadata(
        codec.describe(), describe_outputs(model.get_output_schema(), codec.output_name)
    )


class ModelLoader:
    def __init__(
        self,
        artifacts: ArtifactCache,
        max_batch_rows: int = 256,
        on_batch: Callable[[str, int, int], None] | None = None,
        resolver: Callable[[str], ModelSource] = resolve,
        meter: ResidentMeter | None = None,
    ) -> None:
        self.artifacts = artifacts
        self._meter = meter or ResidentMeter()
        self.max_batch_rows = max_batch_rows
        self._on_batch = on_batch
        self._resolve = resolver
        self._trust: dict[str, Trust] = {}  # per model version: kept over evictions
        self._metadata: dict[str, ModelMetadata] = {}  # per model version: immutable
        self._pinned: dict[str, ModelSource] = {}  # URIs naming a version resolve once
        self._resolved: dict[str, ModelSource] = {}  # the last answer for every URI

    def source(self, uri: str) -> ModelSource:
        """What `uri` means now. A version or run never changes meaning, so it is asked once
        (a reload after eviction then needs no MLflow at all); an alias is asked every load."""
        pinned = self._pinned.get(uri)
        if pinned is not None:
            return pinned
        source = self._resolve(uri)
        if not uri.startswith("models:/") or "@" not in uri:
            self._pinned[uri] = source
        self._resolved[uri] = source
        return source

    def on_disk(self, uri: str) -> bool:
        """`uri` was resolved and its artifacts are complete on local disk (no MLflow call:
        readiness probes ask this every few seconds)."""
        source = self._resolved.get(uri)
        return source is not None and self.artifacts.cached(source)

    def prefetch(self, uri: str) -> Path:
        """Download (not load) and import the flavour's modules: makes the first request fast."""
        path = self.artifacts.fetch(self.source(uri))
        modules = len(sys.modules)
        for flavour in flavours(path):
            import_modules(FLAVOUR_IMPORTS.get(flavour, ()))
        if len(sys.modules) > modules:  # torch alone adds hundreds of thousands of objects
            freeze_long_lived()
        return path

    def metadata(self, uri: str) -> ModelMetadata:
        """Blocking: resolve and download (never load into memory), then read the signature.
        An alias is not asked again once resolved: metadata follows what loads and serves."""
        source = self._resolved.get(uri) or self.source(uri)
        known = self._metadata.get(source.key)
        if known is None:
            known = self._metadata[source.key] = read_metadata(self.artifacts.fetch(source))
        return known

    def load(self, name: str, uri: str) -> tuple[LoadedModel, int]:
        """Blocking: run it in a thread. Returns the model and the resident bytes it added.
        Loads are measured one at a time (memory.ResidentMeter)."""
        source = self.source(uri)
        path = self.artifacts.fetch(source)
        for flavour in flavours(path):  # an import is the process's, not this model's memory
            import_modules(FLAVOUR_IMPORTS.get(flavour, ()))
        modules = len(sys.modules)
        with self._meter.measure() as growth:
            loaded = self._load_measured(name, source, path)
        if len(sys.modules) > modules:
            # Unpickling imported the estimator's modules (sklearn.linear_model...): code the
            # process keeps for every model, 4 MiB for a first linear model. Measured again
            # now that they are imported, the load counts the model alone (once per new kind).
            del loaded
            with self._meter.measure() as growth:
                loaded = self._load_measured(name, source, path)
        # The budget counts resident memory (memory.py); bytes on disk only where the
        # process's RSS cannot be read.
        # At least a page: a model under the measure's resolution (a few kilobytes of
        # objects in memory the process already had) still shows as loaded in /metrics.
        size = max(growth.bytes, PAGE_BYTES) if growth.bytes is not None else tree_bytes(path)
        loaded.size = size
        log.info("loaded %s (%s) from %s, %d resident bytes", name, source.label, path, size)
        return loaded, size

    def _load_measured(self, name: str, source: ModelSource, path: Path) -> LoadedModel:
        import mlflow.pyfunc

        try:
            pyfunc = mlflow.pyfunc.load_model(str(path))
        except Exception as error:
            if source.local_path is not None:
                raise
            # A copy damaged in a way sizes do not show: one fresh download before giving up.
            log.warning("loading %s failed (%s); downloading it again", source.label, error)
            self.artifacts.discard(source)
            path = self.artifacts.fetch(source)
            try:
                pyfunc = mlflow.pyfunc.load_model(str(path))
            except Exception as again:
                raise Unloadable(f"{source.label} does not load: {again}") from again
        codec = codec_for_schema(pyfunc.metadata.get_input_schema())
        on_batch = self._on_batch

        def observe(requests: int, rows: int) -> None:
            if on_batch:
                on_batch(name, requests, rows)

        key = source.key
        if key not in self._trust:
            self._trust[key] = judge_batching(
                pyfunc.predict, codec, example_rows(pyfunc, path, codec)
            )
            log.info("%s: micro-batching %s", name, _TRUST_LOG[self._trust[key]])

        def remember(trust: Trust) -> None:
            self._trust[key] = trust

        batcher = MicroBatcher(
            pyfunc.predict,
            codec,
            self.max_batch_rows,
            observe,
            trust=self._trust[key],
            on_verdict=remember,
        )
        return LoadedModel(source, pyfunc, codec, batcher, find_explainer(pyfunc), 0)
