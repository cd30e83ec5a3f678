from mlkube.cli import run

run()
