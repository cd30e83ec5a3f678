"""`mlkube demo`: train -> register -> serve -> predict on this machine, offline."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, cast

from mlkube.api import TrainingRun, UserError, load_manifest
from mlkube.api.registered_model import DEFAULT_ALIAS, model_uri
from mlkube.local import free_port, local_tracking_uri, mlkube_home

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = PACKAGE_ROOT / "examples" / "insurance" / "trainingrun.yaml"
# Tests and the demo read the data beside the checkout, never a copy in the repo.
SHARED_INSURANCE = PACKAGE_ROOT.parent / "shared" / "data" / "insurance.csv"


def wait_ready(url: str, server: subprocess.Popen[bytes], timeout: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise UserError(f"the model server exited with code {server.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise UserError(f"the model server was not ready after {timeout:.0f} s")


def run_demo(args: argparse.Namespace) -> int:
    import httpx
    import pandas as pd

    from mlkube.flows.logs import quiet_console

    quiet_console()
    from mlkube.flows.train import train
    from mlkube.reports import print_train_result

    data = Path(args.dataset) if args.dataset else SHARED_INSURANCE
    if not data.exists():
        raise UserError(f"--dataset: no such file: {data}")
    run = load_manifest(EXAMPLE, TrainingRun)
    run.spec.dataset.uri = str(data)
    run.spec.tuning.num_trials = args.trials
    print(f"1/3 training {run.spec.model.name} on {data} ({args.trials} trials)", flush=True)
    result = train(run)
    print_train_result(result)

    name = run.spec.model.name
    port, grpc_port = free_port(), free_port()
    uri = model_uri(name, alias=DEFAULT_ALIAS)
    print(f"\n2/3 serving {uri} on 127.0.0.1:{port}", flush=True)
    command = [
        sys.executable, "-m", "mlkube.model_servers",
        "--model-name", name, "--model-uri", uri,
        "--host", "127.0.0.1", "--http_port", str(port), "--grpc_port", str(grpc_port),
        "--tracking-uri", local_tracking_uri(), "--ttl-seconds", "300",
    ]  # fmt: skip
    log_path = mlkube_home() / "demo-server.log"
    print(f"    (server log: {log_path})", flush=True)
    with open(log_path, "wb") as log:
        server = subprocess.Popen(command, env=os.environ.copy(), stdout=log, stderr=log)
    try:
        wait_ready(f"http://127.0.0.1:{port}/v1/models/{name}", server)
        rows = pd.read_csv(data).sample(3, random_state=1)
        target = result_target(rows)
        # The CSV's column names: strings.
        records = cast(list[dict[str, Any]], rows.drop(columns=[target]).to_dict(orient="records"))
        started = time.perf_counter()
        answer = httpx.post(
            f"http://127.0.0.1:{port}/v1/models/{name}:predict",
            json={"instances": records},
            timeout=60,
        )
        elapsed = time.perf_counter() - started
        answer.raise_for_status()
        predictions = answer.json()["predictions"]
        print(f"\n3/3 predictions (first request, model loaded on demand: {elapsed:.2f} s)")
        for record, predicted, actual in zip(records, predictions, rows[target], strict=True):
            print(f"  {json.dumps(record)} -> {predicted:,.0f}  (actual {actual:,.0f})")
    finally:
        server.terminate()
        server.wait(timeout=30)
    sample = json.dumps({"instances": records[:1]})
    # `make demo` runs .venv/bin/mlkube, which is not on the user's PATH.
    command_path = Path(sys.argv[0])
    mlkube = os.path.relpath(command_path) if command_path.name == "mlkube" else "mlkube"
    print(
        "\nTry it yourself:\n"
        f"  {mlkube} serve -f examples/insurance/modeldeployment.yaml\n"
        f"  curl -s -H 'content-type: application/json' "
        f"localhost:8080/v1/models/{name}:predict -d '{sample}'"
    )
    return 0


def result_target(rows: Any) -> str:
    from mlkube.training.tasks.tabular import InsuranceTask

    for column in InsuranceTask.default_target:
        if column in rows.columns:
            return column
    raise UserError("--dataset: the insurance table needs a charges or expenses column")
