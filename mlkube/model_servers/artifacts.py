"""The disk cache of downloaded model artifacts: a reload after eviction reads local files.

Each source is downloaded once into `<root>/.tmp-<random>` and renamed into `<root>/<key>`,
so a half-written copy is never used and nothing lands in $TMPDIR. Entries are trimmed
least-recently-used first when the cache exceeds its bound.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from mlkube.model_servers.sources import ModelSource

log = logging.getLogger(__name__)
_DONE = ".mlkube-complete"  # marker written last; its mtime is the entry's last use


def tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def _download_with_mlflow(uri: str, destination: Path) -> Path:
    from mlflow.artifacts import download_artifacts

    return Path(download_artifacts(artifact_uri=uri, dst_path=str(destination)))


class ArtifactCache:
    def __init__(
        self,
        root: Path,
        max_bytes: int,
        download: Callable[[str, Path], Path] = _download_with_mlflow,
        on_download: Callable[[ModelSource, float], None] | None = None,
        on_hit: Callable[[ModelSource], None] | None = None,
    ) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self._download = download
        self._on_download = on_download
        self._on_hit = on_hit
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        root.mkdir(parents=True, exist_ok=True)
        self.remove_partial()

    def remove_partial(self) -> None:
        """Drop downloads a killed process left half-done."""
        for stale in self.root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)

    def path(self, source: ModelSource) -> Path:
        return self.root / source.key

    def cached(self, source: ModelSource) -> bool:
        return (self.path(source) / _DONE).exists()

    def fetch(self, source: ModelSource) -> Path:
        """A local directory holding the model (blocking)."""
        if source.local_path is not None:
            if not source.local_path.exists():
                raise FileNotFoundError(f"no model at {source.local_path}")
            return source.local_path
        with self._lock_for(source.key):
            final = self.path(source)
            marker = final / _DONE
            if marker.exists():
                marker.touch()
                if self._on_hit:
                    self._on_hit(source)
                return final
            started = time.perf_counter()
            partial = self.root / f".tmp-{uuid.uuid4().hex}"
            try:
                partial.mkdir()
                # runs:/id/model downloads into partial/model, models:/ into partial itself
                model_dir = self._download(source.uri, partial)
                (model_dir / _DONE).touch()
                if final.exists():  # an unfinished copy from a crashed process
                    shutil.rmtree(final, ignore_errors=True)
                os.replace(model_dir, final)
            finally:
                shutil.rmtree(partial, ignore_errors=True)
            if self._on_download:
                self._on_download(source, time.perf_counter() - started)
        self.trim(keep={source.key})
        return final

    def trim(self, keep: set[str] = frozenset()) -> list[str]:  # type: ignore[assignment]
        """Remove least recently used entries until the cache fits; returns removed keys."""
        entries = []
        for entry in self.root.iterdir():
            marker = entry / _DONE
            if entry.name.startswith(".") or not marker.exists():
                continue
            entries.append((marker.stat().st_mtime, entry, tree_bytes(entry)))
        total = sum(size for _, _, size in entries)
        removed = []
        for _, entry, size in sorted(entries, key=lambda item: item[0]):
            if total <= self.max_bytes:
                break
            if entry.name in keep:
                continue
            with self._lock_for(entry.name):
                shutil.rmtree(entry, ignore_errors=True)
            total -= size
            removed.append(entry.name)
            log.info(
                "artifact cache: removed %s to stay under %d bytes", entry.name, self.max_bytes
            )
        return removed

    def _lock_for(self, key: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())
