"""Images for the test node that are not built from the Dockerfile: one static binary each
(the pod sandbox), written as a docker archive that `ctr images import` takes."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def single_binary_image(binary: Path, reference: str, cache: Path, *, entrypoint: str) -> Path:
    """A docker archive of an image holding only `binary` at `entrypoint`, cached under
    `cache` by the binary's content; returns its path."""
    content = binary.read_bytes()
    layer_buf = io.BytesIO()
    with tarfile.open(fileobj=layer_buf, mode="w", format=tarfile.PAX_FORMAT) as layer:
        info = tarfile.TarInfo(entrypoint.lstrip("/"))
        info.size = len(content)
        info.mode = 0o755
        layer.addfile(info, io.BytesIO(content))
    layer_bytes = layer_buf.getvalue()
    diff_id = _sha256(layer_bytes)
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Entrypoint": [entrypoint], "User": "65535:65535"},
            "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff_id}"]},
        },
        sort_keys=True,
    ).encode()
    config_id = _sha256(config)
    path = cache / f"{reference.rsplit('/', 1)[-1].replace(':', '-')}-{config_id[:12]}.tar"
    if path.exists():
        return path
    manifest = json.dumps(
        [
            {
                "Config": f"{config_id}.json",
                "RepoTags": [reference],
                "Layers": [f"{diff_id}/layer.tar"],
            }
        ]
    ).encode()
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp.{os.getpid()}")
    with tarfile.open(tmp, mode="w") as archive:
        for name, data in (
            (f"{diff_id}/layer.tar", layer_bytes),
            (f"{config_id}.json", config),
            ("manifest.json", manifest),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    tmp.replace(path)
    return path


def image_archives() -> dict[str, Path]:
    """Image reference -> docker archive of the images `make images` built
    (scripts/build-images.sh writes the index); raises FileNotFoundError naming the fix."""
    root = Path(os.environ.get("MLKUBE_K8S_CACHE") or Path.home() / ".cache" / "mlkube")
    index = root / "images" / "current.json"
    if not index.exists():
        raise FileNotFoundError(f"{index} is missing: run `make images`")
    images = json.loads(index.read_text())["images"]
    found = {entry["image"]: Path(entry["archive"]) for entry in images.values()}
    missing = [str(p) for p in found.values() if not p.exists()]
    if missing:
        raise FileNotFoundError(f"image archives missing ({', '.join(missing)}): run `make images`")
    return found
