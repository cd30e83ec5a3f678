"""A light stand-in for the train flow, run through the zygote or plainly:
`python -m tests.integration.zygote_target ACTION [ARGS]`.

Its module-level state tells where it was imported: run as __main__, `import` of itself
finds the copy the zygote pre-imported (or, in a plain process, imports a fresh one).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

IMPORTED_IN = os.getpid()
RUNS: list[int] = []


def report() -> dict[str, object]:
    import tests.integration.zygote_target as imported

    imported.RUNS.append(os.getpid())
    return {
        "pid": os.getpid(),
        "imported_in": imported.IMPORTED_IN,
        "runs_seen": len(imported.RUNS),
        "argv": sys.argv[1:],
        "cwd": os.getcwd(),
        "env": os.environ.get("ZYGOTE_TEST_VALUE"),
        "pgid": os.getpgid(0),
    }


def main(argv: list[str]) -> int:
    action = argv[0]
    if action == "echo":
        line = sys.stdin.readline().strip()
        print(json.dumps({**report(), "stdin": line}))
        print("to stderr", file=sys.stderr)
        return int(argv[1])
    if action == "threads":  # the OpenMP pools' size, as the run would use them
        import sklearn.ensemble  # noqa: F401 (loads OpenMP; pre-imported by the test's zygote)
        from threadpoolctl import threadpool_info

        print(json.dumps(sorted({p["num_threads"] for p in threadpool_info()
                                 if p["user_api"] == "openmp"})))  # fmt: skip
        return 0
    if action == "raise":
        raise RuntimeError("boom from the stand-in")
    if action == "sleep":
        if argv[1:] == ["exit-on-term"]:  # as the train flow turns SIGTERM into an exit
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(15))
        print(json.dumps(report()), flush=True)
        time.sleep(120)
        return 0
    raise SystemExit(f"unknown action {action}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
