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
    ],
)
def test_bad_input_is_refused_before_ray_prefect_or_mlflow_load(
    dataset: dict[str, str], expected: str, tmp_path: Path, model_name: str, insurance_csv: Path
) -> None:
    """A missing file or column is found in the parent process, before the slow parts are
    even imported: the error comes in the time it takes to read the spec and a header."""
    bad = document(model_name, dataset={"uri": str(insurance_csv), **dataset})
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
    assert completed.stderr.strip().startswith(expected), completed.stderr
    assert len(completed.stderr.strip().splitlines()) == 1
    assert completed.stdout.strip() == "[]"
