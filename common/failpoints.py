"""Failpoints: named places where a test can make this process die, to prove crash safety.

`TINYFLEET_FAILPOINTS=name[,name...]` in the environment arms them; at an armed
failpoint the process SIGKILLs itself, which is what an OOM kill or a power cut
does: no `finally`, no shutdown hook, no flush runs. Unarmed (always, outside
tests) a failpoint costs one set lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "TINYFLEET_FAILPOINTS"
_ARMED = frozenset(name.strip() for name in os.environ.get(ENV, "").split(",") if name.strip())


def failpoint(name: str) -> None:
    if name in _ARMED:
        os.kill(os.getpid(), signal.SIGKILL)
