"""`mlkube train` refuses what it can before Ray, Prefect or MLflow are even imported."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.integration.test_training_errors import document

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("dataset", "expected"),
    [
        (
            {"uri": "/no/such/insurance.csv"},
            "error: dataset.uri: no such file: /no/such/insurance.csv",
        ),
        ({"target": "premium"}, "error: dataset.target: column 'premium' not in"),
        (
            {"task": "tests.fixtures.user_task:diabetes_ridge", "scheduler": "asha"},
            "error: spec.tuning.scheduler: asha stops trials between epochs",
        ),
        ({"algorithm": "annealing"}, "error: spec.tuning.algorithm: Input should be"),
    ],
)
def test_bad_input_is_refused_before_ray_prefect_or_mlflow_load(
    dataset: dict[str, str], expected: str, tmp_path: Path, model_name: str, insurance_csv: Path
) -> None:
    """A missing file or column is found in the parent process, before the slow parts are
    even imported: the error comes in the time it takes to read the spec and a header."""
    dataset = dict(dataset)
    task = dataset.pop("task", "insurance")
    tuning = {k: dataset.pop(k) for k in ("scheduler", "algorithm") if k in dataset}
    bad = document(model_name, dataset={"uri": str(insurance_csv), **dataset}, tuning=tuning)
    bad["spec"]["task"] = task
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    probe = (
        "import sys\n"
        "from mlkube.cli import main\n"
        f"code = main(['train', '-f', {str(path)!r}])\n"
        "print(sorted(m for m in ('ray', 'prefect', 'mlflow', 'sklearn') if m in sys.modules))\n"
        "sys.exit(code)\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 2
    line = completed.stderr.strip()
    # A problem of the file itself names the file first.
    assert line.startswith(expected) or line.startswith(f"error: {path}: {expected[7:]}"), line
    assert len(completed.stderr.strip().splitlines()) == 1
    assert completed.stdout.strip() == "[]"
