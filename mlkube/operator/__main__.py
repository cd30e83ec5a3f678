"""`python -m mlkube.operator`: `mlkube operator ...`, `run` when no subcommand is given."""

from mlkube.cli import run
from mlkube.operator.commands import module_argv

if __name__ == "__main__":
    run(module_argv())
