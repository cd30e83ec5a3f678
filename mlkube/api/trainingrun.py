"""TrainingRun: a tuning search whose best model is registered and maybe promoted."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from mlkube.api.common import (
    DNS_LABEL_PATTERN,
    DNS_SUBDOMAIN_PATTERN,
    CamelModel,
    Condition,
    MlflowSettings,
    ObjectMeta,
    Resources,
)
from mlkube.api.pods import PodOptions
from mlkube.api.registered_model import ALIAS_PATTERN, DEFAULT_ALIAS, MODEL_NAME_PATTERN

BUILTIN_TASKS = ("tabular", "insurance", "atmos-temperature", "mnist")
# A user's own task: `package.module:function`.
TASK_PATTERN = r"^([a-z][a-z0-9-]*|[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*)$"

TrainingRunPhase = Literal["Pending", "Running", "Succeeded", "Failed"]
# The phases a TrainingRun ends in and never leaves.
TERMINAL_PHASES: frozenset[TrainingRunPhase] = frozenset({"Succeeded", "Failed"})

Bounds = Annotated[list[float], Field(min_length=2, max_length=2)]
IntBounds = Annotated[list[int], Field(min_length=2, max_length=2)]


class ParamDistribution(CamelModel):
    """Exactly one distribution for one hyperparameter, e.g. `{loguniform: [1e-4, 1e-1]}`."""

    model_config = ConfigDict(json_schema_extra={"minProperties": 1, "maxProperties": 1})

    uniform: Bounds | None = None
    loguniform: Bounds | None = None
    randint: IntBounds | None = Field(default=None, description="[low, high), high excluded")
    choice: list[Any] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _exactly_one(self) -> ParamDistribution:
        given = [k for k in ("uniform", "loguniform", "randint", "choice") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError("give exactly one of uniform, loguniform, randint, choice")
        for key in ("uniform", "loguniform", "randint"):
            low_high = getattr(self, key)
            if low_high and not low_high[0] < low_high[1]:
                raise ValueError(f"{key}: low must be below high")
        if self.loguniform and self.loguniform[0] <= 0:
            raise ValueError("loguniform: bounds must be positive")
        return self


class Dataset(CamelModel):
    uri: str | None = Field(
        default=None,
        description="Any URI pandas/fsspec reads; omitted means the task's offline sample.",
    )
    target: str | None = Field(default=None, description="Label column (tabular tasks).")
    problem: Literal["auto", "regression", "classification"] = Field(
        default="auto",
        description=(
            "What the target is. auto: a text or boolean target, or an integer one with few "
            "values, is a classification; anything else a regression."
        ),
    )


class ModelName(CamelModel):
    name: str = Field(pattern=MODEL_NAME_PATTERN, description="MLflow registered model name.")


class TuningStorage(CamelModel):
    """Where Tune keeps a search's state, so that a new attempt resumes it."""

    claim_name: str = Field(
        pattern=DNS_SUBDOMAIN_PATTERN,
        max_length=253,
        description=(
            "A PersistentVolumeClaim in the TrainingRun's namespace, mounted on the Ray head "
            "and workers (ReadWriteMany when there are workers). Without it a search resumes "
            "only while its Ray head lives."
        ),
    )


class Tuning(CamelModel):
    num_trials: int = Field(
        default=8, ge=1, le=10000, description="Trials to run; for grid, the grid's largest size."
    )
    max_concurrent_trials: int = Field(default=2, ge=1, le=1000)
    metric: str | None = Field(default=None, description="Defaults to the task's metric.")
    mode: Literal["min", "max"] | None = Field(default=None, description="Defaults per task.")
    algorithm: Literal["random", "grid", "tpe"] = Field(
        default="random",
        description=(
            "How trials are chosen. random: sampled from searchSpace; grid: every choice and "
            "evenly spaced points of each range, as many as numTrials allows; tpe: Optuna's "
            "Tree-structured Parzen Estimator, learning from finished trials."
        ),
    )
    scheduler: Literal["fifo", "asha", "hyperband"] = Field(
        default="fifo",
        description=(
            "Early stopping. fifo: every trial runs to the end; asha and hyperband stop weak "
            "trials after some epochs (boosting rounds for the tabular tasks)."
        ),
    )
    search_space: dict[str, ParamDistribution] = Field(default_factory=dict)
    timeout_seconds: int | None = Field(default=None, ge=1)
    seed: int = Field(default=0, ge=0, description="Seeds the search and every trial.")
    storage: TuningStorage | None = None


class TrialResources(CamelModel):
    gpu: float = Field(
        default=0,
        ge=0,
        le=64,
        description=(
            "GPUs per trial (Ray's num_gpus; a fraction shares one). On a cluster the pods "
            "that run trials get nvidia.com/gpu limits to match."
        ),
    )


class Promotion(CamelModel):
    alias: str = Field(default=DEFAULT_ALIAS, pattern=ALIAS_PATTERN)
    min_improvement: float = Field(
        default=0.0, ge=0.0, description="Relative improvement needed over the champion."
    )
    enabled: bool = True


