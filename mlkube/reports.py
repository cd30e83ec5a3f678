"""What people would rather look at than read: tables of trials and outcomes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from mlkube.flows.train import TrainResult


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def print_train_result(result: TrainResult, console: Console | None = None) -> None:
    from rich.console import Console

    console = console or Console()
    console.print(trials_table(result, console.width))
    from rich.table import Table

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


def trials_table(result: TrainResult, width: int) -> Table:
    """One column per parameter when that fits in `width`; otherwise the parameters go in
    one column as name=value, wrapped, so that no name is ever cut short."""
    from rich.table import Table

    ordered = sorted(
        result.trials,
        key=lambda t: (t.value is None, (t.value or 0) * (1 if result.mode == "min" else -1)),
    )
    param_names = list(result.best_params)
    metric_header = f"{result.metric} (search)"
    cells = [[_fmt(t.params.get(n, "")) for n in param_names] for t in ordered]
    widths = [max([len(n), *(len(row[i]) for row in cells)]) for i, n in enumerate(param_names)]
    # Each column costs its text and 3 characters of border and padding.
    wide = sum(w + 3 for w in widths) + len("trial") + len(metric_header) + len("reports") + 10
    table = Table(title=f"{result.trainingrun}: {len(result.trials)} trials, best first")
    table.add_column("trial", justify="right")
    if wide <= width:
        for name in param_names:
            table.add_column(name, justify="right")
    table.add_column(metric_header, justify="right")
    table.add_column("reports", justify="right")
    if wide > width:
        table.add_column("parameters", overflow="fold")
    for trial, row in zip(ordered, cells, strict=True):
        outcome = [trial.error or _fmt(trial.value), str(trial.epochs)]
        if wide <= width:
            table.add_row(str(trial.number), *row, *outcome)
        else:
            pairs = "  ".join(f"{n}={v}" for n, v in zip(param_names, row, strict=True))
            table.add_row(str(trial.number), *outcome, pairs)
    return table
