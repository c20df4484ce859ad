"""The model libraries, imported when first needed, and so that the garbage collector leaves them alone.

Importing torch, open_clip, transformers and diffusers makes millions of Python objects that live as long as
the process. `import_frozen` imports a module with the collector off (it ran about 1,600 times during those
imports), collects the garbage once, and then freezes what exists (`gc.freeze`): no later collection
walks those objects again, and the processes forked to draw figures do not copy their memory pages by touching
them. A fresh 2-image tiny run on 2 CPU cores took 10.5-12 s before, 8.4-9.1 s after (docs/benchmarks.md).

`Library` is a module imported (frozen) at its first attribute: open_clip (with torchvision and transformers)
when the first encoder is built, diffusers when the first decoder is, scipy.stats when a study correlates. A run
starts its first stage with torch imported and nothing more (about 2 s after the process starts on 2 CPU
cores, against 4 s when `dsl_cli.run` imported them all), and one that decodes nothing never imports diffusers.

Freezing is for processes dsl owns: its commands and jobs (`own_the_collector`). Called as a library
(`import dsl_cli as dsl` in a notebook), dsl imports plainly and leaves the caller's collector alone: a freeze
would also keep the caller's objects out of every later collection.
"""

from __future__ import annotations

import gc
import importlib
import sys
import threading
from contextlib import nullcontext
from types import ModuleType
from typing import Any

from dsl_cli.errors import STOP_SIGNALS, deferred_stops, raise_if_stopped
from dsl_cli.logs import library_imported

_OWN_PROCESS = False  # set by `own_the_collector`


def own_the_collector() -> None:
    """This process is a dsl command's or job's: from now on `import_frozen` freezes what it imports."""
    global _OWN_PROCESS
    _OWN_PROCESS = True


def import_frozen(name: str) -> ModuleType:
    """`importlib.import_module(name)`; its first import with the collector off, then `gc.freeze()` (and its
    logs routed, in a job), in a process dsl owns (`own_the_collector`). A later call changes nothing, and a
    collector that was off stays off.

    Garbage is collected before the freeze (0.2 to 0.3 s for open_clip on 2 CPU cores; what an earlier freeze
    holds is not walked again): the exceptions libraries catch while importing hold their frames, and each
    frame its caller's, up to the code that asked for the library. Frozen, they would keep that code's locals
    for good: the first encoder and decoder built in a process were never freed."""
    first, collecting = name not in sys.modules, gc.isenabled()
    freezing = first and _OWN_PROCESS
    with _stops_wait(freezing):
        try:
            if freezing:
                gc.disable()
            module = importlib.import_module(name)
        finally:
            if freezing:
                try:  # an exception in the collection leaves the collector on all the same
                    gc.collect()  # all generations: garbage older than the import would be frozen too
                    gc.freeze()
                finally:
                    if collecting:
                        gc.enable()
    if freezing:
        raise_if_stopped()
    if first:
        library_imported()  # in a job, its logs go where the other libraries' go
    return module


def _stops_wait(importing: bool):
    """In dsl's own process, a stop signal during a library's first import is raised when the import has
    ended: raised inside it, the exception could land in C++ code that calls back into Python (torch's
    bindings, importing torch.distributed), where it ended the process (std::terminate, exit status 134, the
    run's lock and a `started` manifest left behind) about once in 25 Ctrl-Cs in a run's first seconds."""
    if importing and threading.current_thread() is threading.main_thread():  # handlers: the main thread's only
        return deferred_stops(STOP_SIGNALS)
    return nullcontext()


class Library:
    """A module imported (`import_frozen`) at its first attribute: `diffusers = Library("diffusers")`, then
    `diffusers.VQModel`. `Library.attribute(library, "Name")` is a class attribute that does the same when read."""

    def __init__(self, name: str):
        self.name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(import_frozen(self.name), attr)

    class attribute:
        """A class attribute that is `library.name`, looked up when it is read."""

        def __init__(self, library: "Library", name: str):
            self.library, self.name = library, name

        def __get__(self, obj: Any, owner: type) -> Any:
            return getattr(self.library, self.name)
