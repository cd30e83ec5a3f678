"""Flow parameters cannot send the KMA service key anywhere, nor read another namespace's
Secrets: whoever may start a flow run chooses them, the worker's environment does not."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from mlkube.cli import main as cli_main
from mlkube.flows.sources import KmaAsosSettings, SourceError
from mlkube.flows.sources.kma_asos import ALLOWED_HOSTS_ENV, SecretKeyRef, read_secret
from tests.fixtures.kma_server import KmaServer, hourly_observations
from tests.unit.test_flows_kma import START, host_port

KEY = "the-real-service-key"


class Recorder:
    """A loopback HTTP server that records every request and answers with `answer`."""

    def __init__(self, answer: Any) -> None:
        self.paths: list[str] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                recorder.paths.append(self.path)
                status, headers, body = answer(self.path)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def attacker() -> Iterator[Recorder]:
    server = Recorder(lambda path: (200, {"Content-Type": "text/plain"}, b"thanks"))
    yield server
    server.close()


@pytest.fixture
def kma(monkeypatch: pytest.MonkeyPatch) -> Iterator[KmaServer]:
    with KmaServer(service_key=KEY) as running:
        running.observations[108] = hourly_observations(START, 24)
        monkeypatch.setenv("KMA_SERVICE_KEY", KEY)
        monkeypatch.setenv(ALLOWED_HOSTS_ENV, host_port(running.url))
        yield running


def config_file(tmp_path: Path, url: str) -> Path:
    path = tmp_path / "retrain.yaml"
    document = {
        "source": {"kind": "kma-asos", "url": url, "start": "2024-03-01", "end": "2024-03-01"},
        "dataset": {"uri": str(tmp_path / "seoul.parquet")},
        "trainingrun": {"apiVersion": "mlkube.io/v1alpha1", "kind": "TrainingRun",
                        "metadata": {"name": "atmos"},
                        "spec": {"task": "atmos-temperature", "model": {"name": "atmos"}}},
    }  # fmt: skip
    path.write_text(yaml.safe_dump(document))
    return path


def test_a_source_url_on_another_host_is_refused_before_anything_is_sent(
    kma: KmaServer, attacker: Recorder, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = config_file(tmp_path, attacker.url + "/steal")
    assert cli_main(["ingest", "-f", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "source.kma-asos.url: " in err
    assert f"{attacker.url.removeprefix('http://')} is not an allowed host" in err
    assert attacker.paths == [] and KEY not in err

    # The host the worker allows still works, through the same command.
    assert cli_main(["ingest", "-f", str(config_file(tmp_path, kma.url))]) == 0
    assert "24 new hours" in capsys.readouterr().out


def test_plain_http_to_a_remote_host_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ALLOWED_HOSTS_ENV, "apis.data.go.kr")
    with pytest.raises(ValueError, match="only sent over https"):
        KmaAsosSettings(url="http://apis.data.go.kr/1360000/AsosHourlyInfoService/x")
    monkeypatch.delenv(ALLOWED_HOSTS_ENV)
    assert KmaAsosSettings().url.startswith("https://apis.data.go.kr/")  # the default


def test_a_redirect_cannot_take_the_key_elsewhere(
    kma: KmaServer, attacker: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An allowed endpoint that lies: it redirects to another host with the query string.
    liar = Recorder(lambda path: (302, {"Location": attacker.url + path}, b""))
    try:
        monkeypatch.setenv(ALLOWED_HOSTS_ENV, f"{host_port(kma.url)},{host_port(liar.url)}")
        source = KmaAsosSettings(url=liar.url + "/x", start="2024-03-01", end="2024-03-01",
                                 retries=0)  # fmt: skip
        with pytest.raises(SourceError) as raised:
            source.fetch_after(None)
    finally:
        liar.close()
    message = str(raised.value)
    assert message.startswith("source.url: refused to send the request: ")
    assert "is not an allowed host" in message and KEY not in message
    assert len(liar.paths) == 1 and attacker.paths == []


class FakeApiServer(Recorder):
    """A loopback Kubernetes API that serves one Secret in `namespace`."""

    def __init__(self, namespace: str) -> None:
        def answer(path: str) -> tuple[int, dict[str, str], bytes]:
            if path == f"/api/v1/namespaces/{namespace}/secrets/kma":
                data = {"serviceKey": base64.b64encode(KEY.encode()).decode()}
                secret = {"apiVersion": "v1", "kind": "Secret", "data": data,
                          "metadata": {"name": "kma", "namespace": namespace}}  # fmt: skip
                return 200, {"Content-Type": "application/json"}, json.dumps(secret).encode()
            status = {"kind": "Status", "status": "Failure", "reason": "Forbidden", "code": 403}
            return 403, {"Content-Type": "application/json"}, json.dumps(status).encode()

        super().__init__(answer)


def test_secrets_are_read_only_from_the_flows_own_namespace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = FakeApiServer("team-a")
    try:
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "c",
            "clusters": [{"name": "k", "cluster": {"server": api.url}}],
            "users": [{"name": "u", "user": {"token": "t"}}],
            "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u",
                                                   "namespace": "team-a"}}],
        }))  # fmt: skip
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        with pytest.raises(SourceError) as raised:
            read_secret(SecretKeyRef(name="kma", namespace="kube-system"))
        assert str(raised.value) == (
            "source.serviceKeySecret.namespace: Secrets are read only from the flow's own "
            "namespace (team-a), not kube-system"
        )
        assert api.paths == []  # not even asked

        assert read_secret(SecretKeyRef(name="kma")) == KEY
        assert read_secret(SecretKeyRef(name="kma", namespace="team-a")) == KEY
        assert api.paths == ["/api/v1/namespaces/team-a/secrets/kma"] * 2
    finally:
        api.close()
