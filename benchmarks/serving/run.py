"""Serving benchmark: mlkube's predictor beside a bare kserve.Model and Seldon MLServer.

    python benchmarks/serving/run.py [--duration 15] [--repeats 2] [--write] [--profile]

The model: scikit-learn HistGradientBoostingRegressor on the insurance table one-hot encoded
(11 numeric columns), logged with `mlflow.sklearn.log_model` and a signature, twice: without
an input example and with one. The peers, each started alone on 127.0.0.1 and stopped before
the next starts:
- a bare `kserve.Model` holding the pyfunc (bare_server.py: predict on the event loop);
- the mlkube predictor (`python -m mlkube.model_servers`, the registered version pinned);
- Seldon MLServer 1.7.1 with its MLflow runtime, with adaptive batching (16 rows, 5 ms)
  and without, installed into a virtualenv of its own under ~/.cache/mlkube.
Every request is one row, Open Inference Protocol v2. REST load comes from wrk (1 thread, a
Lua script for the POST body; p50/p99 from wrk's latency histogram), at concurrency 1 and
16; gRPC load from ghz (built from Go modules; 1 CPU, 1 connection) at concurrency 16. Each
point runs `--duration` seconds after a 3 s warm-up, and the whole round repeats
`--repeats` times, servers in rotating order; the tables give the median of the repeats.
Before any load, each server's first request after it reports ready is timed, and its
predictions for 64 rows, sent one row a request 16 at a time over REST and over gRPC, are
compared with the model's own.

Tools it installs when missing: wrk (`apt-get install wrk`), ghz (`go install`) and the
MLServer virtualenv (uv). `--profile` also samples the mlkube predictor with py-spy under
load and writes where its time goes (PROFILE.md). `--write` saves RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from mlkube.local import free_port

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
INSURANCE = REPO.parent / "shared" / "data" / "insurance.csv"
CACHE = Path.home() / ".cache" / "mlkube"
MLSERVER_VENV = CACHE / "mlserver-1.7.1"
# MLServer 1.7.1's inference-pool worker fails with uvloop 0.23; the shared libraries are
# pinned to the versions in this venv, so every server predicts with the same code.
MLSERVER_REQUIREMENTS = ["mlserver==1.7.1", "mlserver-mlflow==1.7.1", "uvloop<0.22"]
SHARED_LIBRARIES = ["mlflow", "scikit-learn", "skops", "numpy", "pandas", "scipy"]
GHZ = CACHE / "bin" / "ghz"
GHZ_MODULE = "github.com/bojand/ghz/cmd/ghz@v0.121.0"
QUIET = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}
MODEL = "bench"  # the name every server serves the model under
VARIANTS = {"without input example": "bench-plain", "with input example": "bench-example"}
CHECK_ROWS = 64
POINTS = ("rest c1", "rest c16", "grpc c16")
WARM_UP_SECONDS = 3.0


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def load_average() -> float:
    return os.getloadavg()[0]


# -- tools ----------------------------------------------------------------------------------
def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    say("installing wrk (apt-get)")
    if subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], capture_output=True).returncode:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, check=True)
        subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], capture_output=True, check=True)
    return shutil.which("wrk") or "/usr/bin/wrk"


def ensure_ghz() -> Path:
    if GHZ.exists():
        return GHZ
    go = shutil.which("go") or "/usr/local/go/bin/go"
    say(f"building ghz ({GHZ_MODULE}) into {GHZ.parent}")
    GHZ.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "GOBIN": str(GHZ.parent), "GOFLAGS": "-mod=mod"}
    subprocess.run([go, "install", GHZ_MODULE], env=env, check=True, cwd=tempfile.gettempdir())
    return GHZ


def ensure_mlserver() -> Path:
    """MLServer 1.7.1 + its MLflow runtime in a venv of their own; returns its `mlserver`."""
    wanted = MLSERVER_REQUIREMENTS + [f"{n}=={metadata.version(n)}" for n in SHARED_LIBRARIES]
    marker = MLSERVER_VENV / "requirements.txt"
    binary = MLSERVER_VENV / "bin" / "mlserver"
    if binary.exists() and marker.exists() and marker.read_text().split() == wanted:
        return binary
    uv = Path(sys.executable).parent / "uv"
    say(f"installing {', '.join(wanted)} into {MLSERVER_VENV}")
    subprocess.run(
        [str(uv), "venv", "--clear", "--python", sys.executable, str(MLSERVER_VENV)],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [str(uv), "pip", "install", "--python", str(MLSERVER_VENV / "bin" / "python"), *wanted],
        check=True,
    )
    marker.write_text("\n".join(wanted) + "\n")
    return binary


def write_protoset(path: Path) -> Path:
    """The Open Inference Protocol's gRPC service as a FileDescriptorSet for ghz, taken from
    the descriptor compiled into kserve."""
    from google.protobuf import descriptor_pb2
    from kserve.protocol.grpc import grpc_predict_v2_pb2

    files = descriptor_pb2.FileDescriptorSet()
    grpc_predict_v2_pb2.DESCRIPTOR.CopyToProto(files.file.add())
    path.write_bytes(files.SerializeToString())
    return path


# -- the model ------------------------------------------------------------------------------
def insurance_table() -> tuple[Any, Any]:
    """(features, target): 11 numeric columns (age, bmi, children, one-hot sex, smoker,
    region)."""
    import pandas as pd

    frame = pd.read_csv(INSURANCE)
    target = "charges" if "charges" in frame else "expenses"
    features = pd.get_dummies(
        frame.drop(columns=target), columns=["sex", "smoker", "region"], dtype="float64"
    )
    return features, frame[target]


def log_variants(tracking_uri: str, out: Path) -> dict[str, Path]:
    """Registers the model once per variant (version 1 each); returns local copies."""
    import mlflow
    from mlflow.models import infer_signature
    from sklearn.ensemble import HistGradientBoostingRegressor

    mlflow.set_tracking_uri(tracking_uri)
    features, target = insurance_table()
    model = HistGradientBoostingRegressor(random_state=0).fit(features, target)
    signature = infer_signature(features, model.predict(features))
    copies = {}
    for variant, name in VARIANTS.items():
        with mlflow.start_run():
            mlflow.sklearn.log_model(
                model,
                name="model",
                signature=signature,
                input_example=features.head(3) if variant == "with input example" else None,
                pip_requirements=["scikit-learn", "skops"],
                registered_model_name=name,
                skops_trusted_types=[
                    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor"
                ],
            )
        copies[variant] = Path(
            mlflow.artifacts.download_artifacts(f"models:/{name}/1", dst_path=str(out / name))
        )
    return copies


V2_TYPES = {"int64": ("INT64", "int64_contents"), "float64": ("FP64", "fp64_contents")}


def rows_of(features: Any, count: int) -> list[dict[str, Any]]:
    """The first `count` rows as {column: python value}, with each column's v2 type."""
    rows = []
    for i in range(count):
        rows.append({c: features[c].iloc[i].item() for c in features.columns})
    return rows


