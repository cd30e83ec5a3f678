"""`make demo`, run the way the README says, with a smaller search."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration


def test_make_demo_trains_serves_and_predicts(tmp_path: Path) -> None:
    venv = Path(sys.executable).parent.parent
    # A user's shell: no session Ray or Prefect API of the test run, a store of its own.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "RAY_"))}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(MLKUBE_HOME=str(tmp_path / "mlkube"), PREFECT_HOME=str(tmp_path / "prefect"))
    done = subprocess.run(
        ["make", "-s", "demo", "DEMO_TRIALS=2", f"VENV={venv}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
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
    assert "Traceback" not in done.stderr
