"""A tiny stand-in predictor for InferenceServicePlayer tests.

It speaks just enough of KServe's REST protocols for a readiness probe and a smoke
request: GET /v2/health/live, /v2/health/ready, /v1/models, /v1/models/<name>,
/v2/models/<name>/ready and POST /v1/models/<name>:predict (echoes the instances with
the server's --tag, so a test can tell which revision answered).

    python -m tests.cluster.fake_predictor --model_name m --tag v1 --http_port 8080
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def _handler(model: str, tag: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _send(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            routes: dict[str, dict[str, Any]] = {
                "/": {"status": "alive"},
                "/v2/health/live": {"live": True},
                "/v2/health/ready": {"ready": True},
                "/v1/models": {"models": [model]},
                f"/v1/models/{model}": {"name": model, "ready": True},
                f"/v2/models/{model}/ready": {"name": model, "ready": True},
                "/tag": {"tag": tag},
            }
            if self.path in routes:
                self._send(200, routes[self.path])
            else:
                self._send(404, {"error": f"no route {self.path}"})

        def do_POST(self) -> None:  # noqa: N802
            if self.path != f"/v1/models/{model}:predict":
                self._send(404, {"error": f"no route {self.path}"})
                return
            length = int(self.headers.get("Content-Length") or 0)
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
            except json.JSONDecodeError as e:
                self._send(400, {"error": str(e)})
                return
            self._send(200, {"predictions": body.get("instances", []), "tag": tag})

        def log_message(self, format: str, *args: Any) -> None:
            return  # keep test output quiet

    return Handler


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM (the player stopping us) ends serve_forever cleanly


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model_name", default="model")
    parser.add_argument("--tag", default="")
    parser.add_argument("--http_port", type=int, default=int(os.environ.get("PORT", "8080")))
    parser.add_argument("--grpc_port", type=int, default=0, help="accepted and ignored")
    parser.add_argument(
        "--exit-code",
        type=int,
        default=None,
        help="exit at once with this code (to play a crashing predictor)",
    )
    args, _unknown = parser.parse_known_args(argv)
    if args.exit_code is not None:
        print(f"fake predictor: failing on purpose with {args.exit_code}", file=sys.stderr)
        return int(args.exit_code)
    server = ThreadingHTTPServer(("127.0.0.1", args.http_port), _handler(args.model_name, args.tag))
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