class RayClusterChoice(CamelModel):
    """Run on a RayCluster that is already up instead of a new one of the run's own: no pods
    to start before the search, at the price of sharing the cluster. Give exactly one."""

    model_config = ConfigDict(json_schema_extra={"minProperties": 1, "maxProperties": 1})

    name: str | None = Field(
        default=None, max_length=63, pattern=DNS_LABEL_PATTERN,
        description="A RayCluster of this namespace, by name.",
    )  # fmt: skip
    selector: dict[str, str] | None = Field(
        default=None,
        min_length=1,
        description="Labels: the operator picks a ready RayCluster of this namespace that "
        "has them all (the first by name).",
    )
    warm: Literal[True] | None = Field(
        default=None,
        description="The operator's warm RayCluster of this namespace for this spec.ray "
        "(image, sizes, workers, pod options): made on first use, kept between runs, deleted "
        "after operator.warmClusterIdleSeconds without one.",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> RayClusterChoice:
        given = [k for k in ("name", "selector", "warm") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of name, selector, warm")
        return self


class RaySettings(PodOptions):
    """The Ray cluster's pods; the pod options (env, envFrom, nodeSelector...) go to the
    head and the workers."""

    image: str = "mlkube/runtime:0.1.0"
    workers: int = Field(default=1, ge=0, le=1000)
    retries: int = Field(
        default=0,
        ge=0,
        le=10,
        description=(
            "Times KubeRay runs the job again, on a new Ray cluster, after it failed (the "
            "RayJob's backoffLimit); with tuning.storage the search resumes."
        ),
    )
    head: Resources = Field(default_factory=Resources)
    worker: Resources = Field(default_factory=Resources)
    cluster: RayClusterChoice | None = Field(
        default=None, description="Run on an existing RayCluster; a new one when omitted."
    )


class TrainingRunSpec(CamelModel):
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": f"self.task in {list(BUILTIN_TASKS)} || self.task.contains(':')",
                    "message": "unknown task; built-in tasks are "
                    + ", ".join(BUILTIN_TASKS)
                    + ", or give package.module:function",
                    "fieldPath": ".task",
                },
                {"rule": "self == oldSelf", "message": "spec is immutable once created"},
            ]
        }
    )

    task: str = Field(pattern=TASK_PATTERN)
    dataset: Dataset = Field(default_factory=Dataset)
    model: ModelName
    tuning: Tuning = Field(default_factory=Tuning)
    promotion: Promotion = Field(default_factory=Promotion)
    resources: TrialResources = Field(default_factory=TrialResources)
    ray: RaySettings = Field(default_factory=RaySettings)
    mlflow: MlflowSettings = Field(default_factory=MlflowSettings)
    active_deadline_seconds: int | None = Field(default=None, ge=1)
    ttl_seconds_after_finished: int = Field(default=300, ge=0)

    @model_validator(mode="after")
    def _trial_fits_its_pod(self) -> TrainingRunSpec:
        """A trial that asks for more GPUs than the pods that run trials have never starts."""
        needed = math.ceil(self.resources.gpu)
        pods = [("worker", self.ray.worker)] if self.ray.workers > 0 else [("head", self.ray.head)]
        for role, resources in pods:
            if needed and resources.gpu is not None and resources.gpu < needed:
                raise ValueError(
                    f"ray.{role}.gpu ({resources.gpu}) cannot hold a trial that asks for "
                    f"{self.resources.gpu:g} GPU (resources.gpu)"
                )
        return self

    @field_validator("task")
    @classmethod
    def _known_task(cls, task: str) -> str:
        if ":" not in task and task not in BUILTIN_TASKS:
            raise ValueError(
                f"unknown task {task!r}; built-in tasks are {', '.join(BUILTIN_TASKS)}, "
                "or give package.module:function"
            )
        return task


class TrialCounts(CamelModel):
    completed: int = 0
    total: int = 0


class BestTrial(CamelModel):
    metric: str
    value: float
    params: dict[str, str] = Field(default_factory=dict)


class TrainingRunStatus(CamelModel):
    phase: TrainingRunPhase = "Pending"
    ray_job_name: str | None = None
    mlflow_run_id: str | None = None
    trials: TrialCounts | None = None
    best: BestTrial | None = None
    model_version: int | None = None
    promoted: bool | None = None
    promotion_reason: str | None = None
    message: str | None = None
    conditions: list[Condition] = Field(default_factory=list)
    observed_generation: int | None = None
    start_time: str | None = None
    completion_time: str | None = None


class TrainingRun(CamelModel):
    api_version: Literal["mlkube.io/v1alpha1"] = "mlkube.io/v1alpha1"
    kind: Literal["TrainingRun"] = "TrainingRun"
    metadata: ObjectMeta
    spec: TrainingRunSpec
    status: TrainingRunStatus | None = None
