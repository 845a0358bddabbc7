"""A ``preload`` module for test_template: it changes process-wide state at import, as
some libraries do, so that the tests see whether a worker gets it reset."""

from __future__ import annotations

import os
import random
import signal

IMPORTED_IN = os.getpid()
STATE: list[int] = []

random.seed(1234)  # every fork would draw the same numbers without a reseed
try:
    import numpy

    numpy.random.seed(1234)  # the same for numpy's global generator
except ImportError:
    numpy = None
signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.signal(signal.SIGUSR1, signal.SIG_IGN)
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2, signal.SIGHUP})
