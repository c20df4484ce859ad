"""What a run prints: dsl's own messages and its labelled progress bars. Whatever the libraries log
(diffusers, open_clip, huggingface_hub) and Python warnings go to the run's log file (`dsl.log`) only.

Hydra configures the logging of a job (run.yaml, `hydra.job_logging`): a console handler, which
`TerminalFilter` limits to dsl and Hydra, and a file handler that takes every record.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from dsl_cli.errors import printable

OWN = ("dsl_cli", "hydra", "__main__")  # loggers whose records reach the terminal
LIBRARIES = ("diffusers", "huggingface_hub", "transformers", "open_clip")


class TerminalFilter(logging.Filter):
    """Pass only records of dsl's and Hydra's own loggers (open_clip logs to the root logger)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.split(".")[0] in OWN


class SweepTerminalFilter(TerminalFilter):
    """The terminal of a --multirun outside its jobs (Hydra's own logging then): dsl's and Hydra's lines, and
    a library's warning once (submitit's `Bypassing sacct error` came once per status poll, 7 times a sweep),
    its numbers aside; the libraries' other lines stay off the terminal."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if super().filter(record):
            return True
        if record.levelno < logging.WARNING:
            return False
        key = (record.name, re.sub(r"\d+", "#", record.getMessage()))
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


class PrintableFormatter(logging.Formatter):
    """The terminal's lines with every character a terminal would act on escaped (`errors.printable`): a
    message names folders and images, and a name must not forge output (a newline, an escape sequence).
    Tabs that begin a message are its writer's indentation (Hydra's `\t#0 : layer=0` for each job of a
    sweep), not a name's: they stay tabs (they were shown as `\t`)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        message = record.message  # each formatter's format() sets it anew from the record
        indent = len(message) - len(message.lstrip("\t"))
        record.message = message[:indent] + printable(message[indent:])
        return super().formatMessage(record)


class SourceFormatter(PrintableFormatter):
    """Lines labelled by who says them: `[time][HYDRA]` for Hydra's, `[time][dsl_cli.sweeps]` for dsl's and
    `[time][submitit]` for a library's (Hydra's default labels every line of a sweep `[HYDRA]`)."""

    def __init__(self, **ignored) -> None:  # Hydra's default `format` is passed along: this one replaces it
        super().__init__("[%(asctime)s][%(source)s] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        record.source = "HYDRA" if record.name.split(".")[0] == "hydra" else record.name
        return super().format(record)


_routing = False  # whether a job routes the libraries' logs (then a library imported later is routed too)


def route_library_logs() -> None:
    """Send the libraries' log records and Python warnings through the root logger's handlers (so the file
    gets them and `TerminalFilter` keeps them off the terminal); switch off diffusers' own progress bars. A
    library imported later (diffusers, when the first decoder is built) is routed as it is imported
    (`library_imported`)."""
    global _routing
    _routing = True
    logging.captureWarnings(True)
    for name in LIBRARIES:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):  # diffusers and huggingface_hub print to stderr themselves
            if type(handler) is logging.StreamHandler:
                logger.removeHandler(handler)
        logger.propagate = True
    if "diffusers" in sys.modules:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()  # "Loading pipeline components": the decoder stage has its own
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # "Loading weights": the stage is dsl's to show


@contextmanager
def own_lines_only() -> Iterator[None]:
    """A command that is no run's job (`dsl check`, whose logging Hydra does not set up) prints what a run's
    terminal shows: dsl's own warnings, one line each, and none of the libraries' records, Python warnings or
    loading bars (which a run keeps in its dsl.log; such a command has no folder to keep them in). Undone on
    leaving, for a process that goes on (a test's)."""
    global _routing
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))  # as Python's last-resort handler printed them
    handler.setLevel(logging.WARNING)
    handler.addFilter(TerminalFilter())
    routing, capturing = _routing, _capturing()
    logging.root.addHandler(handler)
    route_library_logs()
    try:
        yield
    finally:
        logging.root.removeHandler(handler)
        _routing = routing
        logging.captureWarnings(capturing)


def _capturing() -> bool:
    """Whether Python warnings already go to the `py.warnings` logger (`logging.captureWarnings(True)`)."""
    import warnings

    return getattr(warnings.showwarning, "__module__", "") == "logging"


def library_imported() -> None:
    """After a library's first import (`dsl_cli.libraries`): its logs routed as the others', in a job."""
    if _routing:
        route_library_logs()


def close_file_logs(path: str | os.PathLike) -> None:
    """Detach and close the root logger's handlers that write to `path` (a run's dsl.log that is about to be
    deleted): in a process that goes on (a notebook, a test), a later record would create the file again,
    or fail on a folder that is gone."""
    for handler in logging.root.handlers[:]:
        if isinstance(handler, logging.FileHandler) and handler.baseFilename == os.path.abspath(path):
            logging.root.removeHandler(handler)
            handler.close()
