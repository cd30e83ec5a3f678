"""A pre-imported train flow on a warm Ray cluster's head (a "zygote"), and its thin client.

A new Python process that imports the train flow spends most of its first 8 s importing
MLflow, pandas and Prefect; Ray's job submission starts one for every RayJob. On a warm
head, `python -m mlkube.flows.zygote serve MODULE` imports MODULE once (it never starts Ray
or Prefect clients) and listens on a Unix socket in a private directory (mode 0700). A
RayJob's entrypoint there is `python -m mlkube.flows.zygote run MODULE ARGS...`: it sends
its arguments, environment, working directory and its stdin/stdout/stderr (SCM_RIGHTS) to
the zygote, which forks a child that runs `python -m MODULE ARGS...` on those descriptors.
The client forwards the signals it gets to the child's process group and exits as the
child did (the same code, or killed by the same signal). Each run is a process of its own;
the zygote reaps them, and kills a child whose client went away (a job stopped with
SIGKILL).

Whenever the zygote can't take the run (not started yet, crashed, another Python, or an
environment variable that the imports read differs) the client says so in one line on
stderr and execs `python -m MODULE ARGS...` itself: the optimisation never fails a run.

Standard library only: the client has to start in a fraction of a second.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import runpy
import selectors
import signal
import socket
import stat
import struct
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

PROG = "mlkube.flows.zygote"
STDIO = (0, 1, 2)
# Signals the client passes on to the child (SIGKILL can't be caught: the zygote sees the
# client's connection close and kills the child itself).
FORWARDED_SIGNALS = (
    signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2
)  # fmt: skip
# Variables read while the zygote imported its modules (Prefect's settings, the module
# search path, the dynamic loader): a run whose value differs is not the same program,
# so it runs the plain way. PYTHONUNBUFFERED is applied in the child, and PYTHONBREAKPOINT
# (which ray.init sets in the job supervisor, hence in every job) is read by breakpoint().
IMPORT_TIME_ENV_PREFIXES = ("PREFECT_", "PYTHON", "LD_")
APPLIED_IN_CHILD = frozenset({"PYTHONUNBUFFERED", "PYTHONBREAKPOINT"})
REQUEST_TIMEOUT_SECONDS = 10.0
_LENGTH = struct.Struct("!I")


class ZygoteError(Exception):
    """The zygote can't serve (its socket directory is not private, say)."""


@dataclass
class Request:
    """What a client asks for: run `python -m module *args` as it would have itself."""

    module: str
    args: list[str]
    env: dict[str, str]
    cwd: str
    executable: str
    blocked_signals: list[int] = field(default_factory=list)

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> Request:
        return cls(
            module=str(document["module"]),
            args=[str(a) for a in document["args"]],
            env={str(k): str(v) for k, v in document["env"].items()},
            cwd=str(document["cwd"]),
            executable=str(document["executable"]),
            blocked_signals=[int(s) for s in document.get("blocked_signals", [])],
        )


def refusal(served_module: str, import_env: dict[str, str], request: Request) -> str | None:
    """Why the zygote must not run this request (the client then runs it the plain way)."""
    if request.module != served_module:
        return f"it serves {served_module}, not {request.module}"
    if os.path.realpath(request.executable) != os.path.realpath(sys.executable):
        return f"it runs {sys.executable}, not {request.executable}"
    for name in sorted(set(import_env) | set(request.env)):
        read_at_import = name.startswith(IMPORT_TIME_ENV_PREFIXES) and name not in APPLIED_IN_CHILD
        if read_at_import and import_env.get(name) != request.env.get(name):
            return f"{name} differs from the zygote's"
    return None


def _send_line(conn: socket.socket, message: dict[str, Any]) -> None:
    conn.sendall(json.dumps(message).encode() + b"\n")


