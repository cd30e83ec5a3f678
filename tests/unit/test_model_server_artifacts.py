"""The disk cache of artifacts: it verifies what it kept, re-downloads damage, stays private."""

from __future__ import annotations

import shutil
import stat
from pathlib import Path

import pytest

from mlkube.model_servers.artifacts import ArtifactCache, DamagedCopy
from mlkube.model_servers.sources import ModelSource

WEIGHTS = b"w" * 4096


class Origin:
    """A model store on local disk; `download` copies from it as MLflow copies from a server."""

    def __init__(self, where: Path) -> None:
        self.dir = where / "origin"
        (self.dir / "data").mkdir(parents=True)
        (self.dir / "MLmodel").write_text("flavors: {}\n")
        (self.dir / "data" / "model.pkl").write_bytes(WEIGHTS)
        self.downloads = 0

    def download(self, uri: str, destination: Path) -> Path:
        self.downloads += 1
        target = destination / "model"
        shutil.copytree(self.dir, target)
        return target


SOURCE = ModelSource("models:/m/1", "models-m-v1", "m", "1")


@pytest.fixture
def origin(tmp_path: Path) -> Origin:
    return Origin(tmp_path)


def test_a_truncated_copy_is_downloaded_again(origin: Origin, tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path / "cache", 2**30, download=origin.download)
    path = cache.fetch(SOURCE)
    assert cache.cached(SOURCE)
    (path / "data" / "model.pkl").write_bytes(WEIGHTS[:100])  # truncated on disk

    assert not cache.cached(SOURCE)
    with pytest.raises(DamagedCopy, match="model.pkl has 100 bytes, expected 4096"):
        cache.verify(SOURCE)
    again = cache.fetch(SOURCE)
    assert origin.downloads == 2
    assert (again / "data" / "model.pkl").read_bytes() == WEIGHTS
    assert cache.cached(SOURCE)


def test_a_deleted_file_or_a_marker_without_manifest_is_not_trusted(
    origin: Origin, tmp_path: Path
) -> None:
    cache = ArtifactCache(tmp_path / "cache", 2**30, download=origin.download)
    path = cache.fetch(SOURCE)
    (path / "MLmodel").unlink()
    assert not cache.cached(SOURCE)
    path = cache.fetch(SOURCE)
    (path / ".mlkube-complete").write_text("")  # an older server's empty marker
    assert not cache.cached(SOURCE)
    cache.fetch(SOURCE)
    assert origin.downloads == 3


def test_an_intact_copy_is_read_from_disk(origin: Origin, tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path / "cache", 2**30, download=origin.download)
    cache.fetch(SOURCE)
    cache.fetch(SOURCE)
    assert origin.downloads == 1


def test_discard_makes_the_next_fetch_download(origin: Origin, tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path / "cache", 2**30, download=origin.download)
    cache.fetch(SOURCE)
    cache.discard(SOURCE)
    assert not cache.cached(SOURCE)
    cache.fetch(SOURCE)
    assert origin.downloads == 2


def test_the_cache_directory_is_private(origin: Origin, tmp_path: Path) -> None:
    fresh = ArtifactCache(tmp_path / "new" / "cache", 2**30, download=origin.download)
    assert stat.S_IMODE(fresh.root.stat().st_mode) == 0o700
    wide = tmp_path / "wide"
    wide.mkdir(mode=0o777)
    wide.chmod(0o777)
    ArtifactCache(wide, 2**30, download=origin.download)
    assert stat.S_IMODE(wide.stat().st_mode) == 0o700


def test_a_download_without_an_mlmodel_file_is_refused(origin: Origin, tmp_path: Path) -> None:
    (origin.dir / "MLmodel").unlink()  # the store lost the version's files
    cache = ArtifactCache(tmp_path / "cache", 2**30, download=origin.download)
    with pytest.raises(DamagedCopy, match="no MLmodel file"):
        cache.fetch(SOURCE)
    assert not cache.cached(SOURCE)
