"""A spec's mlflow.trackingUri: used only on an allowed host, never with the operator's
credentials; refused with one line that names the field."""

from __future__ import annotations

import pytest

from mlkube.operator.settings import OperatorSettings
from mlkube.operator.tracking import TrackingUriNotAllowed, tracking_target

OWN = "http://mlflow.mlkube:5000"


def test_the_operators_own_uri_carries_its_credentials() -> None:
    assert tracking_target(None, OWN, []).model_dump() == {"uri": OWN, "credentials": True}
    assert tracking_target(OWN + "/", OWN, []).credentials is True
    # The same host and port with another path is still the user's URI, not ours.
    other_path = tracking_target(OWN + "/mine", OWN, [])
    assert (other_path.uri, other_path.credentials) == (OWN + "/mine", False)


def test_an_allowed_host_is_read_without_credentials() -> None:
    allowed = ["mlflow.team-a", "shared.example:443"]
    target = tracking_target("http://MLflow.team-a:5000/", OWN, allowed)
    assert (target.uri, target.credentials) == ("http://MLflow.team-a:5000", False)
    assert tracking_target("https://shared.example:443", OWN, allowed).credentials is False


@pytest.mark.parametrize(
    ("uri", "why"),
    [
        # The attack of issue 13: any host, the API path made a fragment by '#'.
        ("http://attacker.example/steal#", "a query or fragment"),
        ("http://attacker.example/steal", "host 'attacker.example' is not one"),
        ("http://mlflow.mlkube:5000/x#", "a query or fragment"),
        ("http://mlflow.mlkube:5000/?a=b", "a query or fragment"),
        ("http://mlflow.mlkube:6000", "host 'mlflow.mlkube' is not one"),
        ("http://shared.example:80", "host 'shared.example' is not one"),
        ("http://u:p@mlflow.mlkube:5000", "credentials in the URI"),
        ("sqlite:////var/run/secrets/x.db", "only http and https"),
        ("file:///etc", "only http and https"),
        ("http:///nohost", "host '' is not one"),
    ],
)
def test_other_uris_are_refused_with_the_field_named(uri: str, why: str) -> None:
    with pytest.raises(TrackingUriNotAllowed) as refused:
        tracking_target(uri, OWN, ["shared.example:443"])
    message = str(refused.value)
    assert message.startswith("spec.mlflow.trackingUri: ") and why in message
    assert "\n" not in message


def test_the_allow_list_is_an_operator_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLKUBE_OPERATOR_MLFLOW_ALLOWED_HOSTS", '["mlflow.team-a", "x:1"]')
    assert OperatorSettings().mlflow_allowed_hosts == ["mlflow.team-a", "x:1"]
    monkeypatch.delenv("MLKUBE_OPERATOR_MLFLOW_ALLOWED_HOSTS")
    assert OperatorSettings().mlflow_allowed_hosts == []
