"""mlkube's one rule for Kubernetes credentials, and kopf's login by that rule."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import kopf
import pytest
import yaml

from mlkube import kube_config
from mlkube.operator import kube

CA = "-----BEGIN CERTIFICATE-----\nca\n-----END CERTIFICATE-----\n"
CERT = "-----BEGIN CERTIFICATE-----\nclient\n-----END CERTIFICATE-----\n"
KEY = "-----BEGIN EC PRIVATE KEY-----\nkey\n-----END EC PRIVATE KEY-----\n"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def write_kubeconfig(path: Path, user: dict[str, str], namespace: str | None = "team-a") -> Path:
    context: dict[str, Any] = {"cluster": "c", "user": "u"}
    if namespace:
        context["namespace"] = namespace
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": "c",
                        "cluster": {
                            "server": "https://127.0.0.1:6443",
                            "certificate-authority-data": b64(CA),
                        },
                    }
                ],
                "users": [{"name": "u", "user": user}],
                "contexts": [{"name": "ctx", "context": context}],
                "current-context": "ctx",
            }
        )
    )
    return path


@pytest.fixture(autouse=True)
def not_in_a_pod(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setattr(kube_config, "SERVICE_ACCOUNT_NAMESPACE", tmp_path / "no-such-file")


def test_kubeconfig_is_read_from_the_variable_at_each_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Set after the kubernetes client was imported, which fixes its own default path then.
    path = write_kubeconfig(tmp_path / "config", {"token": "secret"})
    monkeypatch.setenv("KUBECONFIG", str(path))
    configuration = kube_config.client_configuration()
    assert configuration.host == "https://127.0.0.1:6443"
    assert kube_config.current_namespace() == "team-a"
    with kube_config.api_client() as api:
        assert api.configuration.host == "https://127.0.0.1:6443"
    write_kubeconfig(path, {"token": "secret"}, namespace=None)
    assert kube_config.current_namespace() == "default"


def test_without_any_configuration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    assert kube_config.current_namespace() == "default"
    assert kube.connection_info(kopf.OperatorSettings()) is None


@pytest.mark.parametrize(
    "user",
    [
        {"token": "secret"},
        {"client-certificate-data": b64(CERT), "client-key-data": b64(KEY)},
    ],
    ids=["token", "client-certificate"],
)
def test_kopf_login_reads_what_kopfs_own_kubeconfig_login_reads(
    user: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The login handler once used kopf.login_with_kubeconfig: the same credentials."""
    monkeypatch.setenv("KUBECONFIG", str(write_kubeconfig(tmp_path / "config", user)))
    settings = kopf.OperatorSettings()
    ours = kube.connection_info(settings)
    kopfs = kopf.login_with_kubeconfig(settings=settings)
    assert ours is not None and kopfs is not None
    assert (ours.server, ours.token, ours.default_namespace) == (
        kopfs.server,
        kopfs.token,
        kopfs.default_namespace,
    )
    assert bool(ours.insecure) == bool(kopfs.insecure)
    assert ours.scheme in (None, "Bearer") and (ours.token is None) == ("token" not in user)
    # kopf keeps the base64 data as given; the kubernetes client writes it to files.
    assert ours.ca_path is not None and kopfs.ca_data is not None
    assert Path(str(ours.ca_path)).read_text() == base64.b64decode(kopfs.ca_data).decode()
    if "client-certificate-data" in user:
        assert Path(str(ours.certificate_path)).read_text() == CERT
        assert Path(str(ours.private_key_path)).read_text() == KEY
