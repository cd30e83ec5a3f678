"""`python -m mlkube.flows.train --spec-json '<TrainingRun as JSON>'`: a RayJob's entrypoint."""

from mlkube.cli import run
from mlkube.flows.train import entrypoint_parser

if __name__ == "__main__":
    run(parser=entrypoint_parser())
