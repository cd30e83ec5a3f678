"""The retrain flow's report: a Prefect markdown artifact a person reads in the UI."""

from __future__ import annotations

import datetime as dt
import re

from mlkube.flows.retrain_models import RetrainOutcome


def _when(value: dt.datetime | None) -> str:
    return f"{value:%Y-%m-%d %H:%M}" if value else "-"


def markdown_report(outcome: RetrainOutcome, model_name: str) -> str:
    record, decision, training = outcome.ingest, outcome.decision, outcome.training
    if training is None:
        headline = f"**Training skipped**: {decision.reason}."
    elif training.phase == "Succeeded":
        promoted = "**promoted**" if training.promoted else "**not promoted**"
        headline = (
            f"**Trained** `{training.model_name}` version **{training.model_version}**, "
            f"{promoted}: {training.promotion_reason}."
        )
    else:
        headline = f"**Training {training.phase}**: {training.message or 'no message'}."
    lines = [
        f"# Retrain `{model_name}`",
        "",
        headline,
        "",
        "## Ingest",
        "",
        "| dataset | source | hours before | fetched | added | first added | last added | "
        "hours after |",
        "| --- | --- | ---: | ---: | ---: | --- | --- | ---: |",
        f"| `{record.dataset_uri}` | {record.source} | {record.rows_before} | "
        f"{record.rows_fetched} | {record.rows_added} | {_when(record.first_added)} | "
        f"{_when(record.last_added)} | {record.rows_after} |",
    ]
    if record.note:
        lines += ["", f"Not added: {record.note}."]
    lines += ["", "## Checks", ""]
    if outcome.checks.results:
        lines += ["| check | result | detail |", "| --- | --- | --- |"]
        for check in outcome.checks.results:
            verdict = "skipped" if check.skipped else ("pass" if check.passed else "**fail**")
            lines.append(f"| {check.name} | {verdict} | {check.detail} |")
    else:
        lines.append("Nothing new to check.")
    lines += ["", "## Training", "", f"TrainDecision: {'train' if decision.train else 'skip'} "
              f"({decision.reason})."]  # fmt: skip
    if training is not None:
        best = f"{training.metric}={training.best_value:.4g}" if training.best_value else "-"
        where = f"{training.namespace}/" if training.namespace else ""
        lines += [
            "",
            "| TrainingRun | phase | version | promoted | why | best |",
            "| --- | --- | ---: | --- | --- | --- |",
            f"| `{where}{training.trainingrun}` | {training.phase} | "
            f"{training.model_version or '-'} | {training.promoted} | "
            f"{training.promotion_reason or training.message or '-'} | {best} |",
        ]
    return "\n".join(lines) + "\n"


def artifact_key(model_name: str) -> str:
    """Artifact keys take lowercase letters, digits and dashes."""
    return "retrain-" + (re.sub(r"[^a-z0-9-]+", "-", model_name.lower()).strip("-") or "model")
