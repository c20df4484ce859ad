"""What a run prints: dsl's own messages and its labelled progress bars. Whatever the libraries log
(diffusers, open_clip, huggingface_hub) and Python warnings go to the run's log file (`dsl.log`) only.

Hydra configures the logging of a job (run.yaml, `hydra.job_logging`): a console handler, which
`TerminalFilter` limits to dsl and Hydra, and a file handler that takes every record.
"""

from __future__ import annotations

import logging

OWN = ("dsl_cli", "hydra", "__main__")  # loggers whose records reach the terminal
LIBRARIES = ("diffusers", "huggingface_hub", "transformers", "open_clip")


class TerminalFilter(logging.Filter):
    """Pass only records of dsl's and Hydra's own loggers (open_clip logs to the root logger)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.split(".")[0] in OWN


def route_library_logs() -> None:
    """Send the libraries' log records and Python warnings through the root logger's handlers (so the file
    gets them and `TerminalFilter` keeps them off the terminal); switch off diffusers' own progress bars."""
    logging.captureWarnings(True)
    for name in LIBRARIES:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):  # diffusers and huggingface_hub print to stderr themselves
            if type(handler) is logging.StreamHandler:
                logger.removeHandler(handler)
        logger.propagate = True
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()  # "Loading pipeline components": the decoder stage has its own
