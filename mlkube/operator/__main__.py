"""`python -m mlkube.operator`: `mlkube operator ...`, `run` when no subcommand is given."""

from mlkube.operator.commands import main

if __name__ == "__main__":
    raise SystemExit(main())
