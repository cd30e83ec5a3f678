"""The real test node's address ranges (tests/cluster/node.py), kept apart so that the
session's network guard can allow them without importing the node's machinery."""

BRIDGE = "mlkube0"
POD_CIDR = "10.244.0.0/24"
HOST_IP = "10.244.0.1"  # the bridge's own address: apiserver, CoreDNS and kubelet listen here
SERVICE_CIDR = "10.96.0.0/24"
SERVICE_IP = "10.96.0.1"
# Both ranges live on this machine only: pod traffic to anything else is dropped.
LOCAL_NETWORKS = (POD_CIDR, SERVICE_CIDR)
