"""How a run ends when it does not complete: the exceptions that carry the reason, and safe printing of it."""

from __future__ import annotations

import logging  # noqa: F401 - imported before the at-fork hooks below are registered: see `_forking`
import os
import signal
import sys
from contextlib import contextmanager
from typing import Any, Iterator, Sequence


class UserError(Exception):
    """A problem with the user's input or environment: reported as one line, exit status 2.

    resumable: the run's finished work is intact and `dsl run resume=FOLDER` completes it once the cause
    is fixed (a full disk, a folder made read-only); the message then says so.

    details: lines printed each on a line of their own under the message (the missing weights' commands).
    """

    def __init__(self, message: str, resumable: bool = False, details: Sequence[str] = ()):
        super().__init__(message)
        self.resumable = resumable
        self.details = tuple(details)

    def __str__(self) -> str:  # the whole text, as the manifest records it
        return "\n".join((self.args[0], *self.details))


class FolderTaken(UserError):
    """A folder is another run's: a live process writes there, or it holds a run. A folder dsl named after
    the time (the default `hydra.run.dir`) then goes to a sibling; one the user named is refused."""


class Refused(UserError):
    """A continued run refused before its attempt began (a setting or an input image changed since it started):
    nothing of the run was touched, so its manifest keeps the status it had (`job.record_ending`)."""


class PartlyDone(UserError):
    """Of several folders (`dsl report` / `dsl plot` over a folder of runs), some were refused and the rest
    done: `done` is what the work returns when none is refused, `details` names each refused folder and why."""

    def __init__(self, refused: Sequence[tuple[Any, UserError]], total: int, done: Any):
        super().__init__(f"{len(refused)} of {total} folders left as they were (below); the others are done",
                         details=[err.args[0] if str(folder) in err.args[0] else f"{folder}: {err.args[0]}"
                                  for folder, err in refused])
        self.refused, self.total, self.done = tuple(refused), total, done


class Interrupted(KeyboardInterrupt):
    """A signal that asks the run to stop (SIGINT from Ctrl-C, SIGTERM from a scheduler, SIGHUP from a
    closed terminal). A KeyboardInterrupt, so that code which lets Ctrl-C through lets these through too."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.advice: str | None = None  # what to do next, where the code it stopped knows better than "run again"

    @property
    def exit_status(self) -> int:
        """128 + the signal number, as a shell reports a process the signal ended: 130, 143, 129."""
        return 128 + self.signum


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # Ctrl-C, a scheduler, a closed terminal
_stops: list[int] = []  # the stop signals this process's command has received
_forking = False  # while os.fork runs the at-fork hooks (a drawing pool's processes starting)


def _fork_starts() -> None:
    global _forking
    _forking = True


def _fork_ends() -> None:
    global _forking
    _forking = False


# An exception raised inside an at-fork hook (logging's, which takes and releases its lock around each fork) is
# not raised at all: Python prints "Exception ignored in ..." with a traceback and goes on. Hooks run `before` in
# the reverse order of registration and `after_*` in order, so these, registered after logging's, enclose them.
os.register_at_fork(before=_fork_starts, after_in_parent=_fork_ends, after_in_child=_fork_ends)


def stop(signum: int) -> None:
    """What a stop signal's handler does: note the signal, then raise `Interrupted`, unless a stop is being
    handled (its except- or finally-blocks run). A library may swallow the exception (a bare `except:` around
    an optional import, while dsl's imports run in the first seconds); `raise_if_stopped` raises it again
    where dsl's own code goes on, and a later signal raises anew."""
    _stops.append(signum)
    if isinstance(sys.exc_info()[1], KeyboardInterrupt):  # a stop already being handled: its clean-up is not
        return  # broken by a second exception (a second Ctrl-C, a scheduler's SIGTERM after it)
    if _forking:  # raised inside an at-fork hook, it would be a traceback and lost: `raise_if_stopped` raises it
        return
    raise Interrupted(signum)


def catch_stop_signals(signums: Sequence[int], handler) -> dict[int, Any]:
    """Install `handler` for each of `signums` that is not ignored; return the handlers it replaced (to put
    back). An ignored one stays ignored: `nohup dsl run ... &` ignores SIGHUP, a script's `dsl run ... &`
    SIGINT, and the run must outlive the terminal, or a Ctrl-C meant for the script's foreground."""
    return {signum: signal.signal(signum, handler) for signum in signums
            if signal.getsignal(signum) is not signal.SIG_IGN}


@contextmanager
def stop_handler(signums: Sequence[int], handler) -> Iterator[None]:
    """`catch_stop_signals` for the block; the handlers it replaced come back after it."""
    previous = catch_stop_signals(signums, handler)
    try:
        yield
    finally:
        for signum, replaced in previous.items():
            signal.signal(signum, replaced)


def deferred_stops(signums: Sequence[int]):
    """While the block runs, a stop signal is only noted, and `raise_if_stopped` raises it where dsl's own
    code goes on: for a library's code that an exception raised mid-statement leaves broken (a SIGTERM in
    Hydra's set-up of a run became an UnboundLocalError inside OmegaConf, a traceback and exit status 1)."""
    return stop_handler(signums, lambda signum, frame: _stops.append(signum))


def raise_if_stopped() -> None:
    """Raise `Interrupted` again for a stop signal whose exception something swallowed."""
    if _stops:
        raise Interrupted(_stops[-1])


def clear_stops() -> None:
    """Once a command has handled its stop: the next one in this process (a test's, a notebook's in-process
    `dsl`, a direct `run()`) starts with none."""
    _stops.clear()


def printable(text: str) -> str:
    """`text` with every character a terminal would act on (newline, escape sequences, bidi overrides,
    undecodable bytes) written as a Python escape, so that a file name cannot forge output."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def report(message: "str | UserError", prefix: str = "") -> None:
    """The line a failure prints, `dsl: error: ...` on stderr, safe to show whatever names it holds; a
    UserError's details follow, each escaped on a line of its own."""
    head, details = (message.args[0], message.details) if isinstance(message, UserError) else (message, ())
    print("\n".join([f"dsl: error: {printable(prefix + head)}", *map(printable, details)]), file=sys.stderr)


def bug_message(err: Exception) -> str:
    """The one line for an exception dsl did not expect (exit status 1): a bug in dsl, or in a plugin's code
    (a lens, study or decoder family registered from outside the package), which the line then names."""
    where = _plugin_frame(err)
    whose = "a bug in dsl" if where is None else f"in code outside dsl, {where}"
    return f"internal error ({whose}), {type(err).__name__}: {err}; hydra.verbose=true shows the traceback"


def _plugin_frame(err: BaseException) -> str | None:
    """`file:line in function` of the innermost frame of `err`'s traceback that is neither dsl's nor an installed
    library's nor Python's own (a plugin's lens or study that raised); None where there is none."""
    import sysconfig
    import traceback

    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    installed = tuple({os.path.abspath(sysconfig.get_paths()[key]) + os.sep for key in ("stdlib", "purelib", "platlib")})
    for frame in reversed(traceback.extract_tb(err.__traceback__)):
        path = os.path.abspath(frame.filename)
        if not path.startswith((package, *installed)) and not frame.filename.startswith("<"):
            return f"{frame.filename}:{frame.lineno} in {frame.name}"
    return None
