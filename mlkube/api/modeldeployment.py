"""ModelDeployment: serve the version an MLflow alias points at, as a KServe InferenceService;
or several registered models (`models`), or any model of the namespace by name (`anyModel`),
from one InferenceService."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, model_validator

from mlkube.api.common import (
    BYTE_SIZE_PATTERN,
    DNS_SUBDOMAIN_PATTERN,
    CamelModel,
    Condition,
    MlflowSettings,
    ObjectMeta,
    Resources,
    quantity_value,
)
from mlkube.api.pods import PodOptions
from mlkube.api.registered_model import ALIAS_PATTERN, DEFAULT_ALIAS, MODEL_NAME_PATTERN


class ModelSelector(CamelModel):
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!(has(self.alias) && has(self.version))",
                    "message": "give alias or version, not both",
                }
            ]
        }
    )

    name: str = Field(pattern=MODEL_NAME_PATTERN, description="MLflow registered model name.")
    alias: str | None = Field(
        default=None,
        pattern=ALIAS_PATTERN,
        description="Alias to follow; champion when neither alias nor version is given.",
    )
    version: int | None = Field(default=None, ge=1, description="Pin a version (rollback).")

    @model_validator(mode="after")
    def _alias_or_version(self) -> ModelSelector:
        if self.alias is not None and self.version is not None:
            raise ValueError("give alias or version, not both")
        return self

    @property
    def followed_alias(self) -> str | None:
        if self.version is not None:
            return None
        return self.alias or DEFAULT_ALIAS


# Models one ModelDeployment may list (spec.models): one predictor process holds them all.
MAX_MODELS = 64
# A predictor serving one pinned version exits with this status when that version's files
# download but do not load; the operator reads it off the pod and fails the rollout at once.
UNLOADABLE_EXIT_CODE = 3


class AnyModel(CamelModel):
    """Any registered model of the deployment's namespace, by the name in the request URL,
    at this alias (resolved when a model loads)."""

    alias: str = Field(
        default=DEFAULT_ALIAS, pattern=ALIAS_PATTERN, description="Alias every model serves."
    )


class Replicas(CamelModel):
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {"rule": "self.min <= self.max", "message": "min must not exceed max"}
            ]
        }
    )

    min: int = Field(default=1, ge=0, description="0 allows scale to zero.")
    max: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _min_below_max(self) -> Replicas:
        if self.min > self.max:
            raise ValueError("min must not exceed max")
        return self


class Canary(CamelModel):
    traffic_percent: int = Field(ge=0, le=100)


class RequestLimits(CamelModel):
    """Caps on one request; over them the predictor answers 413 (bytes) or 400 (rows)."""

    max_request_bytes: str | None = Field(
        default=None,
        pattern=BYTE_SIZE_PATTERN,
        description="Largest request body, e.g. 64Mi; the predictor's default when omitted.",
    )
    max_request_rows: int | None = Field(
        default=None, ge=1, description="Most rows in one request; the predictor's default."
    )


class ModelCache(CamelModel):
    """Where the predictor keeps the model files it downloads: a volume of the pod, so that a
    restarted container loads them from disk instead of downloading them again."""

    size_limit: str = Field(
        default="4Gi",
        pattern=BYTE_SIZE_PATTERN,
        description="The emptyDir's size limit; the predictor keeps its cache within 3/4 of "
        "it (room for one more download). With a claim: the cache's bound alone.",
    )
    persistent_volume_claim: str | None = Field(
        default=None,
        max_length=253,
        pattern=DNS_SUBDOMAIN_PATTERN,
        description="An existing PersistentVolumeClaim of this namespace to keep the cache "
        "on instead of an emptyDir (it outlives the pods; ReadWriteMany for several replicas "
        "on several nodes).",
    )


_ONE_SOURCE = (
    "(has(self.model) ? 1 : 0) + (has(self.models) ? 1 : 0) + (has(self.anyModel) ? 1 : 0)"
)


class ModelDeploymentSpec(PodOptions):
    """The pod options (env, envFrom, nodeSelector...) go to the predictor pods."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": f"{_ONE_SOURCE} == 1",
                    "message": "give exactly one of model, models, anyModel",
                },
                {
                    "rule": "!has(self.memoryBudget) || !isQuantity(self.memoryBudget) || "
                    "quantity(self.memoryBudget).isLessThan(quantity("
                    "has(self.resources) && has(self.resources.memory) ? self.resources.memory"
                    f" : '{Resources.model_fields['memory'].default}'))",
                    "message": "memoryBudget must be below resources.memory: the server "
                    "itself needs room",
                    "fieldPath": ".memoryBudget",
                },
                {
                    "rule": "!has(self.canary) || has(self.model)",
                    "message": "canary: a canary splits traffic between versions of one "
                    "model; it needs spec.model",
                    "fieldPath": ".canary",
                },
            ]
        }
    )

    model: ModelSelector | None = Field(default=None, description="The one model to serve.")
    models: list[ModelSelector] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_MODELS,
        description="Several registered models served by one predictor, each following its "
        "own alias (or pinned to a version); clients call each by its name.",
        # a list keyed by name: the API server refuses a name listed twice (a CEL rule
        # comparing every pair costs more than a CRD may)
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    any_model: AnyModel | None = Field(
        default=None,
        description="Serve any registered model of this namespace by the name in the "
        "request URL, loaded on demand; a model owned by another namespace is not found.",
    )
    memory_budget: str | None = Field(
        default=None,
        pattern=BYTE_SIZE_PATTERN,
        description="Resident memory the loaded models may take in one predictor, e.g. "
        "2Gi: beyond it the least recently used model is evicted (it loads again on its "
        "next request). Counted as the growth of the process's resident memory across "
        "each load. No budget when omitted (the TTL alone evicts).",
    )
    protocol: Literal["v1", "v2"] = Field(
        default="v1",
        description="How clients call the model: v1 (TFServing-style REST) or v2 (Open "
        "Inference Protocol, REST and gRPC). status.predictUrl (and for v2 in KServe's "
        "Standard mode status.grpcAddress) says where; the predictor serves both.",
    )
    ttl_seconds: int = Field(default=300, ge=0, description="Evict the model after idle seconds.")
    replicas: Replicas = Field(default_factory=Replicas)
    canary: Canary | None = None
    resources: Resources = Field(default_factory=Resources)
    image: str | None = Field(default=None, description="Predictor image; operator default.")
    mlflow: MlflowSettings = Field(default_factory=MlflowSettings)
    limits: RequestLimits = Field(default_factory=RequestLimits)
    cache: ModelCache = Field(default_factory=ModelCache)

    @model_validator(mode="after")
    def _one_source(self) -> ModelDeploymentSpec:
        given = [self.model, self.models, self.any_model]
        if sum(item is not None for item in given) != 1:
            raise ValueError("give exactly one of model, models, anyModel")
        names = [selector.name for selector in self.models or []]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"models: {twice[0]!r} is listed more than once")
        if self.memory_budget is not None and quantity_value(self.memory_budget) >= quantity_value(
            self.resources.memory
        ):
            raise ValueError(
                f"memoryBudget: {self.memory_budget} leaves no room in the predictor's "
                f"{self.resources.memory} (resources.memory) for the server itself"
            )
        if self.canary is not None and self.model is None:
            raise ValueError(
                "canary: a canary splits traffic between versions of one model; it needs spec.model"
            )
        return self

    @property
    def selectors(self) -> list[ModelSelector]:
        """The models this deployment names (none with anyModel)."""
        if self.model is not None:
            return [self.model]
        return list(self.models or [])

    @property
    def serves_many(self) -> bool:
        """One predictor serves several models by name (spec.models or spec.anyModel)."""
        return self.model is None