def _recv_exactly(conn: socket.socket, size: int) -> bytes:
    chunks: list[bytes] = []
    while size:
        chunk = conn.recv(min(size, 1 << 16))
        if not chunk:
            raise ConnectionError("the client closed the connection mid-request")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def private_directory(path: str) -> None:
    """Makes (or checks) a directory only this user can enter: the socket's, so that nobody
    else on the machine can ask the zygote for a run."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise ZygoteError(f"{path}: not a directory of this user")
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(path, 0o700)


# --- the zygote ---------------------------------------------------------------------------


@dataclass
class _Run:
    pid: int
    conn: socket.socket | None
    buffer: bytes = b""


class Zygote:
    """Imports `module` (and `preload`), then forks a child per request. `serve` returns only
    in a child, with the request it is to run; the zygote itself serves until killed."""

    def __init__(self, module: str, socket_path: str, preload: Sequence[str] = ()) -> None:
        self.module = module
        self.socket_path = socket_path
        self.preload = [module, *preload]
        self.runs: dict[int, _Run] = {}

    def serve(self) -> Request:
        for name in self.preload:
            importlib.import_module(name)
        import_env = dict(os.environ)
        private_directory(os.path.dirname(self.socket_path) or ".")
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)  # a crashed zygote's
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.socket_path)
        listener.listen(16)
        wake_read, wake_write = os.pipe()
        os.set_blocking(wake_read, False)
        os.set_blocking(wake_write, False)
        signal.set_wakeup_fd(wake_write)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes the selector through the pipe
        selector = selectors.DefaultSelector()
        selector.register(listener, selectors.EVENT_READ, "accept")
        selector.register(wake_read, selectors.EVENT_READ, "reap")
        print(f"{PROG}: {self.module} imported; serving on {self.socket_path}", flush=True)
        while True:
            for key, _ in selector.select():
                if key.data == "accept":
                    conn, _ = listener.accept()
                    child = self._start(conn, import_env, selector)
                    if child is not None:  # in the forked child from here on
                        selector.close()
                        listener.close()  # by its object: a bare close would leave it to
                        os.close(wake_read)  # close a reused descriptor when collected
                        os.close(wake_write)
                        return child
                elif key.data == "reap":
                    with contextlib.suppress(BlockingIOError):
                        os.read(wake_read, 4096)
                    self._reap(selector)
                else:
                    self._from_client(key.data, selector)

    def _start(
        self, conn: socket.socket, import_env: dict[str, str], selector: selectors.BaseSelector
    ) -> Request | None:
        """Reads a request and forks its child; returns the request in the child, None in
        the zygote."""
        fds: list[int] = []
        try:
            conn.settimeout(REQUEST_TIMEOUT_SECONDS)
            uid = struct.unpack("3i", conn.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[1]  # fmt: skip
            if uid != os.getuid():
                raise ConnectionError(f"a client of uid {uid}")
            head, fds, _, _ = socket.recv_fds(conn, _LENGTH.size, len(STDIO))
            if len(head) != _LENGTH.size or len(fds) != len(STDIO):
                raise ConnectionError("a malformed request")
            (size,) = _LENGTH.unpack(head)
            request = Request.from_json(json.loads(_recv_exactly(conn, size)))
            reason = refusal(self.module, import_env, request)
            if reason:
                _send_line(conn, {"refused": reason})
                raise ConnectionError(reason)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
        except (OSError, ValueError, KeyError, TypeError) as error:
            print(f"{PROG}: request not taken: {error}", file=sys.stderr, flush=True)
            for fd in fds:
                os.close(fd)
            conn.close()
            return None
        if pid == 0:
            self._become_child(conn, fds, request)
            return request
        # Also done in the child, whichever runs first; it may have exited already.
        with contextlib.suppress(OSError):
            os.setpgid(pid, pid)
        for fd in fds:
            os.close(fd)
        self.runs[pid] = _Run(pid, conn)
        print(f"{PROG}: run {pid} forked", flush=True)  # the head's log shows who ran it
        conn.setblocking(False)
        selector.register(conn, selectors.EVENT_READ, pid)
        with contextlib.suppress(OSError):  # a client gone is seen as end of file
            _send_line(conn, {"pid": pid})
        return None

    def _become_child(self, conn: socket.socket, fds: list[int], request: Request) -> None:
        os.setpgid(0, 0)
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for other in self.runs.values():
            if other.conn is not None:
                other.conn.close()
        conn.close()
        for target, fd in zip(STDIO, fds, strict=True):
            os.dup2(fd, target)
            os.close(fd)
        signal.pthread_sigmask(signal.SIG_SETMASK, request.blocked_signals)

    def _from_client(self, pid: int, selector: selectors.BaseSelector) -> None:
        """Signals to pass on, or the end of the connection: the client is gone, and its run
        with it (as a plain job's process would be killed with its client)."""
        run = self.runs[pid]
        assert run.conn is not None
        try:
            data = run.conn.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            selector.unregister(run.conn)
            run.conn.close()
            run.conn = None
            _kill_group(pid, signal.SIGKILL)
            return
        run.buffer += data
        *lines, run.buffer = run.buffer.split(b"\n")
        for line in lines:
            try:
                signum = int(json.loads(line)["signal"])
            except (ValueError, KeyError, TypeError):
                continue
            if signum in FORWARDED_SIGNALS:
                _kill_group(pid, signum)

    def _reap(self, selector: selectors.BaseSelector) -> None:
        while self.runs:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            run = self.runs.pop(pid, None)
            if run is None or run.conn is None:
                continue
            if os.WIFSIGNALED(status):
                end = {"signal": os.WTERMSIG(status)}
            else:
                end = {"exit": os.waitstatus_to_exitcode(status)}
            selector.unregister(run.conn)
            try:
                run.conn.setblocking(True)
                _send_line(run.conn, end)
            except OSError:
                pass
            run.conn.close()


def _kill_group(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signum)


def apply_thread_limit(omp_num_threads: str | None) -> None:
    """Native thread pools (OpenMP, BLAS) read OMP_NUM_THREADS once, as they load: in the
    zygote, before the run's value was known (Ray's job supervisor gives its entrypoint 1).
    The run's value is applied to the pools loaded, as a new process would have read it."""
    threadpoolctl = sys.modules.get("threadpoolctl")  # loaded with scikit-learn
    if threadpoolctl is None or omp_num_threads is None or not omp_num_threads.isdigit():
        return
    threadpoolctl.threadpool_limits(limits=max(1, int(omp_num_threads)))


def run_child(request: Request) -> None:
    """In the forked child: becomes `python -m module *args` as the client would have
    started it (environment, directory, module path, buffering, fresh random state)."""
    zygote_dir = os.getcwd()
    os.environ.clear()
    os.environ.update(request.env)
    os.chdir(request.cwd)
    if sys.path and sys.path[0] in ("", zygote_dir):  # `-m` put the working directory first
        sys.path[0] = request.cwd
    unbuffered = bool(request.env.get("PYTHONUNBUFFERED"))
    encoding, errors = sys.stdout.encoding, sys.stdout.errors
    # New stream objects over the client's descriptors, buffered as a new process's would be
    # (ones made before the fork write to the same descriptors, now the client's).
    sys.stdin = open(0, closefd=False, encoding=sys.stdin.encoding)  # noqa: SIM115
    sys.stdout = open(  # noqa: SIM115
        1, "w", buffering=1 if os.isatty(1) else -1, encoding=encoding, errors=errors,
        closefd=False,
    )  # fmt: skip
    sys.stderr = open(  # noqa: SIM115
        2, "w", buffering=1, encoding=encoding, errors="backslashreplace", closefd=False
    )
    if unbuffered:
        sys.stdout.reconfigure(write_through=True)
    numpy_random = sys.modules.get("numpy.random")
    if numpy_random is not None:
        numpy_random.seed()  # Python's own random reseeds itself in a forked child
    apply_thread_limit(request.env.get("OMP_NUM_THREADS"))
    # runpy warns that the module is imported already: the zygote imported it on purpose.
    warnings.filterwarnings(
        "ignore", f"'{re.escape(request.module)}' found in sys.modules", RuntimeWarning
    )
    sys.argv = [request.module, *request.args]
    runpy.run_module(request.module, run_name="__main__", alter_sys=True)


# --- the client ---------------------------------------------------------------------------


def _request_bytes(module: str, args: Sequence[str]) -> bytes:
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    return json.dumps({
        "module": module,
        "args": list(args),
        "env": dict(os.environ),
        "cwd": os.getcwd(),
        "executable": sys.executable,
        "blocked_signals": sorted(int(s) for s in blocked),
    }).encode()  # fmt: skip


def _stdio_fds() -> list[int]:
    """The client's descriptors 0-2; /dev/null for one that is closed."""
    fds = []
    for fd in STDIO:
        try:
            os.fstat(fd)
            fds.append(fd)
        except OSError:
            fds.append(os.open(os.devnull, os.O_RDWR))
    return fds


def plain_start(module: str, args: Sequence[str], why: str) -> NoReturn:
    print(
        f"{PROG}: no pre-imported {module} ({why}); starting python -m {module}",
        file=sys.stderr,
        flush=True,
    )
    os.execv(sys.executable, [sys.executable, "-m", module, *args])


def end_as(message: dict[str, Any]) -> NoReturn:
    """Exits as the child did: the same code, or killed by the same signal."""
    sys.stdout.flush()
    if "signal" in message:
        signum = int(message["signal"])
        if signum not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(signum, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signum])
        os.kill(os.getpid(), signum)
        os._exit(128 + signum)
    os._exit(int(message["exit"]))


