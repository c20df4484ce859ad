"""How a run ends when it does not complete: the exceptions that carry the reason, and safe printing of it."""

from __future__ import annotations

import signal
import sys


class UserError(Exception):
    """A problem with the user's input or environment: reported as one line, exit status 2.

    resumable: the run's finished work is intact and `dsl run resume=FOLDER` completes it once the cause
    is fixed (a full disk, a folder made read-only); the message then says so.
    """

    def __init__(self, message: str, resumable: bool = False):
        super().__init__(message)
        self.resumable = resumable


class Interrupted(KeyboardInterrupt):
    """A signal that asks the run to stop (SIGINT from Ctrl-C, SIGTERM from a scheduler, SIGHUP from a
    closed terminal). A KeyboardInterrupt, so that code which lets Ctrl-C through lets these through too."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        """128 + the signal number, as a shell reports a process the signal ended: 130, 143, 129."""
        return 128 + self.signum


def printable(text: str) -> str:
    """`text` with every character a terminal would act on (newline, escape sequences, bidi overrides,
    undecodable bytes) written as a Python escape, so that a file name cannot forge output."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def report(message: str) -> None:
    """The one line a failure prints: `dsl: error: ...` on stderr, safe to show whatever names it holds."""
    print(f"dsl: error: {printable(message)}", file=sys.stderr)


def bug_message(err: Exception) -> str:
    """The one line for an exception dsl did not expect (exit status 1)."""
    return f"internal error (a bug in dsl), {type(err).__name__}: {err}; hydra.verbose=true shows the traceback"
