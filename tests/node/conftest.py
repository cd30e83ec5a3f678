"""The real-node lane: one node per session (tests/cluster/node.py), real pods.

Each test gets a fresh namespace. After every test the node's guard is read: a pod or a
node daemon that tried to reach anything beyond the machine fails the test that did it,
unless the test is marked `expects_escape` (it then checks the record and clears it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.addresses import HOST_IP, POD_CIDR
from tests.cluster.controllers import start_kserve, start_kuberay
from tests.cluster.controlplane import BinariesMissing, namespace_for_test
from tests.cluster.images import image_archives
from tests.cluster.node import Node, machine_state
from tests.cluster.objectstore import ObjectStore
from tests.cluster.postgres import Postgres

NODE_DIR = Path(__file__).resolve().parent


# The lane's order, to install the chart and start the node as few times as possible: the
# node's own tests, the tests sharing the lane's release, then the two that install a
# release of their own (team setup uninstalls the shared one, the user's path uninstalls its
# own), and last the test that stops the node. Files not named here go with the shared ones.
LANE_ORDER = ("test_node.py", "*", "test_team_setup.py", "test_user_path.py")
LAST = "test_stopping_the_node_leaves_nothing_behind"


def lane_position(item: pytest.Item) -> int:
    if getattr(item, "originalname", item.name) == LAST:
        return len(LANE_ORDER)
    return LANE_ORDER.index(item.path.name if item.path.name in LANE_ORDER else "*")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if NODE_DIR in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.node)
    if all(NODE_DIR in Path(str(item.path)).parents for item in items):
        items.sort(key=lane_position)  # stable: each file keeps its own order


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
        # Servers on the host beside the node (object store, database), by name.
        self.services: dict[str, Any] = {}

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

    def service(self, name: str, make: Callable[[Node], Any]) -> Any:
        """A server on the host, started once for the current node (again after a test
        restarted the node), stopped with the session."""
        assert self.node is not None
        found = self.services.get(name)
        if found is None or not found.alive():
            if found is not None:
                found.stop()
            found = make(self.node)
            self.services[name] = found
            try:
                found.start()
            except BaseException:
                found.stop()
                del self.services[name]
                raise
        return found

    def stop(self) -> None:
        for found in self.services.values():
            found.stop()
        self.services.clear()
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


@pytest.fixture
def object_store(node: Node, node_session: NodeSession) -> ObjectStore:
    """versitygw on the host, bound to the bridge address (pods reach it there, as they
    reach the API server), in the node's cgroup (the guard sees what it sends)."""
    store: ObjectStore = node_session.service(
        "object-store", lambda n: ObjectStore(HOST_IP, spawn_with=n.spawn)
    )
    return store


@pytest.fixture
def postgres(node: Node, node_session: NodeSession) -> Postgres:
    """PostgreSQL on the host, bound to the bridge address, letting the pod range in."""
    server: Postgres = node_session.service(
        "postgres", lambda n: Postgres(HOST_IP, clients=(POD_CIDR,), spawn_with=n.spawn)
    )
    return server
