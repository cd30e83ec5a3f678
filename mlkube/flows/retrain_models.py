"""The retrain flow's parameters and results: what `mlkube retrain -f` reads and a
deployment stores, what each step hands to the next, and what the flow returns. No Prefect
here, so that reading a config is cheap."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, model_validator

from mlkube.api import CommandFailed, TrainingRun, load_manifest, parse_resource
from mlkube.api.common import CamelModel
from mlkube.flows.checks import CheckReport, CheckSettings
from mlkube.flows.ingest import DatasetSettings, IngestRecord
from mlkube.flows.sources import AnySource


def template_manifest(run: TrainingRun) -> dict[str, Any]:
    """The TrainingRun as a manifest to create again: labels and annotations kept, no uid or
    generation (compare operator/rayjob.py's handed_over: what the train flow receives)."""
    meta = run.metadata.model_dump(exclude_none=True)
    meta = {k: v for k, v in meta.items() if v not in ({}, None) and k not in ("uid", "generation")}
    return {
        "apiVersion": run.api_version,
        "kind": run.kind,
        "metadata": meta,
        "spec": run.spec.to_k8s(),
    }


class RetrainFailed(CommandFailed):
    """The TrainingRun failed or did not finish in time; the report says more (exit 1)."""


class ClusterSettings(CamelModel):
    namespace: str | None = Field(
        default=None, description="Where TrainingRuns go; the kubeconfig's (or pod's) default."
    )
    timeout_seconds: float = Field(default=6 * 3600, gt=0)
    poll_seconds: float = Field(default=5.0, gt=0)


class RetrainConfig(CamelModel):
    """The flow's parameters: what `mlkube retrain -f` reads and a deployment stores."""

    source: AnySource
    dataset: DatasetSettings
    trainingrun_file: str | None = Field(
        default=None, description="TrainingRun YAML used as the template."
    )
    trainingrun: dict[str, Any] | None = Field(
        default=None, description="The template inline (what `mlkube schedule` stores)."
    )
    checks: CheckSettings = Field(default_factory=CheckSettings)
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)
    local: bool = Field(default=False, description="Train in this process, not on the cluster.")
    force: bool = Field(default=False, description="Train even when the checks say skip.")

    @model_validator(mode="after")
    def _one_template(self) -> RetrainConfig:
        if (self.trainingrun_file is None) == (self.trainingrun is None):
            raise ValueError("give exactly one of trainingrunFile, trainingrun")
        return self

    def template(self) -> TrainingRun:
        if self.trainingrun_file is not None:
            return load_manifest(Path(self.trainingrun_file), TrainingRun)
        return parse_resource(self.trainingrun, "trainingrun", TrainingRun)

    def with_inline_template(self) -> RetrainConfig:
        """The same config with the template file read in, so that it runs anywhere."""
        if self.trainingrun is not None:
            return self
        document = template_manifest(self.template())
        return self.model_copy(update={"trainingrun": document, "trainingrun_file": None})


class IngestStep(BaseModel):
    record: IngestRecord
    checks: CheckReport
    unit: str
    # Hours held before this run that no run has trained on (an earlier run committed
    # them and then could not submit its TrainingRun).
    untrained_hours: int = 0
    untrained_first: dt.datetime | None = None
    untrained_last: dt.datetime | None = None

    @property
    def through(self) -> dt.datetime | None:
        """The last hour held after this run."""
        return self.record.last_added or self.record.last_before


class TrainDecision(BaseModel):
    train: bool
    reason: str


class TrainingOutcome(BaseModel):
    trainingrun: str
    namespace: str | None = None
    phase: str
    model_name: str
    model_version: int | None = None
    promoted: bool | None = None
    promotion_reason: str | None = None
    metric: str | None = None
    best_value: float | None = None
    message: str | None = None


class RetrainOutcome(BaseModel):
    flow_run_id: str | None
    ingest: IngestRecord
    checks: CheckReport
    decision: TrainDecision
    training: TrainingOutcome | None = None

    @property
    def trained(self) -> bool:
        return self.training is not None

    def summary(self) -> str:
        added = f"{self.ingest.rows_added} new hours"
        if self.training is None:
            return f"{added}; training skipped: {self.decision.reason}"
        t = self.training
        if t.phase != "Succeeded":
            return f"{added}; TrainingRun {t.trainingrun} {t.phase}: {t.message or ''}".rstrip(": ")
        promoted = "promoted" if t.promoted else "not promoted"
        return (
            f"{added}; TrainingRun {t.trainingrun} Succeeded: {t.model_name} version "
            f"{t.model_version}, {promoted} ({t.promotion_reason})"
        )
