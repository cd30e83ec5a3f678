"""The real-node lane: one node per session (tests/cluster/node.py), real pods.

Each test gets a fresh namespace. After every test the node's guard is read: a pod or a
node daemon that tried to reach anything beyond the machine fails the test that did it,
unless the test is marked `expects_escape` (it then checks the record and clears it).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster.controllers import start_kserve, start_kuberay
from tests.cluster.controlplane import BinariesMissing, namespace_for_test
from tests.cluster.images import image_archives
from tests.cluster.node import Node, machine_state

NODE_DIR = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if NODE_DIR in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.node)


class NodeSession:
    """The session's node, and the machine as it was before the first start, so that a
    test can stop the node, compare, and start it again."""

    def __init__(self) -> None:
        try:
            self.images = image_archives()
        except FileNotFoundError as e:
            pytest.fail(str(e), pytrace=False)
        self.before = machine_state()
        self.node: Node | None = None

    def start(self) -> Node:
        """The node with the real KubeRay operator and KServe controller."""
        try:
            self.node = Node(images=self.images.values()).start()
        except BinariesMissing as e:
            pytest.fail(str(e), pytrace=False)
        try:
            start_kuberay(self.node)
            start_kserve(self.node)
        except BaseException:
            self.stop()
            raise
        return self.node

    def stop(self) -> None:
        if self.node:
            self.node.stop()
            self.node = None


@pytest.fixture(scope="session")
def node_session() -> Iterator[NodeSession]:
    session = NodeSession()
    session.start()
    try:
        yield session
    finally:
        session.stop()


@pytest.fixture
def node(node_session: NodeSession, request: pytest.FixtureRequest) -> Iterator[Node]:
    current = node_session.node or node_session.start()
    current.assert_alive()
    yield current
    if node_session.node is not current:
        return
    escaped = current.escaped()
    if escaped and request.node.get_closest_marker("expects_escape") is None:
        pytest.fail(
            "traffic beyond the machine was attempted (and dropped): " + ", ".join(escaped),
            pytrace=False,
        )


@pytest.fixture
def images(node_session: NodeSession) -> dict[str, Path]:
    """Image reference -> docker archive, as imported into the node."""
    return node_session.images


@pytest.fixture
def namespace(node: Node, request: pytest.FixtureRequest) -> Iterator[str]:
    name = namespace_for_test(request.node.name, "n")
    node.kubectl("create", "namespace", name)
    try:
        yield name
    finally:
        node.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
def release(node: Node) -> str:
    """The chart installed as docs/install.md says, with its MLflow server: once for the
    lane, shared by the tests that only need it there (each trains and serves models of its
    own name on that MLflow, in a namespace of its own). The user's path installs and
    uninstalls it itself; the next test that needs it installs it again."""
    from tests.node.steps import install_chart, release_installed

    if not release_installed(node):
        install_chart(node)
    return "mlkube"


@pytest.fixture
def model_name(namespace: str) -> str:
    """A registered-model name of this test's own on the lane's shared MLflow."""
    return f"insurance-{namespace.rsplit('-', 1)[-1]}"
