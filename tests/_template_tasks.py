"""Tasks for test_template (a module of its own, so workers import it by name)."""

from __future__ import annotations

import os
import random
import signal
import time


def whoami() -> dict:
    return {"pid": os.getpid(), "pgid": os.getpgid(0), "ppid": os.getppid()}


def fds_of_self() -> dict:
    """This worker's open fds (read from outside: see the test) and a little more."""
    return {"pid": os.getpid(), "stdin": os.readlink("/proc/self/fd/0")}


def signal_state() -> dict:
    blocked = sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, []))
    return {
        "blocked": blocked,
        "term_default": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL,
        "usr1_default": signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL,
        # SIGINT: the worker's own handler (a cancel_running stop interrupts the task)
        "int_python": callable(signal.getsignal(signal.SIGINT)),
    }


def draw_numpy() -> float | None:
    try:
        import numpy
    except ImportError:
        return None
    return float(numpy.random.random())


def draw() -> float:
    return random.random()


def preload_state() -> dict:
    import _template_preload as pre

    seen = list(pre.STATE)
    pre.STATE.append(os.getpid())
    return {"seen": seen, "imported_in": pre.IMPORTED_IN, "pid": os.getpid()}


def record_init(directory: str) -> None:
    open(os.path.join(directory, str(os.getpid())), "w").close()


def crash() -> None:
    os._exit(3)


def sleep_then(seconds: float, value: int) -> int:
    time.sleep(seconds)
    return value


def run_mp_child() -> int:
    """A multiprocessing child of the worker: refused in a daemonic process."""
    import multiprocessing

    p = multiprocessing.get_context("fork").Process(target=time.sleep, args=(0,))
    p.start()
    p.join()
    return p.exitcode


def cwd_and_env(name: str) -> tuple[str, str | None]:
    return os.getcwd(), os.environ.get(name)


def write_stdout(text: str) -> None:
    os.write(1, text.encode())
