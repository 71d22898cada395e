"""`installed_once`: the one home for "wrap a torch internal the first time it is needed, under a lock".

    @installed_once
    def install() -> bool:      # patch something; False where this torch lacks it (tried again next time)
        ...
"""
from __future__ import annotations

import functools
import threading
from typing import Callable


def installed_once(install: Callable[[], bool]) -> Callable[[], bool]:
    """`install` runs under a lock until it returns True once; after that the wrapper returns True at once."""
    lock = threading.Lock()
    done = False

    @functools.wraps(install)
    def wrapper() -> bool:
        nonlocal done
        with lock:
            if not done:
                done = bool(install())
            return done

    return wrapper
