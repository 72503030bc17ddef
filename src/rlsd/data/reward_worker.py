"""A persistent worker process that runs reward functions where a time bound can stop them.

A thread cannot stop a reward that never yields the interpreter lock (a backtracking regular expression, a huge
integer power inside sympy): the waiting thread cannot even wake up. So `guard_reward` sends each bounded call of an
importable reward to this process, one message per call (the whole batch of rows), and kills it (SIGKILL) when the
call overruns; the next call starts a fresh one. The reward runs in the worker's main thread, so signal-based bounds
(math-verify's) work there whatever thread the trainer calls from.

The process is started with `python -P -c`, its module path copied from this process, and this file loaded by its
path alone (neither `rlsd` nor torch is imported unless the reward needs them). It only uses the standard library:
the messages are tuples of built-in values. Callable keyword arguments (TRL's `log_metric`, `log_extra`) are
recorded in the worker and replayed here after the call. On Linux the worker dies with the thread that started it
(a dedicated, long-lived thread), so a killed trainer never leaves a spinning reward behind.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import functools
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

LOAD_TIMEOUT_S = 300.0
"""Bound on starting the worker and importing a reward's module in it; not counted in the reward's own bound."""
_HEADER = struct.Struct(">Q")
_BOOT = (
    "import sys; sys.path[:] = sys.argv[3:]; import importlib.util as u; "
    "s = u.spec_from_file_location('_rlsd_reward_worker', sys.argv[1]); m = u.module_from_spec(s); "
    "sys.modules[s.name] = m; s.loader.exec_module(m); m.serve(int(sys.argv[2]))"
)


class CallTimedOut(Exception):
    """The reward did not return within its bound; the worker was killed."""


class WorkerDied(Exception):
    """The worker process exited while running a reward (a crash, `os._exit`, the kernel's out-of-memory killer)."""


class LoadFailed(Exception):
    """The reward function could not be loaded in the worker (its module does not import there)."""


class NotSendable(Exception):
    """The call's arguments do not pickle, so the call cannot go to the worker."""


class Unsendable(Exception):
    """The reward returned an object that does not pickle (so cannot be a list of rewards): its type and repr."""

    def __init__(self, type_name: str, text: str) -> None:
        self.type_name, self.text = type_name, text
        super().__init__(f"{type_name} ({text})")


# ------------------------------------------------------------------------------------------------ messages
def _send(sock: socket.socket, message: Any) -> None:
    """One length-prefixed pickled message."""
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(_HEADER.pack(len(data)) + data)


def _recv_exact(sock: socket.socket, size: int, deadline: float | None) -> bytes:
    """`size` bytes, waiting at most until `deadline` (monotonic; None: forever)."""
    chunks, left = [], size
    while left:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            sock.settimeout(remaining)
        else:
            sock.settimeout(None)
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _recv(sock: socket.socket, deadline: float | None = None) -> Any:
    """One message (TimeoutError past `deadline`, EOFError when the other side is gone)."""
    (size,) = _HEADER.unpack(_recv_exact(sock, _HEADER.size, deadline))
    return pickle.loads(_recv_exact(sock, size, deadline))


# ------------------------------------------------------------------------------------------------ parent side
def function_blob(func: Callable[..., Any]) -> bytes | None:
    """The reward pickled by reference with the files of its top-level module (for a module that `rlsd` loaded
    from the current folder by its file), or None when the worker could not load it: a lambda, a closure, a
    function of `__main__` (re-running the user's script in the worker would re-run the training), or an object
    that does not pickle. `func._rlsd_in_process = True` keeps a reward in this process."""
    target = getattr(func, "func", func)  # a functools.partial: its function decides
    qualname = getattr(target, "__qualname__", "")
    module = getattr(target, "__module__", None) or ""
    if getattr(func, "_rlsd_in_process", False) or "<" in qualname or module in ("", "__main__"):
        return None
    try:
        inner = pickle.dumps(func, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        return None
    top = sys.modules.get(module.split(".", 1)[0])
    files = [(top.__name__, top.__file__)] if getattr(top, "__file__", None) else []
    return pickle.dumps((files, inner), protocol=pickle.HIGHEST_PROTOCOL)


class RewardWorker:
    """The parent's handle on one worker process, started on first use and after every kill; calls are serialised
    (TRL calls its rewards one after another)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.load_seconds = 0.0
        """Seconds spent so far starting workers and loading rewards, outside the rewards' bounds."""
        self._process: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        # Linux kills the worker when the thread that started it exits: start it from one thread that lives on
        self._spawner = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rlsd-reward-spawner")

    def call(
        self,
        blob: bytes,
        completions: list[Any],
        kwargs: dict[str, Any],
        timeout_s: float | None,
        grad_enabled: bool | None = None,
    ) -> tuple[Any, list[tuple[str, tuple[Any, ...], dict[str, Any]]]]:
        """Run the reward of `blob` on the batch and return its output with the recorded calls of the callable
        keyword arguments; raise the reward's own exception, CallTimedOut (worker killed), WorkerDied or
        LoadFailed; NotSendable (before anything is sent) for arguments that do not pickle."""
        callables = sorted(key for key, value in kwargs.items() if callable(value))
        plain = {key: value for key, value in kwargs.items() if key not in callables}
        try:
            message = ("call", blob, completions, plain, callables, grad_enabled)
            request = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as err:
            raise NotSendable(f"{type(err).__name__}: {err}") from err
        with self._lock:
            begin = time.monotonic()
            sock = self._ensure_started()
            try:
                sock.sendall(_HEADER.pack(len(request)) + request)
                reply = _recv(sock, time.monotonic() + max(LOAD_TIMEOUT_S, timeout_s or 0))
                self.load_seconds += time.monotonic() - begin
                if reply[0] == "started":
                    reply = _recv(sock, time.monotonic() + timeout_s if timeout_s else None)
            except TimeoutError:
                self._kill()
                raise CallTimedOut from None
            except (EOFError, OSError) as err:
                code = self._kill()
                raise WorkerDied(f"the reward worker process exited (code {code}) while running it") from err
            except BaseException:
                self._kill()  # interrupted mid-call: the next message would be this call's reply
                raise
        return _unpack_reply(reply)

    def _ensure_started(self) -> socket.socket:
        """The live worker's socket, starting a worker when there is none or it has exited."""
        if self._process is not None and self._process.poll() is None and self._sock is not None:
            return self._sock
        self._kill()
        ours, theirs = socket.socketpair()
        argv = [sys.executable, "-P", "-c", _BOOT, os.path.abspath(__file__), str(theirs.fileno()), *sys.path]
        try:
            start = functools.partial(subprocess.Popen, argv, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
            future = self._spawner.submit(start)
            self._process = future.result()
        finally:
            theirs.close()
        self._sock = ours
        return ours

    def _kill(self) -> int | None:
        """Kill the worker (if any) and forget it; its exit code."""
        process, sock, self._process, self._sock = self._process, self._sock, None, None
        if sock is not None:
            sock.close()
        if process is None:
            return None
        if process.poll() is None:
            process.kill()
        return process.wait()

    def close(self) -> None:
        """Stop the worker: it exits on end of input; one that does not within a second is killed."""
        with self._lock:
            process, sock, self._process, self._sock = self._process, self._sock, None, None
            if sock is not None:
                sock.close()
            if process is not None:
                try:
                    process.wait(1)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()

    @property
    def pid(self) -> int | None:
        """The worker's process id (None when none runs): tests check that a timed-out worker was replaced."""
        return self._process.pid if self._process is not None and self._process.poll() is None else None


def _unpack_reply(reply: tuple[Any, ...]) -> tuple[Any, list[tuple[str, tuple[Any, ...], dict[str, Any]]]]:
    """The output and recorded calls of an "ok" reply; the reward's exception (with the worker's traceback as a
    note) for an "error" reply; LoadFailed or Unsendable for the others."""
    kind = reply[0]
    if kind == "ok":
        return reply[1], reply[2]
    if kind == "load_error":
        raise LoadFailed(reply[1])
    if kind == "unsendable":
        raise Unsendable(reply[1], reply[2])
    _, blob, type_name, message, text = reply
    err: BaseException | None = None
    if blob is not None:
        try:
            err = pickle.loads(blob)
        except Exception:
            err = None
    if not isinstance(err, BaseException):
        err = type(type_name, (Exception,), {})(message)  # same type name and message, not the same class
    err.add_note(f"traceback in the reward worker process:\n{text.rstrip()}")
    raise err


_WORKER: RewardWorker | None = None
_WORKER_LOCK = threading.Lock()


def shared_worker() -> RewardWorker:
    """This process's reward worker (one for all rewards), stopped at exit."""
    global _WORKER
    with _WORKER_LOCK:
        if _WORKER is None:
            _WORKER = RewardWorker()
            atexit.register(_WORKER.close)
        return _WORKER


# ------------------------------------------------------------------------------------------------ worker side
def serve(fd: int) -> None:
    """The worker's loop: load the reward of each request (cached), reply "started", run it in this (main) thread,
    reply with its output or its exception. Exits at end of input, i.e. when the parent closes or dies."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it kills or closes us
    sock = socket.socket(fileno=fd)
    loaded: dict[bytes, Callable[..., Any]] = {}
    while True:
        try:
            (size,) = _HEADER.unpack(_recv_exact(sock, _HEADER.size, None))
            data = _recv_exact(sock, size, None)
        except EOFError:
            return
        try:  # arguments of a class this process cannot import fail here too: the parent falls back to a thread
            _, blob, completions, kwargs, callables, grad_enabled = pickle.loads(data)
            func = loaded.get(blob) or _load(blob)
        except BaseException as err:
            _send(sock, ("load_error", f"{type(err).__name__}: {err}"))
            continue
        loaded[blob] = func
        _send(sock, ("started",))
        _send(sock, _run(func, completions, kwargs, callables, grad_enabled))


def _die_with_parent() -> None:
    """On Linux, ask the kernel to kill this process when its parent (thread) goes away."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before the request took effect
        os._exit(1)


def _load(blob: bytes) -> Callable[..., Any]:
    """Unpickle a reward; a top-level module that is not importable here is loaded from its file, as `rlsd`
    loaded it (`import_user_module`: from the current folder, without adding the folder to the module path)."""
    import importlib.util

    files, inner = pickle.loads(blob)
    for name, path in files:
        if name not in sys.modules and importlib.util.find_spec(name) is None and os.path.exists(path):
            load_module_file(name, path)
    return pickle.loads(inner)


def load_module_file(name: str, path: str) -> Any:
    """Import module `name` from its file `path` alone (a package from its `__init__.py`), leaving `sys.path` as it
    is; a module whose code fails is not left half-imported in `sys.modules`."""
    import importlib.util

    locations = [os.path.dirname(path)] if os.path.basename(path) == "__init__.py" else None
    spec = importlib.util.spec_from_file_location(name, path, submodule_search_locations=locations)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def _run(
    func: Callable[..., Any],
    completions: list[Any],
    kwargs: dict[str, Any],
    callables: list[str],
    grad_enabled: bool | None,
) -> tuple[Any, ...]:
    """One call: ("ok", output, recorded calls) or ("error", pickled exception or None, type name, message,
    traceback), or ("unsendable", type name, repr) for an output that does not pickle."""
    recorded: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
    for key in callables:
        kwargs[key] = _recorder(key, recorded)
    try:
        if grad_enabled is not None and "torch" in sys.modules:
            with sys.modules["torch"].set_grad_enabled(grad_enabled):
                output = func(completions, **kwargs)
        else:
            output = func(completions, **kwargs)
    except BaseException as err:
        try:
            blob = pickle.dumps(err, protocol=pickle.HIGHEST_PROTOCOL)
            pickle.loads(blob)
        except Exception:
            blob = None
        return ("error", blob, type(err).__name__, str(err), traceback.format_exc())
    reply = ("ok", output, recorded)
    try:
        pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        reply = ("unsendable", type(output).__name__, repr(output)[:40])
    return reply


def _recorder(key: str, recorded: list[tuple[str, tuple[Any, ...], dict[str, Any]]]) -> Callable[..., None]:
    """A stand-in for the parent's callable keyword argument `key`: it records each call for replay."""

    def record(*args: Any, **kwargs: Any) -> None:
        recorded.append((key, args, kwargs))

    return record
