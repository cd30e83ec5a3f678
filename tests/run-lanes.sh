#!/usr/bin/env bash
# The whole suite as `make test` runs it: the real-node lane (tests/node) in the background,
# beside everything else (unit, integration, e2e) in the foreground. The node lane spends
# most of its time waiting for pods, controllers and probes, so the two together take little
# more than the longer of them instead of their sum. Each is its own pytest session (its own
# HOME, MLflow, Ray and network guard); neither uses the other's ports or processes.
# Usage: tests/run-lanes.sh [--first COMMAND] PYTHON [pytest args for both lanes...]
# COMMAND (make test: `make lint`) runs in the foreground before the other tests, while the
# node lane already starts its node; it failing fails the run, after both lanes ran.
set -uo pipefail

cd "$(dirname "$0")/.."
first=""
if [[ ${1:-} == --first ]]; then
    first=$2
    shift 2
fi
py=$1
shift
log=$(mktemp -t mlkube-node-lane.XXXXXX)
started=$SECONDS

echo "run-lanes: node lane started in the background (tests/node; log: $log)"
"$py" -m pytest -q -p no:cacheprovider --durations=10 "$@" tests/node >"$log" 2>&1 &
node_pid=$!
# Stop the node lane too when this script is interrupted (its fixtures tear the node down).
trap 'kill -INT "$node_pid" 2>/dev/null; wait "$node_pid"; exit 130' INT TERM

first_status=0
if [[ -n $first ]]; then
    bash -c "$first"
    first_status=$?
fi
"$py" -m pytest -q -p no:cacheprovider --durations=15 --ignore=tests/node "$@" tests
rest=$?

while kill -0 "$node_pid" 2>/dev/null; do
    progress=$(grep -oE '^[.FEsx]+' "$log" | tr -d '\n')
    echo "run-lanes: waiting for the node lane: ${#progress} tests done ($progress), $((SECONDS - started)) s"
    sleep 60
done
wait "$node_pid"
node=$?

echo
echo "======================== node lane (tests/node) ========================"
cat "$log"
echo "run-lanes: ${first:+$first exit $first_status, }rest exit $rest, node lane exit $node," \
    "$((SECONDS - started)) s in all"
rm -f "$log"
if [[ $first_status -ne 0 ]]; then exit "$first_status"; fi
if [[ $rest -ne 0 ]]; then exit "$rest"; fi
exit "$node"
