"""Console logging for flows run from the command line."""

from __future__ import annotations

import logging
import os

from mlkube.api.errors import CommandFailed


class DropOneLineErrorTracebacks(logging.Filter):
    """Prefect logs a failed flow's exception with its traceback; for an error whose message
    is for the user (bad input, a failed retrain) the one line is the whole story, so keep
    the message and drop the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], CommandFailed):
            record.exc_info = None
            record.exc_text = None
        return True


def quiet_console(verbose: bool = False) -> None:
    """Call before the first flow runs (and before prefect is imported for the level)."""
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    # Logger filters, not handler filters: Prefect replaces its handlers when it sets up
    # logging again, and a record changed here reaches every handler without a traceback.
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(DropOneLineErrorTracebacks())