def column_types(features: Any) -> dict[str, tuple[str, str]]:
    return {c: V2_TYPES[str(features[c].dtype)] for c in features.columns}


def rest_body(row: dict[str, Any], types: dict[str, tuple[str, str]]) -> dict[str, Any]:
    return {
        "inputs": [
            {"name": c, "datatype": types[c][0], "shape": [1], "data": [v]} for c, v in row.items()
        ]
    }


def grpc_body(row: dict[str, Any], types: dict[str, tuple[str, str]]) -> dict[str, Any]:
    """The same row as a ModelInferRequest in protobuf's JSON form (for ghz)."""
    return {
        "model_name": MODEL,
        "inputs": [
            {"name": c, "datatype": types[c][0], "shape": [1], "contents": {types[c][1]: [v]}}
            for c, v in row.items()
        ],
    }


# -- servers --------------------------------------------------------------------------------
@dataclass
class Server:
    label: str
    process: subprocess.Popen[bytes]
    http_port: int
    grpc_port: int
    log: Path
    ready_seconds: float = 0.0
    first_request_seconds: float = 0.0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


@dataclass
class Peer:
    label: str
    command: Callable[[str, Path, int, int], list[str]]  # (registered, dir, http, grpc port)
    setup: Callable[[Path, Path, int, int], None] | None = None  # writes config files