def run_client(socket_path: str, module: str, args: Sequence[str]) -> NoReturn:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(socket_path)
        payload = _request_bytes(module, args)
        socket.send_fds(conn, [_LENGTH.pack(len(payload))], _stdio_fds())
        conn.sendall(payload)
    except OSError as error:
        conn.close()
        plain_start(module, args, f"{socket_path}: {error.strerror or error}")
    reader = conn.makefile("rb")
    pid = 0

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(OSError):
            _send_line(conn, {"signal": signum})

    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, forward)
    while True:
        try:
            line = reader.readline()
        except OSError:
            line = b""
        if not line:
            break
        message = json.loads(line)
        if "refused" in message:
            conn.close()
            plain_start(module, args, f"the zygote refused: {message['refused']}")
        if "pid" in message:
            pid = int(message["pid"])
        if "exit" in message or "signal" in message:
            end_as(message)
    # The zygote went away before its child ended: take the run down with it.
    print(f"{PROG}: lost the zygote; stopping the run", file=sys.stderr, flush=True)
    if pid:
        _kill_group(pid, signal.SIGKILL)
    os._exit(1)


# --- command line -------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="import MODULE once and run it for clients")
    serve.add_argument("--socket", required=True, help="the Unix socket (its directory: 0700)")
    serve.add_argument("--preload", action="append", default=[], help="a module to import too")
    serve.add_argument("module")
    run = commands.add_parser("run", help="python -m MODULE ARGS, through the zygote if up")
    run.add_argument("--socket", required=True)
    run.add_argument("module")
    run.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        run_client(args.socket, args.module, args.args)
    try:
        request = Zygote(args.module, args.socket, args.preload).serve()
    except ZygoteError as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    run_child(request)


if __name__ == "__main__":
    main()
