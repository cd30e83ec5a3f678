"""Serving benchmark: mlflow models serve vs a bare kserve.Model vs mlkube's predictor.

    python benchmarks/serving/run.py [--duration 10] [--write]

Everything runs on loopback in a temporary folder: a local MLflow (sqlite), an insurance
model (HistGradientBoosting pipeline), the three servers, and a keep-alive HTTP/1.1 load
client (asyncio streams, light enough to share the 2 cores) at concurrency 1 and 16 with
1-row requests, the servers taking turns in short rounds. mlkube serves the pinned version,
as the operator deploys it (`models:/bench/1`). Also measured: mlkube's first request after
start, and its reload after TTL eviction against an in-process load from a local directory.
Prints a markdown table; --write also saves it to benchmarks/serving/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from mlkube.local import free_port

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
INSURANCE = REPO.parent / "shared" / "data" / "insurance.csv"
QUIET = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}
ROW = {"age": 45, "sex": "male", "bmi": 31.12, "children": 2, "smoker": "no", "region": "northeast"}


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- the model ------------------------------------------------------------------------------
def train_and_register(tracking_uri: str, out: Path) -> Path:
    """Registers `bench` (alias champion) and returns a local copy of its artifacts."""
    import mlflow
    import pandas as pd
    from sklearn.compose import make_column_transformer
    from sklearn.ensemble import HistGradientBoostingRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder

    mlflow.set_tracking_uri(tracking_uri)
    frame = pd.read_csv(INSURANCE)
    target = "charges" if "charges" in frame else "expenses"
    features = frame.drop(columns=target)
    pipeline = make_pipeline(
        make_column_transformer(
            (OneHotEncoder(handle_unknown="ignore"), ["sex", "smoker", "region"]),
            remainder="passthrough",
        ),
        HistGradientBoostingRegressor(random_state=0),
    ).fit(features, frame[target])
    with mlflow.start_run():
        mlflow.sklearn.log_model(
            pipeline,
            name="model",
            input_example=features.head(3),
            pip_requirements=["scikit-learn", "skops"],
            registered_model_name="bench",
            skops_trusted_types=[
                "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor"
            ],
        )
    mlflow.MlflowClient().set_registered_model_alias("bench", "champion", "1")
    return Path(mlflow.artifacts.download_artifacts("models:/bench/1", dst_path=str(out)))


# -- servers --------------------------------------------------------------------------------
@dataclass
class Server:
    name: str
    url: str  # the predict endpoint
    body: bytes
    process: subprocess.Popen[bytes]
    base: str


def start(
    name: str,
    command: list[str],
    env: dict[str, str],
    port: int,
    path: str,
    body: Mapping[str, object],
    health: str,
    log: Path,
) -> Server:
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(base + health, timeout=2) as answer:
                if answer.status == 200:
                    break
        except OSError:
            time.sleep(0.2)
    else:
        raise RuntimeError(f"{name} not up: {log.read_text()[-2000:]}")
    return Server(name, path, json.dumps(body).encode(), process, base)


def stop(server: Server) -> None:
    if server.process.poll() is None:
        os.killpg(server.process.pid, signal.SIGTERM)
        try:
            server.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait()


# -- the load client ------------------------------------------------------------------------
async def _worker(
    path: str, body: bytes, port: int, stop_at: float, latencies: list[float], errors: list[int]
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    try:
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - started)
            if not head.startswith(b"HTTP/1.1 200"):
                errors.append(1)
    finally:
        writer.close()


def drive(server: Server, concurrency: int, seconds: float) -> tuple[list[float], int, float]:
    """(latencies, errors, elapsed) of `concurrency` keep-alive clients for `seconds`."""
    port = int(server.base.rsplit(":", 1)[1])

    async def run() -> tuple[list[float], int, float]:
        latencies: list[float] = []
        errors: list[int] = []
        started = time.perf_counter()
        stop_at = started + seconds
        await asyncio.gather(
            *(
                _worker(server.url, server.body, port, stop_at, latencies, errors)
                for _ in range(concurrency)
            )
        )
        return latencies, len(errors), time.perf_counter() - started

    return asyncio.run(run())


def summarize(runs: list[tuple[list[float], int, float]]) -> dict[str, float]:
    latencies = sorted(value for run in runs for value in run[0])
    return {
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[max(int(len(latencies) * 0.99) - 1, 0)] * 1000,
        "rps": len(latencies) / sum(run[2] for run in runs),
        "errors": float(sum(run[1] for run in runs)),
    }


# -- mlkube's cold paths ---------------------------------------------------------------------
def post(url: str, body: Mapping[str, object]) -> float:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"content-type": "application/json"}
    )
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=120) as answer:
        answer.read()
    return time.perf_counter() - started


def metric(base: str, name: str) -> float:
    with urllib.request.urlopen(base + "/metrics", timeout=10) as answer:
        for line in answer.read().decode().splitlines():
            if line.startswith(name):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def in_process_load_seconds(model_dir: Path, times: int = 5) -> float:
    import mlflow.pyfunc

    mlflow.pyfunc.load_model(str(model_dir))  # imports and MLflow's first-time work
    samples = []
    for _ in range(times):
        started = time.perf_counter()
        mlflow.pyfunc.load_model(str(model_dir))
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--duration", type=float, default=15.0, help="seconds per server and concurrency"
    )
    parser.add_argument("--rounds", type=int, default=5, help="turns the duration is cut into")
    parser.add_argument("--write", action="store_true", help="save RESULTS.md")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mlkube-bench-"))
    tracking_uri = f"sqlite:///{work / 'mlflow.db'}"
    env = {
        **os.environ,
        **QUIET,
        "MLFLOW_TRACKING_URI": tracking_uri,
        "MLKUBE_HOME": str(work / "home"),
        "TMPDIR": str(work / "tmp"),
    }
    # One OpenMP/BLAS thread for every server, as mlkube's predictor sets by default: on a
    # busy 2-core machine, thread teams make HistGradientBoosting stall for 100+ ms.
    env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "1")
    # `mlflow models serve` execs `uvicorn` by name: the venv's bin must be on PATH
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    (work / "tmp").mkdir()
    os.environ.update(QUIET)
    rows: list[tuple[str, int, dict[str, float]]] = []
    cold: dict[str, float] = {}
    load_before = os.getloadavg()[0]
    try:
        say("training and registering the insurance model")
        model_dir = train_and_register(tracking_uri, work / "model")
        v1_body = {"instances": [ROW]}
        python = sys.executable
        mlkube_port = free_port()

        def predictor_argv(http_port: int, ttl_seconds: str) -> list[str]:
            """The mlkube predictor's command line (a fresh gRPC port each call)."""
            return [
                python,
                "-m",
                "mlkube.model_servers",
                "--model-uri",
                "models:/bench/1",
                "--host",
                "127.0.0.1",
                "--http_port",
                str(http_port),
                "--grpc_port",
                str(free_port()),
                "--ttl-seconds",
                ttl_seconds,
            ]

        servers: list[tuple[str, Callable[[], Server]]] = [
            (
                "mlflow models serve",
                lambda: start(
                    "mlflow models serve",
                    [
                        python,
                        "-m",
                        "mlflow",
                        "models",
                        "serve",
                        "-m",
                        str(model_dir),
                        "--env-manager",
                        "local",
                        "-h",
                        "127.0.0.1",
                        "-p",
                        str(port := free_port()),
                        "-w",
                        "1",
                    ],
                    env,
                    port,
                    "/invocations",
                    {"dataframe_records": [ROW]},
                    "/ping",
                    work / "mlflow-serve.log",
                ),
            ),
            (
                "bare kserve.Model",
                lambda: start(
                    "bare kserve.Model",
                    [
                        python,
                        str(HERE / "bare_server.py"),
                        str(model_dir),
                        str(port := free_port()),
                        str(free_port()),
                    ],
                    env,
                    port,
                    "/v1/models/bench:predict",
                    v1_body,
                    "/",
                    work / "bare.log",
                ),
            ),
            (
                "mlkube predictor",
                lambda: start(
                    "mlkube predictor",
                    predictor_argv(mlkube_port, "600"),
                    env,
                    mlkube_port,
                    "/v1/models/bench:predict",
                    v1_body,
                    "/",
                    work / "mlkube.log",
                ),
            ),
        ]
        # All three run at once (idle servers cost nothing) and take turns in short rounds,
        # so that load from elsewhere on a shared machine falls on all of them alike.
        running: list[tuple[str, Server]] = []
        try:
            for label, launch in servers:
                say(f"starting {label}")
                running.append((label, launch()))
                if label == "mlkube predictor":
                    server = running[-1][1]
                    cold["first request after start (s)"] = post(server.base + server.url, v1_body)
            runs: dict[tuple[str, int], list[tuple[list[float], int, float]]] = {}
            slice_seconds = args.duration / args.rounds
            for _, server in running:  # warm-up
                drive(server, 16, 1.0)
            for round_number in range(args.rounds):
                say(f"round {round_number + 1}/{args.rounds}")
                for concurrency in (1, 16):
                    for label, server in running:
                        run = drive(server, concurrency, slice_seconds)
                        runs.setdefault((label, concurrency), []).append(run)
            for (label, concurrency), measured in runs.items():
                result = summarize(measured)
                say(
                    f"{label} c={concurrency}: p50 {result['p50_ms']:.2f} ms, "
                    f"{result['rps']:.0f} req/s"
                )
                rows.append((label, concurrency, result))
        finally:
            for _, server in running:
                stop(server)

        say("mlkube predictor: reload after TTL eviction vs in-process load")
        ttl_port = free_port()
        server = start(
            "mlkube ttl",
            predictor_argv(ttl_port, "1"),
            env,
            ttl_port,
            "/v1/models/bench:predict",
            v1_body,
            "/",
            work / "mlkube-ttl.log",
        )
        try:
            url = server.base + server.url
            post(url, v1_body)
            load_sum = metric(server.base, "mlkube_model_load_seconds_sum")
            load_count = metric(server.base, "mlkube_model_load_seconds_count")
            reloads = []
            for _ in range(3):
                evictions = metric(server.base, "mlkube_model_cache_evictions_total")
                while metric(server.base, "mlkube_model_cache_evictions_total") <= evictions:
                    time.sleep(0.3)
                reloads.append(post(url, v1_body))
            cold["reload after eviction, request (s)"] = statistics.median(reloads)
            cold["reload after eviction, load only (s)"] = (
                metric(server.base, "mlkube_model_load_seconds_sum") - load_sum
            ) / max(metric(server.base, "mlkube_model_load_seconds_count") - load_count, 1)
        finally:
            stop(server)
        cold["in-process load from a local directory (s)"] = in_process_load_seconds(model_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    report = render(rows, cold, (load_before, os.getloadavg()[0]))
    print(report)
    if args.write:
        (HERE / "RESULTS.md").write_text(report)
        say(f"wrote {HERE / 'RESULTS.md'}")
    return 0


def render(
    rows: list[tuple[str, int, dict[str, float]]],
    cold: dict[str, float],
    load: tuple[float, float],
) -> str:
    bare = {c: r for name, c, r in rows if name == "bare kserve.Model"}
    lines = [
        "# Serving benchmark",
        "",
        f"{datetime.date.today().isoformat()} on {machine()}; insurance model "
        "(HistGradientBoosting pipeline), 1-row v1 requests over keep-alive HTTP/1.1, "
        "client and server on the same machine, OMP_NUM_THREADS=1 for all servers "
        "(`python benchmarks/serving/run.py`).",
        "",
        f"Load average (1 min) {load[0]:.1f} at the start, {load[1]:.1f} at the end: on a shared "
        "machine other work competes with both client and servers, so compare the ratios.",
        "",
        "| server | concurrency | p50 ms | p99 ms | req/s | req/s vs bare | p50 vs bare | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, concurrency, r in rows:
        base = bare.get(concurrency)
        rps_ratio = f"{r['rps'] / base['rps']:.2f}x" if base else ""
        p50_ratio = f"{r['p50_ms'] / base['p50_ms']:.2f}x" if base else ""
        lines.append(
            f"| {name} | {concurrency} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['rps']:.0f} "
            f"| {rps_ratio} | {p50_ratio} | {int(r['errors'])} |"
        )
    lines += ["", "| mlkube cold path | seconds |", "|---|---:|"]
    lines += [f"| {name} | {value:.3f} |" for name, value in cold.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
