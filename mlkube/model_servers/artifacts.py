"""The disk cache of downloaded model artifacts: a reload after eviction reads local files.

Each source is downloaded once into `<root>/.tmp-<random>`, flushed to disk (fsync), and
renamed into `<root>/<key>`, so a half-written copy is never used and nothing lands in
$TMPDIR. The completion marker, written last, lists every file with its size; a copy whose
files no longer match it (truncated, deleted) is downloaded again rather than trusted.
Entries are trimmed least-recently-used first when the cache exceeds its bound. The cache
directory is private to the server's user (0700): other users must not swap the weights.
"""

from __future__ import annotations

import json
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
PRIVATE = 0o700


class DamagedCopy(Exception):
    """A cached copy does not match its manifest (a file truncated, changed size or gone)."""


def private_dir(path: Path) -> Path:
    """`path` as a directory only its owner can read, write or enter."""
    path.mkdir(mode=PRIVATE, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o777 != PRIVATE:
        os.chmod(path, PRIVATE)  # an older, wider directory: narrowed
    return path


def tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def manifest(model_dir: Path) -> dict[str, int]:
    """Every file under `model_dir` (relative path -> size), the marker excluded."""
    return {
        str(f.relative_to(model_dir)): f.stat().st_size
        for f in sorted(model_dir.rglob("*"))
        if f.is_file() and not f.is_symlink() and f.name != _DONE
    }


def check_manifest(model_dir: Path) -> None:
    """Raises DamagedCopy naming the first file that differs from the marker's manifest."""
    try:
        listed = json.loads((model_dir / _DONE).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        raise DamagedCopy(f"{model_dir.name}: no readable manifest") from None
    for name, size in listed.items():
        try:
            found = (model_dir / name).stat().st_size
        except OSError:
            raise DamagedCopy(f"{model_dir.name}: {name} is missing") from None
        if found != size:
            raise DamagedCopy(f"{model_dir.name}: {name} has {found} bytes, expected {size}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def seal(model_dir: Path) -> None:
    """Flush every file to disk, then write the manifest marker (flushed too): after a crash
    the marker never names data the disk does not hold."""
    files = manifest(model_dir)
    for name in files:
        _fsync(model_dir / name)
    marker = model_dir / _DONE
    marker.write_text(json.dumps({"files": files}))
    _fsync(marker)
    for directory in {model_dir, *(p for p in model_dir.rglob("*") if p.is_dir())}:
        _fsync(directory)


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
        private_dir(root)
        self.remove_partial()

    def remove_partial(self) -> None:
        """Drop downloads a killed process left half-done."""
        for stale in self.root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)

    def path(self, source: ModelSource) -> Path:
        return self.root / source.key

    def cached(self, source: ModelSource) -> bool:
        """A complete copy whose files still match its manifest."""
        try:
            self.verify(source)
        except DamagedCopy:
            return False
        return True

    def verify(self, source: ModelSource) -> None:
        """Raises DamagedCopy unless the copy of `source` is complete and intact (cheap: stats)."""
        if source.local_path is not None:
            if not source.local_path.exists():
                raise DamagedCopy(f"no model at {source.local_path}")
            return
        check_manifest(self.path(source))

    def discard(self, source: ModelSource) -> None:
        """Forget the copy of `source` (it failed to load): the next fetch downloads again."""
        if source.local_path is not None:
            return
        with self._lock_for(source.key):
            shutil.rmtree(self.path(source), ignore_errors=True)

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
                try:
                    check_manifest(final)
                except DamagedCopy as damage:
                    log.warning("artifact cache: %s; downloading again", damage)
                else:
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
                if not (model_dir / "MLmodel").is_file():  # e.g. a version whose files are gone
                    raise DamagedCopy(f"{source.label}: the download holds no MLmodel file")
                seal(model_dir)
                if final.exists():  # an unfinished or damaged copy
                    shutil.rmtree(final, ignore_errors=True)
                os.replace(model_dir, final)
                _fsync(self.root)  # the rename itself survives a crash
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
