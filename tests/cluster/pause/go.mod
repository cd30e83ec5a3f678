// The pod sandbox binary of the test node (no image registry is reachable here).
module mlkube.io/tests/cluster/pause

go 1.26.0
