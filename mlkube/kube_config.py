"""Where mlkube's Kubernetes credentials come from, one rule for the operator and the flows:
in a pod, its service account; elsewhere $KUBECONFIG, or ~/.kube/config when it is unset.

$KUBECONFIG is read at each call: the kubernetes client fixes its default path when it is
imported. Imports only kubernetes (the bottom layer: the operator and the flows use it).
"""

from __future__ import annotations

import os
from pathlib import Path

from kubernetes import client, config

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def client_configuration() -> client.Configuration:
    """Credentials and server by the rule above; ConfigException when there are none."""
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        config.load_kube_config(
            config_file=os.environ.get("KUBECONFIG"), client_configuration=configuration
        )
    return configuration


def api_client() -> client.ApiClient:
    """A client of its own (a context manager: `with api_client() as api: ...`)."""
    return client.ApiClient(client_configuration())


def current_namespace() -> str:
    """In a pod: its own; elsewhere the kubeconfig's current context's, else `default`."""
    if SERVICE_ACCOUNT_NAMESPACE.exists():
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
    try:
        _, active = config.list_kube_config_contexts(config_file=os.environ.get("KUBECONFIG"))
    except (config.ConfigException, OSError):
        return "default"
    return str((active or {}).get("context", {}).get("namespace") or "default")
