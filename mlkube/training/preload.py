"""What a warm head's zygote imports ahead (`--preload mlkube.training.preload`): the model
libraries of every built-in task, where this image has them. A run forked from the zygote
then starts its search without importing scikit-learn: skops walks every scikit-learn module
as it loads (2-5 s on two cores), and a tabular run would otherwise pay for it while it reads
its data and waits for Prefect."""

from __future__ import annotations

import importlib

from mlkube.training.tasks import BUILTIN, installed


def task_modules() -> list[str]:
    """Every built-in task's model modules, each once, in the tasks' order."""
    modules: dict[str, None] = {}
    for make in BUILTIN.values():
        modules.update(dict.fromkeys(make().model_modules))
    return list(modules)


def preload() -> list[str]:
    """Imports the installed task modules; returns their names."""
    present = [name for name in task_modules() if installed(name)]
    for name in present:
        importlib.import_module(name)
    return present


PRELOADED = preload()
