"""`dsl` processes for the tests, forked from an interpreter that has already imported the model libraries.

Each `dsl` a test starts in a process of its own would spend about 5 CPU seconds importing torch, diffusers
and open_clip before its first line runs; on the 2-core reference machine that was a third of the suite. A
*zygote* (one per pytest process) imports those third-party libraries once, and no module of dsl_cli; each
`dsl ARGS` is then a child forked from it, which imports dsl_cli and runs `main()` as the installed `dsl`
script does, with the test's working folder, environment and standard streams (passed over a Unix socket).
It is a process of its own: its pid takes signals, kills and `killpg`, it exits as Python exits (atexit,
non-daemon threads, the status of an uncaught signal).

What a fresh interpreter would do differently is avoided, not emulated: a request whose environment differs
from the zygote's in a variable the libraries read when imported (HF_*, TORCH_*, PYTHON*, HOME, ...) runs as
an ordinary subprocess, and so does any command that is not the installed `dsl`. The tests about start-up
itself (how long it takes, what it imports, signals in its first second) start the real script on purpose.

    from zygote import popen, run
    result = run([DSL, "run", "debug=tiny"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
"""

from __future__ import annotations

import array
import atexit
import io
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

DSL = str(Path(sys.executable).parent / "dsl")
# environment variables the preloaded libraries (or Python itself) read when they are imported or start
IMPORT_TIME = ("HF_", "HUGGINGFACE", "TRANSFORMERS", "DIFFUSERS", "TORCH", "PYTORCH", "CUDA", "OMP_", "MKL_",
               "PYTHON", "MPL", "XDG_", "OPENBLAS", "TIMM", "HOME", "TMPDIR", "LANG", "LC_", "TZ")
PRELOADED = ("torch", "torchvision", "diffusers", "open_clip", "transformers", "timm", "hydra", "omegaconf",
             "matplotlib.pyplot", "scipy.stats", "PIL.Image", "numpy", "submitit")

# The zygote: import the libraries, then serve requests: (json, fds) -> fork a monitor, which forks the dsl
# process, sends its pid, waits for it and sends its wait status. The dsl process leaves the serving loop and
# becomes `dsl` at the top level, so that Python's own exit ends it.
SERVER = r"""
import array, gc, importlib, json, os, signal, socket, sys
gc.disable()
for library in sys.argv[2:]:
    importlib.import_module(library)


# The modules of the libraries that importing dsl_cli's run brings in beyond the ones above (pipelines,
# tokenizers, ...), in the order they were imported: learnt in a child, which imports dsl_cli, so that this
# process imports them and no module of dsl_cli.
def third_party_modules_of_a_run():
    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(read)
        known = set(sys.modules)
        try:
            importlib.import_module("dsl_cli.cli")
            importlib.import_module("dsl_cli.run")
            a_tiny_run()
        finally:
            with os.fdopen(write, "w") as pipe:
                pipe.write("\n".join(m for m in sys.modules if m not in known and m.partition(".")[0] != "dsl_cli"))
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        names = pipe.read().split()
    os.waitpid(child, 0)
    return names


def a_tiny_run():
    # what a run imports as it goes (the pipeline and model classes, Hydra's plugins: about 470 modules, 0.5 s
    # of each tiny run's CPU time): one picture, one step, its output thrown away
    import shutil, tempfile
    folder = tempfile.mkdtemp(prefix="dsl-zygote-learn-")
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    for preset in ("tiny", "tiny_k21", "tiny_unclip", "tiny_timm", "tiny_dinov2"):  # every family
        sys.argv = ["dsl", "run", "debug=" + preset, "images.limit=1", "decode.steps=1", "hydra.run.dir=" + folder]
        try:
            importlib.import_module("dsl_cli.cli").main()
        except BaseException:
            pass
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def import_each(names):
    for name in names:
        try:
            importlib.import_module(name)
        except Exception:  # an alias a library put in sys.modules, not importable by its name: its fork imports it
            pass


import_each(third_party_modules_of_a_run())
gc.freeze()  # as `dsl run` does after these imports (job._load_run): no collection in a fork walks them
gc.enable()
# dsl_cli's bytecode, compiled by the first fork and read by the others (0.07 s of each fork's import of it;
# an environment with PYTHONDONTWRITEBYTECODE set would compile it anew in each)
sys.pycache_prefix, sys.dont_write_bytecode = os.environ.pop("DSL_ZYGOTE_BYTECODE"), False
sys.path[0] = sys.argv[1]  # as the installed script: its own folder first, not the working one
control = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, fileno=int(os.environ.pop("DSL_ZYGOTE_FD")))
sys.stdout.flush(); sys.stderr.flush()


def receive():
    fds = array.array("i")
    message, ancillary, _, _ = control.recvmsg(1 << 20, socket.CMSG_LEN(5 * fds.itemsize))
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
    return (json.loads(message), list(fds)) if message else (None, [])


def serve():
    while True:
        request, fds = receive()
        if request is None:
            os._exit(0)
        monitor = os.fork()
        if monitor == 0:
            control.close()
            worker = os.fork()
            if worker == 0:
                return request, fds
            status_channel = socket.socket(fileno=fds[3])
            for fd in fds[:3]:
                os.close(fd)
            status_channel.sendall(f"{worker}\n".encode())
            _, status = os.waitpid(worker, 0)
            status_channel.sendall(f"{status}\n".encode())
            os._exit(0)
        for fd in fds:
            os.close(fd)
        while True:  # reap the monitors that have ended
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break


request, fds = serve()
if request["new_session"]:
    os.setsid()
[signal.signal(signum, signal.SIG_IGN) for signum in request["ignore"]]  # as `nohup` or a script's `&` leave them
for target, fd in enumerate(fds[:3]):
    os.dup2(fd, target)
for fd in fds:
    os.close(fd)
os.chdir(request["cwd"])
os.environ.clear()
os.environ.update(request["env"])
sys.argv = request["argv"]
del array, gc, importlib, json, signal, socket, control, receive, serve, request, fds
del third_party_modules_of_a_run, a_tiny_run, import_each
from dsl_cli.cli import main
sys.exit(main())
"""


