"""Zygote benchmark: how long a warm head's RayJob entrypoint takes to reach the train flow's
main, started plainly (`python -m mlkube.flows.train`) or through the pre-imported zygote
(`python -m mlkube.flows.zygote run ... mlkube.flows.train`, as on a warm cluster).

    python benchmarks/zygote/run.py [--repeats 5]

No cluster: a zygote serving mlkube.flows.train is started here, as a warm head starts it.
Each run is given a malformed --spec-json, so the train flow's main refuses it with one line
on stderr right after its imports: the time to that line is the time to the main running,
the time to the exit adds the process's end. Prints a markdown table (medians); nothing is
asserted. Run it with the machine otherwise idle.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BAD_SPEC = ["--spec-json", "{"]
TRAIN = "mlkube.flows.train"


def timed(command: list[str]) -> tuple[float, float]:
    """Seconds from the start to the train flow's refusal on stderr, and to the exit."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    assert process.stderr is not None
    for line in process.stderr:  # the client's fallback line comes first, when it falls back
        if b"malformed JSON" in line:
            break
    else:
        raise SystemExit(f"no refusal from {command[:4]}")
    running = time.perf_counter() - start
    process.stderr.read()
    process.wait()
    return running, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    repeats = parser.parse_args().repeats
    root = Path(tempfile.mkdtemp(prefix="zy-bench-", dir="/tmp"))
    socket_path = str(root / "private" / "train.sock")
    start = time.perf_counter()
    zygote = subprocess.Popen(
        [sys.executable, "-m", "mlkube.flows.zygote", "serve", "--socket", socket_path,
         "--preload", "mlkube.cli", TRAIN],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert zygote.stdout is not None
    zygote.stdout.readline()
    imported = time.perf_counter() - start
    rows = {
        "plain `python -m mlkube.flows.train`": [sys.executable, "-m", TRAIN, *BAD_SPEC],
        "through the zygote": [sys.executable, "-m", "mlkube.flows.zygote", "run",
                               "--socket", socket_path, TRAIN, *BAD_SPEC],
        "the client, no zygote (falls back)": [sys.executable, "-m", "mlkube.flows.zygote",
                                               "run", "--socket", str(root / "none.sock"),
                                               TRAIN, *BAD_SPEC],
    }  # fmt: skip
    try:
        print(f"zygote up (train flow imported) {imported:.2f} s after its start\n")
        print("| started | to the train flow's main | to the exit | runs |")
        print("| --- | ---: | ---: | ---: |")
        for label, command in rows.items():
            times = [timed(command) for _ in range(repeats)]
            running = statistics.median(t[0] for t in times)
            ended = statistics.median(t[1] for t in times)
            print(f"| {label} | {running:.3f} s | {ended:.3f} s | {repeats} |")
    finally:
        zygote.terminate()
        zygote.wait()


if __name__ == "__main__":
    main()
