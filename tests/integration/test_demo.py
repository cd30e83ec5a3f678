"""`make demo`, run the way the README says, with a smaller search: what it prints, and that
the local mode it runs (Prefect's temporary API, Ray, the predictor) leaves no process."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.processes import survivors, watch_descendants

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration


def test_make_demo_trains_serves_predicts_and_leaves_no_process(tmp_path: Path) -> None:
    venv = Path(sys.executable).parent.parent
    # A user's shell: no session Ray or Prefect API of the test run, a store of its own.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "RAY_"))}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(MLKUBE_HOME=str(tmp_path / "mlkube"), PREFECT_HOME=str(tmp_path / "prefect"))
    # Files, not pipes: nothing reads a pipe while the processes are watched.
    out_file, err_file = tmp_path / "stdout", tmp_path / "stderr"
    with out_file.open("w") as stdout, err_file.open("w") as stderr:
        child = subprocess.Popen(
            ["make", "-s", "demo", "DEMO_TRIALS=2", f"VENV={venv}"],
            cwd=REPO,
            env=env,
            stdout=stdout,
            stderr=stderr,
            text=True,
        )
    seen = watch_descendants(child, timeout=600)
    out, err = out_file.read_text(), err_file.read_text()
    assert child.returncode == 0, out[-3000:] + err[-3000:]
    assert "1/3 training insurance" in out and "(2 trials)" in out
    assert "2 trials, best first" in out
    assert "yes: @champion -> v1" in out
    assert "2/3 serving models:/insurance@champion" in out
    predictions = re.findall(r"^  \{.*\} -> ([\d,]+)  \(actual ([\d,]+)\)$", out, re.MULTILINE)
    assert len(predictions) == 3, out
    for predicted, actual in predictions:
        # Medical costs: a trained model is within a factor of ten of the truth.
        assert 0.1 < int(predicted.replace(",", "")) / int(actual.replace(",", "")) < 10
    assert "curl -s -H 'content-type: application/json'" in out
    assert "Traceback" not in err
    # What local mode started in the background, and the predictor, are all gone.
    commands = " ".join(line for lines in seen.values() for line in lines)
    assert "prefect.server.api.server:create_app" in commands
    assert "raylet" in commands and "gcs_server" in commands
    assert "mlkube.model_servers" in commands
    assert not survivors(sorted(seen)), "processes left after make demo"
