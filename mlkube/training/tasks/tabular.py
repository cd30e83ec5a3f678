"""Generic tabular task: any CSV and a target column; regression or classification."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from mlkube.training.tasks.base import (
    DataError,
    Mode,
    Problem,
    Report,
    SearchSpace,
    Task,
    TaskData,
    highest,
    restored_state,
)
from mlkube.training.tasks.data import read_table, require_columns

if TYPE_CHECKING:  # pandas loads when data does: `mlkube train` refuses bad specs without it
    import pandas as pd

HOLDOUT_FRACTION = 0.2
CV_FOLDS = 3
# An integer or text target with at most this many classes is a classification.
MAX_CLASSES = 20
# A trial reports its cross-validated metrics after every round of this many boosting
# iterations (warm_start adds them), so that asha and hyperband can stop it early.
ROUND_ITERATIONS = 50
DEFAULT_MAX_ITER = 100
PIP_REQUIREMENTS = ["scikit-learn==1.9.1", "skops", "pandas", "numpy"]
# The metrics reported for each kind of problem, the first the default, and which way is better.
REGRESSION_METRICS: dict[str, Mode] = {"mae": "min", "rmse": "min", "r2": "max"}
CLASSIFICATION_METRICS: dict[str, Mode] = {
    "accuracy": "max",
    "f1": "max",
    "log_loss": "min",
    "roc_auc": "max",
}


def is_classification(target: pd.Series) -> bool:
    if target.dtype.kind == "f":
        return False
    return bool(target.nunique() <= MAX_CLASSES)


def rounds_of(max_iter: int) -> int:
    return max(1, math.ceil(max_iter / ROUND_ITERATIONS))


class TabularTask(Task):
    name = "tabular"
    model_modules = ("mlflow.models", "mlflow.sklearn", "skops.io")
    trial_modules = (
        "sklearn.compose", "sklearn.ensemble", "sklearn.metrics", "sklearn.model_selection",
        "sklearn.pipeline", "sklearn.preprocessing",
    )  # fmt: skip
    has_epochs = True
    default_target: tuple[str, ...] = ()
    problems: tuple[Problem, ...] = ("regression", "classification")

    def __init__(self) -> None:
        self.classification = False
        self.metric = "mae"
        self.mode = "min"

    @property
    def search_space(self) -> SearchSpace:
        return {
            "learning_rate": {"loguniform": [0.01, 0.3]},
            "max_iter": {"randint": [50, 300]},
            "max_leaf_nodes": {"randint": [8, 64]},
            "min_samples_leaf": {"randint": [5, 40]},
            "l2_regularization": {"loguniform": [1e-6, 1.0]},
        }

    def budget(self, space: SearchSpace) -> int:
        top = highest(space["max_iter"]) if "max_iter" in space else DEFAULT_MAX_ITER
        return rounds_of(int(top))

    def resolve_target(self, frame: pd.DataFrame, target: str | None, uri: str) -> str:
        if target:
            require_columns(frame, [target], uri, "dataset.target")
            return target
        for candidate in self.default_target:
            if candidate in frame.columns:
                return candidate
        if self.default_target:
            require_columns(frame, [self.default_target[0]], uri, "dataset.target")
        raise DataError(f"dataset.target: required for the {self.name} task")

    def load(self, uri: str | None, target: str | None, seed: int) -> TaskData:
        if not uri:
            raise DataError(f"dataset.uri: required for the {self.name} task")
        frame = read_table(uri)
        label = self.resolve_target(frame, target, uri)
        frame = frame.dropna(subset=[label])
        if len(frame) < 10 * CV_FOLDS:
            raise DataError(f"dataset.uri: {uri} has {len(frame)} labelled rows, too few")
        features = frame.drop(columns=[label])
        if features.shape[1] == 0:
            raise DataError(f"dataset.uri: {uri} has no feature columns besides {label!r}")
        self.classification = self.is_classification(frame[label], label)
        self.metric = self.metric_names()[0]
        self.mode = self.mode_for(self.metric)
        from sklearn.model_selection import train_test_split

        x_search, x_holdout, y_search, y_holdout = train_test_split(
            features,
            frame[label],
            test_size=HOLDOUT_FRACTION,
            random_state=seed,
            stratify=frame[label] if self.classification else None,
        )
        return TaskData(
            search=(x_search, y_search),
            holdout=(x_holdout, y_holdout),
            description={
                "rows": len(frame),
                "features": list(features.columns),
                "target": label,
                "kind": "classification" if self.classification else "regression",
            },
        )

    def is_classification(self, target: pd.Series, label: str) -> bool:
        if self.problem == "classification":
            return True
        if self.problem == "regression":
            if target.dtype.kind not in "iuf":
                raise DataError(
                    f"dataset.problem: a regression needs a numeric target; {label!r} holds "
                    f"{target.dtype} values"
                )
            return False
        return is_classification(target)

    def metric_names(self) -> list[str]:
        return list(CLASSIFICATION_METRICS if self.classification else REGRESSION_METRICS)

    def mode_for(self, metric: str) -> Mode:
        return {**REGRESSION_METRICS, **CLASSIFICATION_METRICS}.get(metric, self.mode)

    def pipeline(
        self, config: Mapping[str, Any], features: pd.DataFrame, seed: int, warm_start: bool = False
    ) -> Any:
        from sklearn.compose import ColumnTransformer
        from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
        from sklearn.pipeline import Pipeline
        from sklearn.preprocessing import OrdinalEncoder

        categorical = [c for c in features.columns if features[c].dtype.kind in "OSUbc"]
        encode = ColumnTransformer(
            [
                (
                    "categorical",
                    OrdinalEncoder(handle_unknown="use_encoded_value", unknown_value=-1),
                    categorical,
                )
            ],
            remainder="passthrough",
            verbose_feature_names_out=False,
        )
        estimator_class = (
            HistGradientBoostingClassifier if self.classification else HistGradientBoostingRegressor
        )
        estimator = estimator_class(
            random_state=seed,
            categorical_features=list(range(len(categorical))) or None,
            warm_start=warm_start,
            **{k: v for k, v in config.items() if k in self.search_space},
        )
        return Pipeline([("encode", encode), ("model", estimator)])

    def score(
        self, model: Any, x: pd.DataFrame, y_true: Any, y_pred: Any = None
    ) -> dict[str, float]:
        """All of metric_names() for a fitted scikit-learn model on (x, y_true); y_pred, when
        given, are the served model's predictions."""
        from sklearn import metrics

        y_pred = model.predict(x) if y_pred is None else y_pred
        if self.classification:
            scores = {
                "accuracy": float(metrics.accuracy_score(y_true, y_pred)),
                "f1": float(metrics.f1_score(y_true, y_pred, average="macro")),
            }
            return scores | self.probability_scores(model, x, y_true)
        return {
            "mae": float(metrics.mean_absolute_error(y_true, y_pred)),
            "rmse": float(metrics.mean_squared_error(y_true, y_pred) ** 0.5),
            "r2": float(metrics.r2_score(y_true, y_pred)),
        }

    @staticmethod
    def probability_scores(model: Any, x: pd.DataFrame, y_true: Any) -> dict[str, float]:
        from sklearn import metrics

        classes = model.classes_
        probabilities = model.predict_proba(x)
        scores = {"log_loss": float(metrics.log_loss(y_true, probabilities, labels=classes))}
        try:
            if len(classes) == 2:
                auc = metrics.roc_auc_score(y_true, probabilities[:, 1])
            else:
                auc = metrics.roc_auc_score(
                    y_true, probabilities, multi_class="ovr", labels=classes
                )
        except ValueError:  # a class missing from y_true: the area is not defined
            auc = float("nan")
        scores["roc_auc"] = float(auc)
        return scores

    def train(self, config: Mapping[str, Any], data: TaskData, report: Report, seed: int) -> None:
        from sklearn.model_selection import KFold, StratifiedKFold

        x, y = data.search
        splitter = (StratifiedKFold if self.classification else KFold)(
            n_splits=CV_FOLDS, shuffle=True, random_state=seed
        )
        # Per fold: the columns encoded once, then the booster grown round by round.
        folds = []
        for train_index, valid_index in splitter.split(x, y):
            pipeline = self.pipeline(config, x, seed, warm_start=True)
            encode, booster = pipeline[:-1], pipeline[-1]
            x_train = encode.fit_transform(x.iloc[train_index], y.iloc[train_index])
            x_valid = encode.transform(x.iloc[valid_index])
            folds.append((booster, x_train, y.iloc[train_index], x_valid, y.iloc[valid_index]))
        max_iter = int(config.get("max_iter", DEFAULT_MAX_ITER))
        # Boosting is deterministic for a seed: going straight to a round's iterations
        # builds the same trees as getting there round by round, so a resumed trial only
        # needs to know its round.
        done = (restored_state(report) or {}).get("round", 0)
        for round_number in range(done + 1, rounds_of(max_iter) + 1):
            iterations = min(round_number * ROUND_ITERATIONS, max_iter)
            scores = []
            for booster, x_train, y_train, x_valid, y_valid in folds:
                booster.set_params(max_iter=iterations).fit(x_train, y_train)
                scores.append(self.score(booster, x_valid, y_valid))
            metrics = {name: sum(f[name] for f in scores) / len(scores) for name in scores[0]}
            report(metrics, {"round": round_number})

    def fit(self, config: Mapping[str, Any], data: TaskData, seed: int) -> Any:
        x, y = data.search
        return self.pipeline(config, x, seed).fit(x, y)

    def log_model(self, model: Any, data: TaskData, name: str) -> str:
        import mlflow.sklearn
        from mlflow.models import infer_signature
        from skops.io import dumps, get_untrusted_types

        x, _ = data.search
        example = x.head(5)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*integer column", category=UserWarning)
            signature = infer_signature(example, model.predict(example))
        # skops refuses types it does not know; these are the ones this very model uses.
        trusted = get_untrusted_types(data=dumps(model))
        with warnings.catch_warnings():
            # Integer columns stay integers: the hint about missing values is not news here.
            warnings.filterwarnings("ignore", message=".*integer column", category=UserWarning)
            info = mlflow.sklearn.log_model(
                model,
                name=name,
                signature=signature,
                input_example=example,
                pip_requirements=PIP_REQUIREMENTS,
                skops_trusted_types=trusted,
            )
        return str(info.model_uri)

    def evaluate(self, loaded_model: Any, data: TaskData) -> dict[str, float]:
        x, y = data.holdout
        # Labels as served, through the pyfunc; probabilities (log_loss, roc_auc) from the
        # scikit-learn model inside it.
        return self.score(loaded_model.get_raw_model(), x, y, loaded_model.predict(x))


class InsuranceTask(TabularTask):
    """Medical-cost regression on age, sex, bmi, children, smoker and region."""

    name = "insurance"
    # The public copies name the target `charges` or, in the book's cleaned copy, `expenses`.
    default_target = ("charges", "expenses")
    columns = ("age", "sex", "bmi", "children", "smoker", "region")

    def load(self, uri: str | None, target: str | None, seed: int) -> TaskData:
        data = super().load(uri, target, seed)
        require_columns(data.search[0], list(self.columns), str(uri), "dataset.uri")
        return data