class CanaryStatus(CamelModel):
    version: int
    traffic_percent: int


class ModelStatus(CamelModel):
    """One model of spec.models: the version its pods serve and whether they are ready."""

    name: str
    alias: str | None = None
    # The version the alias (or the pin) says now; the pods serve it once ready.
    desired_version: int | None = None
    served_version: int | None = None
    # A version whose revision failed: not rolled out again until the alias moves on.
    failed_version: int | None = None
    ready: bool = False
    message: str | None = None


class ModelDeploymentStatus(CamelModel):
    phase: Literal["Pending", "Progressing", "Ready", "Failed"] = "Pending"
    served_version: int | None = None
    # spec.models: one entry per model; `modelsReady` says "ready/listed" for kubectl get.
    models: list[ModelStatus] = Field(default_factory=list)
    models_ready: str | None = None
    previous_version: int | None = None
    # A version whose revision failed: not rolled out again until the alias moves on.
    failed_version: int | None = None
    canary: CanaryStatus | None = None
    url: str | None = None
    # Where clients call the served model in spec.protocol: the REST predict URL, and for
    # v2 the gRPC address (host:port) where the Service declares the h2c port.
    predict_url: str | None = None
    grpc_address: str | None = None
    inference_service_name: str | None = None
    message: str | None = None
    conditions: list[Condition] = Field(default_factory=list)
    observed_generation: int | None = None


class ModelDeployment(CamelModel):
    api_version: Literal["mlkube.io/v1alpha1"] = "mlkube.io/v1alpha1"
    kind: Literal["ModelDeployment"] = "ModelDeployment"
    metadata: ObjectMeta
    spec: ModelDeploymentSpec
    status: ModelDeploymentStatus | None = None
