"""Runs in a pod of the test node: sends one v1 request after another to a predictor until
`stop_file` exists (`kubectl exec ... touch`), or until `max_seconds`.
Prints one JSON object: requests, errors (with their kinds), and the distinct answers in
the order they came."""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Any


def main() -> None:
    args: dict[str, Any] = json.loads(sys.argv[1])
    url = f"{args['url'].rstrip('/')}/v1/models/{args['model']}:predict"
    body = json.dumps({"instances": [args["row"]]}).encode()
    started = time.monotonic()
    deadline = started + args.get("max_seconds", 600)
    answers: list[float] = []
    requests, errors = 0, 0
    kinds: dict[str, int] = {}
    failed: list[tuple[float, float]] = []  # each failed request: sent, ended (wall clock)
    while time.monotonic() < deadline:
        if args.get("stop_file") and os.path.exists(args["stop_file"]):
            break
        request = urllib.request.Request(
            url, data=body, headers={"content-type": "application/json"}
        )
        requests += 1
        sent = time.time()
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                value = json.load(response)["predictions"][0]
        except (urllib.error.URLError, OSError, ValueError) as error:
            errors += 1
            failed.append((sent, time.time()))
            kind = f"{type(error).__name__}: {getattr(error, 'reason', error)}"[:120]
            kinds[kind] = kinds.get(kind, 0) + 1
            time.sleep(0.05)
            continue
        if not answers or answers[-1] != value:
            answers.append(value)
        time.sleep(0.05)
    print(
        json.dumps(
            {
                "requests": requests,
                "failed": failed,
                "errors": errors,
                "error_kinds": kinds,
                "answers": answers,
                "seconds": time.monotonic() - started,
            }
        )
    )


if __name__ == "__main__":
    main()