class Zygote:
    """The server process and the socket to it; started on first use, ended with this interpreter."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)  # one message, one request
        self.env = dict(os.environ)
        self.control = ours
        bytecode = tempfile.mkdtemp(prefix="dsl-zygote-bytecode-")
        atexit.register(shutil.rmtree, bytecode, ignore_errors=True)
        self.process = subprocess.Popen(
            [sys.executable, "-c", SERVER, str(Path(DSL).parent), *PRELOADED], pass_fds=[theirs.fileno()],
            env={**self.env, "DSL_ZYGOTE_FD": str(theirs.fileno()), "DSL_ZYGOTE_BYTECODE": bytecode},
            stdin=subprocess.DEVNULL)
        theirs.close()
        self.lock = threading.Lock()

    def serves(self, env: dict[str, str]) -> bool:
        """Whether a fork of this zygote is what a fresh interpreter with `env` would be."""
        keys = {k for k in {*env, *self.env} if k.startswith(IMPORT_TIME)}
        return self.process.poll() is None and all(env.get(k) == self.env.get(k) for k in keys)

    def fork(self, argv: list[str], cwd: str, env: dict[str, str], streams: list[int], new_session: bool,
             ignored: tuple[int, ...]) -> socket.socket:
        """Ask for a dsl process; -> the socket on which its pid, then its wait status, arrive."""
        ours, theirs = socket.socketpair()
        message = json.dumps({"argv": argv, "cwd": cwd, "env": env, "new_session": new_session,
                              "ignore": list(ignored)}).encode()
        with self.lock:
            self.control.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                              array.array("i", [*streams, theirs.fileno()]))])
        theirs.close()
        return ours


_zygote: Zygote | None = None


def zygote() -> Zygote:
    global _zygote
    if _zygote is None:
        _zygote = Zygote()
    return _zygote


class ForkedProcess:
    """The part of `subprocess.Popen` the tests use, for a dsl process forked by the zygote."""

    def __init__(self, args: list[str], channel: socket.socket, stdout: io.IOBase | None, stderr: io.IOBase | None):
        self.args, self.stdout, self.stderr, self.stdin = args, stdout, stderr, None
        self.returncode: int | None = None
        self._channel = channel
        self._buffer = b""
        self.pid = int(self._line(None))

    def _line(self, timeout: float | None) -> str | None:
        """The next line from the monitor, or None when none came within `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self._channel], [], [], left)[0]:
                return None
            chunk = self._channel.recv(64)
            if not chunk:
                raise RuntimeError("the zygote's monitor ended without a status")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()

    def poll(self) -> int | None:
        try:
            return self.wait(0)
        except subprocess.TimeoutExpired:
            return None

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            line = self._line(timeout)
            if line is None:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self.returncode = os.waitstatus_to_exitcode(int(line))
            self._channel.close()
        return self.returncode

    def communicate(self, timeout: float | None = None):
        """Read stdout and stderr to their ends (threads, as Popen does without poll) and wait."""
        found: dict[str, object] = {}
        readers = [threading.Thread(target=lambda n=name, s=stream: found.__setitem__(n, s.read()), daemon=True)
                   for name, stream in (("out", self.stdout), ("err", self.stderr)) if stream is not None]
        for reader in readers:
            reader.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        for reader in readers:
            reader.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if reader.is_alive():
                raise subprocess.TimeoutExpired(self.args, timeout)
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        for stream in (self.stdout, self.stderr):
            if stream is not None:
                stream.close()
        return found.get("out"), found.get("err")

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(9)


def _stream(spec, fd: int, ours: list[int]) -> tuple[int, int | None]:
    """(fd to give the child, our read end or None) for a Popen stdout/stderr argument; `ours` collects the
    fds opened here for the child, to close once it has them."""
    if spec is None:
        return fd, None
    if spec == subprocess.DEVNULL:
        ours.append(os.open(os.devnull, os.O_WRONLY))
        return ours[-1], None
    if spec == subprocess.PIPE:
        read, write = os.pipe()
        ours.append(write)
        return write, read
    return (spec if isinstance(spec, int) else spec.fileno()), None


def popen(args: list[str], *, cwd=None, env: dict[str, str] | None = None, stdout=None, stderr=None,
          stdin=None, text: bool = False, start_new_session: bool = False, ignored_signals: tuple[int, ...] = (),
          **kwargs):
    """`subprocess.Popen(args, ...)`, forked from the zygote where it can be (see the module's docstring);
    `ignored_signals` start ignored in the child, as `nohup` (SIGHUP) or a script's `&` (SIGINT) leave them."""
    env = dict(os.environ if env is None else env)
    if (args[0] != DSL or kwargs or stdin not in (None, subprocess.DEVNULL) or os.environ.get("DSL_TESTS_NO_ZYGOTE")
            or not zygote().serves(env)):
        def ignore() -> None:
            for signum in ignored_signals:
                signal.signal(signum, signal.SIG_IGN)

        return subprocess.Popen(args, cwd=cwd, env=env, stdout=stdout, stderr=stderr, stdin=stdin, text=text,
                                start_new_session=start_new_session, preexec_fn=ignore if ignored_signals else None,
                                **kwargs)
    ours = [os.open(os.devnull, os.O_RDONLY)]
    out_fd, out_read = _stream(stdout, 1, ours)
    err_fd, err_read = (out_fd, None) if stderr == subprocess.STDOUT else _stream(stderr, 2, ours)
    try:
        channel = zygote().fork([DSL, *args[1:]], os.path.abspath(cwd or os.getcwd()), env,
                                [ours[0], out_fd, err_fd], start_new_session, tuple(ignored_signals))
    finally:
        for fd in ours:
            os.close(fd)

    def reader(fd: int | None):
        return None if fd is None else open(fd, "r" if text else "rb")

    return ForkedProcess(list(args), channel, reader(out_read), reader(err_read))


def run(args: list[str], *, capture_output: bool = False, timeout: float | None = None,
        **kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run(args, ...)` through `popen`."""
    if capture_output:
        kwargs.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process = popen(args, **kwargs)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise
    return subprocess.CompletedProcess(args, process.returncode, out, err)
