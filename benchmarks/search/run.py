"""Search benchmark: each algorithm and scheduler against random search, on three tables.

    python benchmarks/search/run.py [--trials 32] [--seeds 0,1,2] [--tables insurance,diabetes,cars]

The tabular task (HistGradientBoosting, 3-fold CV, a report every 50 boosting iterations) with its
default search space, on three regression tables that are on disk: the insurance table
(../shared/data/insurance.csv), scikit-learn's bundled diabetes table and vega_datasets'
local `cars` (miles per gallon). Each method runs `mlkube.training.tune.run_search` with the
same trial budget, two trials at a time, on one Ray started once; each seed is one search.

For every search: the best cross-validated error after each finished trial and when it came
(seconds from the search's start), and the held-out error (the split the search never sees)
of the best configuration after N trials, refitted on the search data as the train flow
does. The target: TPE or ASHA/Hyperband reach random search's quality after all trials
(its best cross-validated error, same seed) within the time random search takes for half
of them. Writes benchmarks/search/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
os.environ["MLKUBE_HOME"] = tempfile.mkdtemp(prefix="mlkube-bench-search-")
sys.path.insert(0, str(REPO))

METHODS = [
    ("random", "fifo"),
    ("random", "asha"),
    ("random", "hyperband"),
    ("tpe", "fifo"),
    ("tpe", "asha"),
    ("tpe", "hyperband"),
    ("grid", "fifo"),
]
BASELINE = ("random", "fifo")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def write_tables(folder: Path) -> dict[str, tuple[Path, str]]:
    """The three tables as CSV files, with their target columns."""
    from sklearn.datasets import load_diabetes
    from vega_datasets import local_data

    diabetes = load_diabetes(as_frame=True, scaled=False).frame
    cars = local_data.cars().drop(columns=["Name"])
    cars["Year"] = cars["Year"].dt.year
    paths = {"diabetes": folder / "diabetes.csv", "cars": folder / "cars.csv"}
    diabetes.to_csv(paths["diabetes"], index=False)
    cars.to_csv(paths["cars"], index=False)
    return {
        "insurance": (REPO.parent / "shared" / "data" / "insurance.csv", "charges"),
        "diabetes": (paths["diabetes"], "target"),
        "cars": (paths["cars"], "Miles_per_Gallon"),
    }


@dataclass
class Recorder:
    """The search's observer: keeps each trial's last metrics and when trials ended."""

    metric: str
    started: float = field(default_factory=time.perf_counter)
    last: dict[str, dict[str, float]] = field(default_factory=dict)
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    # (seconds, trial id) per finished trial, in order.
    ended: list[tuple[float, str]] = field(default_factory=list)

    def trial_started(self, trial_id: str, config: Mapping[str, Any]) -> None:
        self.configs[trial_id] = dict(config)

    def trial_result(self, trial_id: str, metrics: Mapping[str, float], step: int) -> None:
        self.last[trial_id] = dict(metrics)

    def trial_ended(self, trial_id: str, error: str | None) -> None:
        if error is None and trial_id in self.last:
            self.ended.append((time.perf_counter() - self.started, trial_id))

    def curve(self) -> list[tuple[float, float, str]]:
        """(seconds, best error so far, best trial) after each finished trial."""
        best, best_id, points = float("inf"), "", []
        for seconds, trial_id in self.ended:
            value = self.last[trial_id][self.metric]
            if value < best:
                best, best_id = value, trial_id
            points.append((seconds, best, best_id))
        return points


@dataclass
class Search:
    table: str
    method: tuple[str, str]
    seed: int
    seconds: float
    curve: list[tuple[float, float, str]]
    holdout: dict[int, float]
    trials: int


def run_one(table: str, uri: Path, target: str, method: tuple[str, str], seed: int,
            trials: int) -> Search:  # fmt: skip
    from mlkube.api import TrainingRun, parse_resource
    from mlkube.training.prepare import prepare
    from mlkube.training.tune import experiment_dir, run_search

    algorithm, scheduler = method
    run = parse_resource({
        "apiVersion": "mlkube.io/v1alpha1", "kind": "TrainingRun",
        "metadata": {"name": f"{table}-{algorithm}-{scheduler}-{seed}"},
        "spec": {
            "task": "tabular", "model": {"name": "bench"},
            "dataset": {"uri": str(uri), "target": target, "problem": "regression"},
            "tuning": {"numTrials": trials, "maxConcurrentTrials": 2, "metric": "mae",
                       "algorithm": algorithm, "scheduler": scheduler, "seed": seed},
        },
    })  # fmt: skip
    assert isinstance(run, TrainingRun)
    prepared = prepare(run)
    recorder = Recorder("mae")
    run_search(prepared.task, prepared.data, prepared.settings, recorder,
               experiment_dir(f"bench-{run.metadata.name}"))  # fmt: skip
    seconds = time.perf_counter() - recorder.started
    curve = recorder.curve()
    holdout = {}
    x_holdout, y_holdout = prepared.data.holdout
    for n in sorted({8, 16, trials}):
        if n > len(curve):
            continue
        config = recorder.configs[curve[n - 1][2]]
        model = prepared.task.fit(config, prepared.data, prepared.settings.seed)
        holdout[n] = prepared.task.score(model, x_holdout, y_holdout)["mae"]  # type: ignore[attr-defined]
    return Search(table, method, seed, seconds, curve, holdout, len(curve))


def time_to_reach(curve: list[tuple[float, float, str]], quality: float) -> float | None:
    return next((seconds for seconds, best, _ in curve if best <= quality), None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--tables", default="insurance,diabetes,cars")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    half = args.trials // 2

    from mlkube.training.tune import ensure_ray

    tables = write_tables(Path(tempfile.mkdtemp(prefix="mlkube-bench-tables-")))
    load_before = os.getloadavg()
    ensure_ray()
    searches: list[Search] = []
    for table in args.tables.split(","):
        uri, target = tables[table]
        for seed in seeds:
            for method in METHODS:
                search = run_one(table, uri, target, method, seed, args.trials)
                searches.append(search)
                log(f"{table} {'/'.join(method)} seed {seed}: {search.trials} trials in "
                    f"{search.seconds:.1f} s, best CV mae {search.curve[-1][1]:.4g}, "
                    f"holdout {search.holdout}, load {os.getloadavg()[0]:.1f}")  # fmt: skip
    load_after = os.getloadavg()

    lines = []
    verdicts = {}
    for table in args.tables.split(","):

        def of(method: tuple[str, str], seed: int, table: str = table) -> Search:
            return next(s for s in searches
                        if s.table == table and s.method == method and s.seed == seed)  # fmt: skip

        budget_time = {seed: of(BASELINE, seed).curve[half - 1][0] for seed in seeds}
        quality = {seed: of(BASELINE, seed).curve[-1][1] for seed in seeds}
        lines += [
            f"### {table}",
            "",
            f"| method | best CV mae after {args.trials} | held-out mae after 8 / {half} / "
            f"{args.trials} trials | seconds for {args.trials} trials | seconds to random's "
            f"{args.trials}-trial CV mae (same seed) | within random's {half}-trial time |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for method in METHODS:
            runs = [of(method, seed) for seed in seeds]
            reached = [time_to_reach(of(method, s).curve, quality[s]) for s in seeds]
            within = sum(1 for r, s in zip(reached, seeds, strict=True)
                         if r is not None and r <= budget_time[s])  # fmt: skip
            holdouts = " / ".join(
                f"{statistics.median(r.holdout[n] for r in runs):.4g}"
                if all(n in r.holdout for r in runs)
                else "-"
                for n in (8, half, args.trials)
            )
            shown = ", ".join("never" if r is None else f"{r:.1f}" for r in reached)
            lines.append(
                f"| {'/'.join(method)} | {statistics.median(r.curve[-1][1] for r in runs):.4g} "
                f"| {holdouts} | {statistics.median(r.seconds for r in runs):.1f} | {shown} "
                f"| {within} of {len(seeds)} |"
            )
            if method[0] == "tpe" or method[1] in ("asha", "hyperband"):
                verdicts.setdefault(table, {})["/".join(method)] = within * 2 > len(seeds)
        lines += [
            "",
            f"Random search's {half}-trial time per seed: "
            + ", ".join(f"{budget_time[s]:.1f} s" for s in seeds)
            + f"; its {args.trials}-trial CV mae: "
            + ", ".join(f"{quality[s]:.4g}" for s in seeds)
            + ".",
            "",
        ]
    met = [t for t, v in verdicts.items() if any(v.values())]
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    head = [
        "# Search benchmark",
        "",
        f"{args.trials} trials a search, two at a time, seeds {args.seeds}; the tabular task "
        "(HistGradientBoosting, 3-fold CV, a report every 50 boosting iterations) with its default "
        f"space; {os.cpu_count()} cores, {platform.machine()}, Python "
        f"{platform.python_version()}; load average {load_before[0]:.1f} / {load_before[1]:.1f}"
        f" (1 / 5 min) before, {load_after[0]:.1f} / {load_after[1]:.1f} after; {when}. Seconds "
        "are from the search's start (Ray already up; each search pays about 5 s for its trial "
        "actors to start). A method meets the target on a table when, for most seeds, its best "
        "CV error reaches random search's after all trials within the time random search takes "
        "for half of them.",
        "",
        "Target (TPE or ASHA/Hyperband on at least two of three tables): "
        + ("**met**" if len(met) >= 2 else "**not met**")
        + f" ({len(met)} of {len(verdicts)}: "
        + "; ".join(
            f"{t}: " + (", ".join(m for m, ok in v.items() if ok) or "none")
            for t, v in verdicts.items()
        )
        + ").",
        "",
    ]
    text = "\n".join(head + lines)
    print(text)
    (HERE / "RESULTS.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
