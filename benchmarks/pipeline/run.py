"""Pipeline benchmark: `mlkube train` from the command line, as a user waits for it.

    python benchmarks/pipeline/run.py [--repeats 3] [--trials 8] [--checkout DIR ...] [--write]
                                      [--refusals-only]

Runs `python -m mlkube train -f examples/insurance/trainingrun.yaml` (its trial count set by
--trials) in a fresh process each time, in local mode: Ray and Prefect's temporary API
started by the command itself, MLflow on sqlite. One warm-up run first creates the MLflow
and Prefect databases, as a user's first run does once. Notes when the first and the last
trial are reported, when the summary is printed and when the process has ended. With
--checkout, the same runs are made with the mlkube of other checkouts (a `git worktree` of an
older commit, say) for a before/after table. Prints a markdown table; --write also saves it
to benchmarks/pipeline/RESULTS.md. Also times how long `mlkube train` takes to refuse what
can be refused before Ray and Prefect start (a missing dataset, a column not in its header, an
unknown task, a user task that cannot be imported): `--refusals-only` times just that.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
INSURANCE = REPO.parent / "shared" / "data" / "insurance.csv"
MARKS = ("first trial reported", "last trial reported", "summary printed", "process ended")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def describe(checkout: Path) -> str:
    """A checkout's commit, with a + when its files differ from it."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(checkout), *args], capture_output=True, text=True)
        return done.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or checkout.name
    return f"`{commit}{'+' if git('status', '--porcelain', '--untracked-files=no') else ''}`"


def run_once(checkout: Path, manifest: Path, env: dict[str, str], trials: int) -> dict[str, float]:
    """Seconds from the command's start to each mark."""
    started = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, "-m", "mlkube", "train", "-f", str(manifest), "--dataset", str(INSURANCE)],
        cwd=checkout,
        env={**env, "PYTHONPATH": str(checkout)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    marks: dict[str, float] = {}
    assert child.stdout is not None
    for line in child.stdout:
        now = time.perf_counter() - started
        if line.startswith("trial "):
            marks.setdefault(MARKS[0], now)
            if line.startswith(f"trial {trials}/{trials} "):
                marks[MARKS[1]] = now
        elif "mlflow run" in line:
            marks[MARKS[2]] = now
    if child.wait() != 0:
        raise SystemExit(f"mlkube train failed in {checkout} (exit {child.returncode})")
    marks[MARKS[3]] = time.perf_counter() - started
    missing = [mark for mark in MARKS if mark not in marks]
    if missing:
        raise SystemExit(f"{checkout}: no {', '.join(missing)} in the output of mlkube train")
    return marks


def refusal_seconds(
    checkout: Path,
    manifest: Path,
    env: dict[str, str],
    extra: tuple[str, ...] = (),
    field: str = "",
) -> float:
    """Seconds until `mlkube train` gives up on bad input with its one-line error (exit 2)."""
    extra = extra or ("--dataset", "/no/such.csv")
    field = field or "dataset.uri"
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "mlkube", "train", "-f", str(manifest), *extra],
        cwd=checkout,
        env={**env, "PYTHONPATH": str(checkout)},
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - started
    lines = done.stderr.strip().splitlines()
    if done.returncode != 2 or len(lines) != 1 or field not in lines[0]:
        raise SystemExit(f"{checkout}: {extra} gave exit {done.returncode}: {done.stderr}")
    return seconds


def bad_inputs(work: Path, example: str) -> dict[str, tuple[Path, tuple[str, ...], str]]:
    """What the issue lists as refusable before Ray and Prefect start: manifest, arguments
    and the field its error names."""

    def variant(name: str, old: str, new: str) -> Path:
        path = work / f"{name}.yaml"
        path.write_text(example.replace(old, new))
        return path

    return {
        "a missing dataset file": (work / "trainingrun.yaml", ("--dataset", "/no/such.csv"),
                                   "dataset.uri"),
        "a target not in the file's header": (
            variant("column", "target: charges", "target: premium"),
            ("--dataset", str(INSURANCE)), "dataset.target"),
        "an unknown task": (variant("task", "task: insurance", "task: forecast"),
                            ("--dataset", str(INSURANCE)), "spec.task"),
        "a user task that cannot be imported": (
            variant("user", "task: insurance", "task: no_such_package.tasks:make"),
            ("--dataset", str(INSURANCE)), "spec.task"),
    }  # fmt: skip


