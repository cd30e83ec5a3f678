"""What people would rather look at than read: tables of trials and outcomes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlkube.flows.train import TrainResult


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def print_train_result(result: TrainResult) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    ordered = sorted(
        result.trials,
        key=lambda t: (t.value is None, (t.value or 0) * (1 if result.mode == "min" else -1)),
    )
    param_names = list(result.best_params)
    table = Table(title=f"{result.trainingrun}: {len(result.trials)} trials, best first")
    table.add_column("trial", justify="right")
    for name in param_names:
        table.add_column(name, justify="right")
    table.add_column(f"{result.metric} (search)", justify="right")
    table.add_column("reports", justify="right")
    for trial in ordered:
        table.add_row(
            str(trial.number),
            *(_fmt(trial.params.get(n, "")) for n in param_names),
            trial.error or _fmt(trial.value),
            str(trial.epochs),
        )
    console.print(table)
    outcome = Table(show_header=False, title="outcome")
    outcome.add_row("model", f"{result.model_name} version {result.version}")
    outcome.add_row(
        "promoted",
        f"yes: @{result.alias} -> v{result.version}" if result.promoted else "no (@challenger)",
    )
    outcome.add_row("why", result.reason)
    outcome.add_row("held-out", ", ".join(f"{k}={_fmt(v)}" for k, v in result.holdout.items()))
    outcome.add_row("mlflow run", result.run_id)
    console.print(outcome)
