"""Driver for test_template_sharing: an executor comes and goes, its template lingers
for the next one; then the test SIGKILLs us (or lets us exit).

usage: template_linger_driver.py kill|exit
Prints one line "LINGERING {json}" with the lingering template's and the guardian's
pids; with "exit" it then returns, with "kill" it waits to be killed.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import restore_sigint  # noqa: E402

from pgexecutor import ProcessGroupExecutor, _guardian, _template_pool  # noqa: E402


def main() -> None:
    restore_sigint()
    _template_pool.LINGER = 3600.0  # it must not go by itself: the parent's end must end it
    with ProcessGroupExecutor(max_workers=1, mp_context="template") as ex:
        ex.submit(os.getpid).result()
    print(
        "LINGERING " + json.dumps(
            {"template": _template_pool.lingering(), "guardian": _guardian.guardian_pid()}
        ),
        flush=True,
    )
    if sys.argv[1] == "kill":
        while True:
            time.sleep(1000)


if __name__ == "__main__":
    main()