def start(
    peer: Peer, variant: str, model_dir: Path, env: dict[str, str], work: Path, body: bytes
) -> Server:
    """Starts the peer alone, waits for /v2/health/ready, then times one request."""
    http_port, grpc_port = free_port(), free_port()
    folder = work / f"{peer.label}-{variant}".replace(" ", "_")
    folder.mkdir(parents=True, exist_ok=True)
    if peer.setup:
        peer.setup(folder, model_dir, http_port, grpc_port)
    log = folder / "server.log"
    started = time.perf_counter()
    with open(log, "ab") as out:
        process = subprocess.Popen(
            peer.command(VARIANTS[variant], model_dir, http_port, grpc_port),
            env=env,
            cwd=folder,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Server(peer.label, process, http_port, grpc_port, log)
    deadline = time.monotonic() + 240
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{peer.label} exited: {log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            stop(server)
            raise RuntimeError(f"{peer.label} not ready: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(server.base + "/v2/health/ready", timeout=2) as answer:
                if answer.status == 200:
                    break
        except OSError:
            pass
        time.sleep(0.05)
    server.ready_seconds = time.perf_counter() - started
    first = time.perf_counter()
    post(server, body)
    server.first_request_seconds = time.perf_counter() - first
    return server


def stop(server: Server) -> None:
    if server.process.poll() is None:
        os.killpg(server.process.pid, signal.SIGTERM)
        try:
            server.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait()


def post(server: Server, body: bytes) -> dict[str, Any]:
    request = urllib.request.Request(
        f"{server.base}/v2/models/{MODEL}/infer", body, {"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as answer:
        return dict(json.loads(answer.read()))


def peers(python: str, mlserver: Path, baseline: Path | None = None) -> list[Peer]:
    def bare(registered: str, model_dir: Path, http_port: int, grpc_port: int) -> list[str]:
        return [
            python,
            str(HERE / "bare_server.py"),
            str(model_dir),
            str(http_port),
            str(grpc_port),
        ]

    def mlkube(registered: str, model_dir: Path, http_port: int, grpc_port: int) -> list[str]:
        return [
            python, "-m", "mlkube.model_servers",
            "--model-uri", f"models:/{registered}/1",
            "--model-name", MODEL,
            "--host", "127.0.0.1",
            "--http_port", str(http_port),
            "--grpc_port", str(grpc_port),
            "--ttl-seconds", "3600",
        ]  # fmt: skip

    def mlserver_setup(batching: bool) -> Callable[[Path, Path, int, int], None]:
        def setup(folder: Path, model_dir: Path, http_port: int, grpc_port: int) -> None:
            settings = {
                "host": "127.0.0.1",
                "http_port": http_port,
                "grpc_port": grpc_port,
                "metrics_port": free_port(),
            }
            (folder / "settings.json").write_text(json.dumps(settings))
            model: dict[str, Any] = {
                "name": MODEL,
                "implementation": "mlserver_mlflow.MLflowRuntime",
                "parameters": {"uri": str(model_dir)},
            }
            if batching:
                model.update(max_batch_size=16, max_batch_time=0.005)
            (folder / "model-settings.json").write_text(json.dumps(model))

        return setup

    def mlserver_command(registered: str, model_dir: Path, http: int, grpc: int) -> list[str]:
        return [str(mlserver), "start", "."]

    def mlkube_baseline(registered: str, model_dir: Path, http: int, grpc: int) -> list[str]:
        # PYTHONPATH comes before the editable install on sys.path
        assert baseline is not None
        command = mlkube(registered, model_dir, http, grpc)
        return ["env", f"PYTHONPATH={baseline.resolve()}", *command]

    baseline_peers = [Peer("mlkube baseline", mlkube_baseline)] if baseline else []
    return [
        Peer("bare kserve.Model", bare),
        Peer("mlkube predictor", mlkube),
        *baseline_peers,
        Peer("MLServer, adaptive batching (16 rows, 5 ms)", mlserver_command, mlserver_setup(True)),
        Peer("MLServer, no batching", mlserver_command, mlserver_setup(False)),
    ]


# -- load -----------------------------------------------------------------------------------
@dataclass
class Point:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    load: float  # load average when the point started


def run_wrk(wrk: str, server: Server, body_file: Path, concurrency: int, seconds: float) -> Point:
    load = load_average()
    result = subprocess.run(
        [
            wrk,
            "-t1",
            f"-c{concurrency}",
            f"-d{seconds:g}s",
            "--timeout",
            "10s",
            "-s",
            str(HERE / "post.lua"),
            f"{server.base}/v2/models/{MODEL}/infer",
        ],  # fmt: skip
        env={**os.environ, "WRK_BODY_FILE": str(body_file)},
        capture_output=True,
        text=True,
        check=True,
    )
    line = next(x for x in result.stdout.splitlines() if x.startswith("WRK_RESULT "))
    found = json.loads(line.removeprefix("WRK_RESULT "))
    return Point(
        rps=found["requests"] / (found["duration_us"] / 1e6),
        p50_ms=found["p50_us"] / 1000,
        p99_ms=found["p99_us"] / 1000,
        errors=int(found["errors"]),
        load=load,
    )


def run_ghz(
    ghz: Path, server: Server, protoset: Path, data: Path, concurrency: int, seconds: float
) -> Point:
    load = load_average()
    result = subprocess.run(
        [
            str(ghz),
            "--insecure",
            "--protoset",
            str(protoset),
            "--call",
            "inference.GRPCInferenceService.ModelInfer",
            "--data-file",
            str(data),
            "-c",
            str(concurrency),
            "-z",
            f"{seconds:g}s",
            "--connections",
            "1",
            "--cpus",
            "1",
            "-O",
            "json",
            f"127.0.0.1:{server.grpc_port}",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        check=True,
    )
    found = json.loads(result.stdout)
    percentiles = {p["percentage"]: p["latency"] for p in found.get("latencyDistribution") or []}
    codes = found.get("statusCodeDistribution") or {}
    return Point(
        rps=float(found["rps"]),
        p50_ms=percentiles.get(50, 0) / 1e6,
        p99_ms=percentiles.get(99, 0) / 1e6,
        errors=_grpc_errors(codes, concurrency),
        load=load,
    )


def _grpc_errors(codes: dict[str, int], concurrency: int) -> int:
    """Calls that did not succeed, less the calls in flight when ghz stopped at the end of its
    duration (it reports up to `concurrency` of them as Canceled or Unavailable)."""
    failed = sum(n for code, n in codes.items() if code != "OK")
    cut_off = sum(codes.get(code, 0) for code in ("Canceled", "Unavailable"))
    return failed - min(cut_off, concurrency)


# -- predictions ----------------------------------------------------------------------------
def check_predictions(
    server: Server, rows: list[dict[str, Any]], types: dict[str, Any], expected: list[float]
) -> tuple[int, int]:
    """(REST mismatches, gRPC mismatches) over `rows`, one row a request, 16 at a time."""

    def rest(row: dict[str, Any]) -> float:
        answer = post(server, json.dumps(rest_body(row, types)).encode())
        return float(answer["outputs"][0]["data"][0])

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        over_rest = list(pool.map(rest, rows))
    over_grpc = asyncio.run(_grpc_predictions(server.grpc_port, rows, types))
    return (
        sum(a != b for a, b in zip(over_rest, expected, strict=True)),
        sum(a != b for a, b in zip(over_grpc, expected, strict=True)),
    )


async def _grpc_predictions(
    port: int, rows: list[dict[str, Any]], types: dict[str, Any]
) -> list[float]:
    import grpc
    import numpy as np
    from google.protobuf import json_format
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        limit = asyncio.Semaphore(16)

        async def one(row: dict[str, Any]) -> float:
            request = json_format.ParseDict(grpc_body(row, types), pb.ModelInferRequest())
            async with limit:
                response = await stub.ModelInfer(request, timeout=60)
            if response.raw_output_contents:
                return float(np.frombuffer(response.raw_output_contents[0], "<f8")[0])
            return float(response.outputs[0].contents.fp64_contents[0])

        return list(await asyncio.gather(*(one(row) for row in rows)))


# -- profile --------------------------------------------------------------------------------
def profile(
    server: Server, label: str, load: Callable[[float], Point | None], seconds: float
) -> str:
    """py-spy samples the server while `load` runs; returns a markdown table of the
    functions with the largest share of samples (inclusive and own)."""
    py_spy = Path(sys.executable).parent / "py-spy"
    out = server.log.parent / f"profile-{label.replace(' ', '-')}.txt"
    sampler = subprocess.Popen(
        [
            str(py_spy),
            "record",
            "--pid",
            str(server.process.pid),
            "--format",
            "raw",
            "--rate",
            "200",
            "--duration",
            f"{seconds:g}",
            "--nonblocking",
            "--output",
            str(out),
        ],  # fmt: skip
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    point = load(seconds - 1)
    sampler.wait(timeout=60)
    if point is None:
        return f"{label}: no load client\n"
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in out.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        count = int(count_text)
        frames = [frame.split(" (")[0] + _where(frame) for frame in stack.split(";")[1:]]
        if not frames:
            continue
        total += count
        for frame in set(frames):
            inclusive[frame] += count
        own[frames[-1]] += count
    lines = [
        f"{label}: {point.rps:.0f} req/s, p50 {point.p50_ms:.1f} ms, p99 {point.p99_ms:.1f} ms "
        f"while sampled; {total} samples of busy threads (a thread waiting for the GIL counts "
        "as busy)",
        "",
        "| function (file) | inclusive | own |",
        "|---|---:|---:|",
    ]
    for frame, count in inclusive.most_common(45):
        share = f"{100 * count / total:.1f} % | {100 * own[frame] / total:.1f} %"
        lines.append(f"| {frame} | {share} |")
    lines += ["", "Most own time:", "", "| function (file) | own |", "|---|---:|"]
    for frame, count in own.most_common(20):
        lines.append(f"| {frame} | {100 * count / total:.1f} % |")
    return "\n".join(lines) + "\n"


def _where(frame: str) -> str:
    """'fn (path/to/file.py:12)' -> ' (file.py)'."""
    if " (" not in frame:
        return ""
    location = frame.split(" (", 1)[1].rstrip(")")
    path = location.rsplit(":", 1)[0]
    parts = Path(path).parts
    short = "/".join(parts[-2:]) if len(parts) > 1 else path
    return f" ({short})"


# -- one server's points ----------------------------------------------------------------------
@dataclass
class Measured:
    ready: list[float] = field(default_factory=list)
    first: list[float] = field(default_factory=list)
    mismatches: list[tuple[int, int]] = field(default_factory=list)
    points: dict[str, list[Point]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class Load:
    wrk: str
    ghz: Path | None
    protoset: Path
    body_file: Path
    grpc_file: Path

    def rest(self, server: Server, concurrency: int, seconds: float) -> Point:
        return run_wrk(self.wrk, server, self.body_file, concurrency, seconds)

    def grpc(self, server: Server, concurrency: int, seconds: float) -> Point | None:
        if self.ghz is None:
            return None
        return run_ghz(self.ghz, server, self.protoset, self.grpc_file, concurrency, seconds)


def measure(
    server: Server,
    measured: Measured,
    load: Load,
    rows: list[dict[str, Any]],
    types: dict[str, Any],
    expected: list[float],
    seconds: float,
    wanted: tuple[str, ...] = POINTS,
) -> None:
    """Cold-path numbers, the prediction check, a warm-up, then the `wanted` points."""
    measured.ready.append(server.ready_seconds)
    measured.first.append(server.first_request_seconds)
    measured.mismatches.append(check_predictions(server, rows, types, expected))
    points: list[tuple[str, Callable[[], Point | None]]] = [
        ("rest c1", lambda: load.rest(server, 1, seconds)),
        ("rest c16", lambda: load.rest(server, 16, seconds)),
        ("grpc c16", lambda: load.grpc(server, 16, seconds)),
    ]
    chosen = [(name, run) for name, run in points if name in wanted]
    if any(name.startswith("rest") for name, _ in chosen):
        load.rest(server, 16, WARM_UP_SECONDS)
    else:
        load.grpc(server, 16, WARM_UP_SECONDS)
    mlkube = server.label.startswith("mlkube")
    for name, run in chosen:
        before = batch_counts(server) if mlkube else (0.0, 0.0)
        point = run()
        if point is None:
            continue
        measured.points.setdefault(name, []).append(point)
        batches = ""
        if mlkube:
            after = batch_counts(server)
            predicts = after[1] - before[1]
            if predicts:
                batches = f", {(after[0] - before[0]) / predicts:.1f} requests a predict"
        say(
            f"  {name}: {point.rps:.0f} req/s, p50 {point.p50_ms:.2f} ms, "
            f"p99 {point.p99_ms:.2f} ms, errors {point.errors}, load {point.load:.1f}{batches}"
        )
    if server.label.startswith("mlkube"):
        measured.notes = batching_verdicts(server.log)


def profile_points(
    server: Server, variant: str, load: Load, seconds: float, wanted: tuple[str, ...] = POINTS
) -> list[str]:
    found = []
    for label, run in (
        ("REST c1", lambda s: load.rest(server, 1, s)),
        ("REST c16", lambda s: load.rest(server, 16, s)),
        ("gRPC c16", lambda s: load.grpc(server, 16, s)),
    ):
        if label.lower() not in wanted or (label.startswith("gRPC") and load.ghz is None):
            continue
        say(f"  py-spy during {label}")
        found.append(f"## {variant}, {label}\n\n" + profile(server, label, run, seconds))
    return found


def reload_after_eviction(
    chosen: list[Peer], model_dir: Path, env: dict[str, str], work: Path, body: bytes
) -> tuple[float, float]:
    """(request, load alone) seconds of the first request after a TTL eviction (1 s TTL)."""
    (mlkube,) = [p for p in chosen if p.label == "mlkube predictor"]

    def short_ttl(registered: str, directory: Path, http: int, grpc: int) -> list[str]:
        command = mlkube.command(registered, directory, http, grpc)
        return command[: command.index("--ttl-seconds")] + ["--ttl-seconds", "1"]

    say("mlkube predictor: first request after a TTL eviction")
    server = start(
        Peer("mlkube ttl", short_ttl), "without input example", model_dir, env, work, body
    )
    try:
        reloads, loads = [], []
        for _ in range(3):
            evictions = metric(server, "mlkube_model_cache_evictions_total")
            deadline = time.monotonic() + 30
            while metric(server, "mlkube_model_cache_evictions_total") <= evictions:
                if time.monotonic() > deadline:
                    raise RuntimeError("the model was not evicted within 30 s")
                time.sleep(0.2)
            before = metric(server, "mlkube_model_load_seconds_sum")
            started = time.perf_counter()
            post(server, body)
            reloads.append(time.perf_counter() - started)
            loads.append(metric(server, "mlkube_model_load_seconds_sum") - before)
        return statistics.median(reloads), statistics.median(loads)
    finally:
        stop(server)


def batch_counts(server: Server) -> tuple[float, float]:
    """(requests, predict calls) the mlkube predictor's batcher has seen."""
    return (
        metric(server, "mlkube_batch_requests_sum"),
        metric(server, "mlkube_batch_requests_count"),
    )


def metric(server: Server, name: str) -> float:
    """The sum of a Prometheus metric's samples on the server's /metrics."""
    with urllib.request.urlopen(server.base + "/metrics", timeout=10) as answer:
        lines = answer.read().decode().splitlines()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in lines
        if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " ")
    )


# -- main -----------------------------------------------------------------------------------
def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def batching_verdicts(log: Path) -> list[str]:
    return [
        line.split(" INFO ", 1)[-1]
        for line in log.read_text(errors="replace").splitlines()
        if "micro-batching" in line
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per point")
    parser.add_argument("--repeats", type=int, default=2, help="rounds over every point")
    parser.add_argument(
        "--only",
        action="append",
        help="run only the peers whose label contains this (repeat for several)",
    )
    parser.add_argument(
        "--points",
        type=lambda text: tuple(part.strip() for part in text.split(",")),
        default=POINTS,
        help=f"comma-separated subset of: {', '.join(POINTS)} (all by default)",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        help="also run the predictor of another mlkube checkout (a directory holding "
        "mlkube/), as peer 'mlkube baseline', side by side with this one",
    )
    parser.add_argument("--variant", choices=list(VARIANTS), help="run one model variant")
    parser.add_argument("--no-grpc", dest="grpc", action="store_false")
    parser.add_argument("--profile", action="store_true", help="py-spy the mlkube predictor")
    parser.add_argument("--write", action="store_true", help="save RESULTS.md (and PROFILE.md)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    args = parser.parse_args()

    wrk = ensure_wrk()
    ghz = ensure_ghz() if args.grpc else None
    mlserver = ensure_mlserver()
    work = Path(tempfile.mkdtemp(prefix="mlkube-bench-"))
    tracking_uri = f"sqlite:///{work / 'mlflow.db'}"
    env = {
        **os.environ,
        **QUIET,
        "MLFLOW_TRACKING_URI": tracking_uri,
        "MLKUBE_HOME": str(work / "home"),
        "TMPDIR": str(work / "tmp"),
        # One OpenMP thread for every server, as mlkube's predictor sets by default: on a
        # busy 2-core machine, thread teams make HistGradientBoosting stall for 100+ ms.
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }
    (work / "tmp").mkdir()
    os.environ.update(QUIET)
    results: dict[tuple[str, str], Measured] = {}
    profiles: list[str] = []
    reload_seconds: tuple[float, float] | None = None
    try:
        say("training and logging the model (11 numeric columns), with and without an example")
        model_dirs = log_variants(tracking_uri, work / "models")
        import mlflow.pyfunc

        features, _ = insurance_table()
        expected = [
            float(v) for v in mlflow.pyfunc.load_model(str(model_dirs["with input example"]))
            .predict(features.head(CHECK_ROWS))
        ]  # fmt: skip
        types = column_types(features)
        rows = rows_of(features, CHECK_ROWS)
        body = json.dumps(rest_body(rows[1], types)).encode()
        body_file = work / "body.json"
        body_file.write_bytes(body)
        grpc_file = work / "grpc.json"
        grpc_file.write_text(json.dumps(grpc_body(rows[1], types)))
        protoset = write_protoset(work / "inference.protoset")
        load = Load(wrk, ghz, protoset, body_file, grpc_file)
        chosen = [
            p
            for p in peers(sys.executable, mlserver, args.baseline)
            if not args.only or any(part in p.label for part in args.only)
        ]
        variants = [args.variant] if args.variant else list(VARIANTS)
        for repeat in range(args.repeats):
            for variant in variants:
                shift = repeat % len(chosen)
                for peer in chosen[shift:] + chosen[:shift]:
                    measured = results.setdefault((variant, peer.label), Measured())
                    say(f"round {repeat + 1}/{args.repeats}, {variant}: {peer.label}")
                    server = start(peer, variant, model_dirs[variant], env, work, body)
                    try:
                        measure(
                            server,
                            measured,
                            load,
                            rows,
                            types,
                            expected,
                            args.duration,
                            args.points,
                        )
                        if args.profile and peer.label == "mlkube predictor" and repeat == 0:
                            profiles += profile_points(
                                server, variant, load, args.duration, args.points
                            )
                    finally:
                        stop(server)
        if "mlkube predictor" in [p.label for p in chosen] and args.points == POINTS:
            reload_seconds = reload_after_eviction(
                chosen, model_dirs["without input example"], env, work, body
            )
    finally:
        if args.keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    loads = [load_average()] + [
        p.load for m in results.values() for points in m.points.values() for p in points
    ]
    report = render(results, loads, reload_seconds, args)
    print(report)
    if profiles and not args.write:
        print("\n".join(profiles))
    if args.write:
        (HERE / "RESULTS.md").write_text(report)
        say(f"wrote {HERE / 'RESULTS.md'}")
        if profiles:
            (HERE / "PROFILE.md").write_text(
                "# Where the mlkube predictor's time goes under load (py-spy, 200 Hz)\n\n"
                f"{datetime.date.today().isoformat()} on {machine()}.\n\n" + "\n".join(profiles)
            )
    return 0


def _median(points: list[Point], what: str) -> float:
    return statistics.median(getattr(p, what) for p in points)


def render(
    results: dict[tuple[str, str], Measured],
    loads: list[float],
    reload_seconds: tuple[float, float] | None,
    args: argparse.Namespace,
) -> str:
    lines = [
        "# Serving benchmark",
        "",
        f"{datetime.date.today().isoformat()} on {machine()} "
        f"(`python benchmarks/serving/run.py {' '.join(sys.argv[1:])}`). "
        "HistGradientBoostingRegressor on 11 numeric columns, one "
        "row a request, Open Inference Protocol v2; wrk (1 thread) for REST, ghz (1 CPU, 1 "
        "connection) for gRPC; each server alone on 127.0.0.1; OMP_NUM_THREADS=1; median of "
        f"{args.repeats} rounds of {args.duration:g} s a point.",
        "",
        f"Load average (1 min) during the points: {min(loads):.1f} to {max(loads):.1f}, "
        f"median {statistics.median(loads):.1f}; the machine is shared.",
    ]
    for variant in VARIANTS:
        rows = [(label, m) for (v, label), m in results.items() if v == variant]
        if not rows:
            continue
        bare = dict(rows).get("bare kserve.Model")
        batching = dict(rows).get("MLServer, adaptive batching (16 rows, 5 ms)")

        def ratio(m: Measured, key: str, what: str, base: Measured | None) -> str:
            if base is None or key not in base.points or key not in m.points:
                return ""
            return f" ({_median(m.points[key], what) / _median(base.points[key], what):.2f}x)"

        lines += [
            "",
            f"## Model logged {variant}",
            "",
            "| server | c1 p50 ms | c1 p99 ms | c16 req/s | c16 p99 ms | gRPC c16 req/s "
            "| gRPC c16 p99 ms | start to ready s | first request s | predictions equal |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for label, m in rows:
            c1, c16, grpc = (m.points.get(k, []) for k in ("rest c1", "rest c16", "grpc c16"))
            cells = [
                f"{_median(c1, 'p50_ms'):.2f}{ratio(m, 'rest c1', 'p50_ms', bare)}" if c1 else "",
                f"{_median(c1, 'p99_ms'):.2f}" if c1 else "",
                f"{_median(c16, 'rps'):.0f}{ratio(m, 'rest c16', 'rps', batching)}" if c16 else "",
                f"{_median(c16, 'p99_ms'):.1f}{ratio(m, 'rest c16', 'p99_ms', bare)}"
                if c16
                else "",
                f"{_median(grpc, 'rps'):.0f}{ratio(m, 'grpc c16', 'rps', batching)}"
                if grpc
                else "",
                f"{_median(grpc, 'p99_ms'):.1f}" if grpc else "",
                f"{statistics.median(m.ready):.2f}",
                f"{statistics.median(m.first):.3f} (max {max(m.first):.3f})",
                "all "
                + ("equal" if not any(a or b for a, b in m.mismatches) else f"NOT {m.mismatches}")
                + f" ({CHECK_ROWS} rows x REST, gRPC x {len(m.mismatches)})",
            ]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        errors = {
            label: sum(p.errors for ps in m.points.values() for p in ps)
            for label, m in rows
            if any(p.errors for ps in m.points.values() for p in ps)
        }
        lines += [
            "",
            "Ratios: c1 p50 and c16 p99 against the bare kserve.Model, req/s against MLServer's "
            "adaptive batching. Errors: " + (json.dumps(errors) if errors else "none") + ".",
        ]
        notes = [note for label, m in rows for note in m.notes]
        if notes:
            lines += ["", "mlkube's log: " + "; ".join(sorted(set(notes))) + "."]
        lines += ["", "Every round:", "", "| server | point | req/s | p50 ms | p99 ms | load |"]
        lines.append("|---|---|---|---|---|---|")
        for label, m in rows:
            for key, points in m.points.items():
                lines.append(
                    f"| {label} | {key} | "
                    + " | ".join(
                        " / ".join(f"{getattr(p, what):{fmt}}" for p in points)
                        for what, fmt in (
                            ("rps", ".0f"),
                            ("p50_ms", ".2f"),
                            ("p99_ms", ".1f"),
                            ("load", ".1f"),
                        )
                    )
                    + " |"
                )
    lines += [
        "",
        "Start to ready: from the process's start until `/v2/health/ready` answers 200. First "
        "request: the first inference after that. The bare server and MLServer load the model "
        "before they are ready; mlkube's predictor is ready once the files are on disk and "
        "loaded once in a trial load, and loads the model into memory on the first request.",
    ]
    if reload_seconds:
        lines += [
            "",
            "mlkube predictor, first request after a TTL eviction (model without an input "
            f"example, 1 s TTL, median of 3): {reload_seconds[0]:.3f} s, of which loading "
            f"{reload_seconds[1]:.3f} s.",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
