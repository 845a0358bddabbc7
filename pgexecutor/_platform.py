"""What this platform offers, decided once at import: every branch on it reads these.

Linux has all of it. macOS has none of the three Linux facilities below, and
everything works there through the fallbacks named with each. The workers import
this module too (it imports only ``os`` and ``sys``), so parent and worker agree.
"""

from __future__ import annotations

import os
import sys

LINUX = sys.platform.startswith("linux")

#: A worker's exit is seen on a pidfd in the manager's poll set (Linux >= 5.3). Without
#: one (macOS, older kernels, sandboxes that refuse it, or PGEXECUTOR_NO_PIDFD=1, which
#: the tests use to run the fallback on Linux) the manager polls every worker with
#: ``waitid(WNOHANG | WNOWAIT)`` every 50 ms; where waitid is missing too, it asks
#: psutil whether the leader is a zombie.
USE_PIDFD = hasattr(os, "pidfd_open") and not os.environ.get("PGEXECUTOR_NO_PIDFD")
HAS_WAITID = hasattr(os, "waitid")

#: Large results come back in shared memory: a memfd passed over a unix socket
#: (Linux). Elsewhere they come through the result pipe.
HAS_MEMFD = hasattr(os, "memfd_create")

#: Memory is counted as PSS + SwapPss read from /proc/PID/smaps_rollup (Linux >= 4.14;
#: older Linux: psutil's full memory info, from smaps). Elsewhere: RSS, via psutil.
HAS_SMAPS_ROLLUP = LINUX and os.path.exists(f"/proc/{os.getpid()}/smaps_rollup")
HAS_PSS = LINUX

#: Pipes can be enlarged (F_SETPIPE_SZ): fewer syscalls for large payloads.
CAN_RESIZE_PIPES = LINUX