def refusals(checkouts: list[Path], work: Path, example: str, repeats: int) -> str:
    """The one-line errors' table: median seconds from the command's start to its exit."""
    cases = bad_inputs(work, example)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "RAY_"))}
    base.pop("MLFLOW_TRACKING_URI", None)
    base["MLKUBE_HOME"] = str(work / "refusals")
    load = os.getloadavg()[0]
    seconds: dict[tuple[Path, str], str] = {}
    for checkout in checkouts:
        for case, (manifest, extra, field) in cases.items():
            try:
                times = [refusal_seconds(checkout, manifest, base, extra, field)
                         for _ in range(repeats)]  # fmt: skip
                seconds[(checkout, case)] = f"{statistics.median(times):.2f}"
            except SystemExit as failed:  # an older checkout that does not refuse cleanly
                log(str(failed))
                exit_code = str(failed).split("gave exit ")[-1].split(":")[0]
                seconds[(checkout, case)] = f"no one-line error (exit {exit_code})"
    header = "| `mlkube train` refuses, one line, exit 2 | " + " | ".join(map(describe, checkouts))
    return "\n".join([
        f"Seconds from the command's start to its exit, median of {repeats}; load average "
        f"{load:.1f} at start.",
        "",
        f"{header} |",
        "| --- |" + " ---: |" * len(checkouts),
        *(f"| {case} | " + " | ".join(seconds[(c, case)] for c in checkouts) + " |"
          for case in cases),
    ])  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument(
        "--checkout", action="append", default=[], help="another mlkube checkout to time too"
    )
    parser.add_argument("--write", action="store_true", help="save the table to RESULTS.md")
    parser.add_argument(
        "--refusals-only", action="store_true", help="time only the one-line errors of bad input"
    )
    args = parser.parse_args()

    checkouts = [REPO, *(Path(c).resolve() for c in args.checkout)]
    work = Path(tempfile.mkdtemp(prefix="mlkube-bench-pipeline-"))
    manifest = work / "trainingrun.yaml"
    example = (REPO / "examples" / "insurance" / "trainingrun.yaml").read_text()
    manifest.write_text(example.replace("numTrials: 8", f"numTrials: {args.trials}"))
    refused = refusals(checkouts, work, example, args.repeats)
    if args.refusals_only:
        print(refused)
        if args.write:
            write_section(HERE / "RESULTS.md", "## One-line errors", refused)
        return 0
    load_before = os.getloadavg()[0]
    results: dict[Path, list[dict[str, float]]] = {}
    for checkout in checkouts:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "RAY_"))}
        env.pop("MLFLOW_TRACKING_URI", None)
        for tool in ("mlkube", "prefect"):
            home = work / checkout.name / tool
            home.mkdir(parents=True)
            env[f"{tool.upper()}_HOME"] = str(home)
        log(f"{checkout}: warm-up run (creates the MLflow and Prefect databases)")
        run_once(checkout, manifest, env, args.trials)
        results[checkout] = []
        for repeat in range(1, args.repeats + 1):
            marks = run_once(checkout, manifest, env, args.trials)
            results[checkout].append(marks)
            log(f"{checkout}: run {repeat}/{args.repeats}: {marks[MARKS[3]]:.1f} s in all")

    def median(checkout: Path, mark: str) -> float:
        return statistics.median(run[mark] for run in results[checkout])

    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    header = "| seconds from the command's start | " + " | ".join(map(describe, checkouts))
    lines = [
        f"`mlkube train` on the insurance example with {args.trials} trials, local mode, "
        f"median of {args.repeats} after one warm-up run; {os.cpu_count()} cores, "
        f"{platform.machine()}, Python {platform.python_version()}, load average "
        f"{load_before:.1f} at start; {when}.",
        "",
        f"{header} |",
        "| --- |" + " ---: |" * len(checkouts),
        *(
            f"| {mark} | " + " | ".join(f"{median(c, mark):.1f}" for c in checkouts) + " |"
            for mark in MARKS
        ),
    ]
    text = "\n".join(lines)
    print(text, refused, sep="\n\n")
    if args.write:
        write_section(HERE / "RESULTS.md", "## `mlkube train` end to end", text)
        write_section(HERE / "RESULTS.md", "## One-line errors", refused)
    return 0


def write_section(results: Path, title: str, text: str) -> None:
    """Replaces (or adds) one section of RESULTS.md, keeping the others."""
    old = results.read_text() if results.exists() else "# Pipeline benchmark\n"
    sections = old.split("\n## ")
    kept = [sections[0].rstrip()] + [
        f"## {part.rstrip()}" for part in sections[1:] if not f"## {part}".startswith(title)
    ]
    results.write_text("\n\n".join([*kept, f"{title}\n\n{text}"]) + "\n")


if __name__ == "__main__":
    sys.exit(main())
