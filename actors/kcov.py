# Recording kernel-path coverage in an actor process: the collecting half of ksmlab's kcov.
#
# A run with a coverage folder (`ksmlab run/stress --coverage DIR`) starts each actor as
# `python -m actors.kcov CONFIG ROLE NAME` instead of `python -m actors.main`: the same
# actor_main(), with coverage.py tracing this process from before the actor is built
# until after it closed (parallel mode, branch coverage, threads, only actors/kernel), and
# one data file per process in DIR. A SIGTERM saves the data at once and exits, whatever
# the actor is blocked in, so a deadlocked run still leaves its coverage behind. Only
# these processes import coverage.py (some 50 ms each); reading and tabulating the data
# files is ksmlab/kcov.py's.
from __future__ import annotations

from actors import pdeath

pdeath.die_with_parent()   # before coverage.py and the actor layer load (actors/pdeath.py)

import os  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import coverage  # noqa: E402

from actors import base  # noqa: E402
from actors.entry import actor_main  # noqa: E402

ACTIVE: Any = None   # this process's Coverage while it records
KERNEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernel")


def start(data_dir: str, name: str) -> Any:
    """Start tracing this process; returns the Coverage object to stop_and_save()."""
    os.makedirs(data_dir, exist_ok=True)
    cov = coverage.Coverage(data_file=os.path.join(data_dir, ".coverage"), data_suffix=f"{name}.{os.getpid()}",
                            branch=True, source=[KERNEL_DIR], concurrency=["thread"])
    cov.start()
    global ACTIVE
    ACTIVE = cov
    return cov


def stop_and_save(cov: Any) -> None:
    global ACTIVE
    ACTIVE = None
    try:
        cov.stop()
        cov.save()
    except Exception:  # coverage must never turn a clean exit into a crash
        pass


def _save_and_exit() -> None:
    if ACTIVE is not None:
        stop_and_save(ACTIVE)
        os._exit(0)


def _record(cfg: dict[str, Any], name: str) -> Callable[[], None] | None:
    if not cfg.get("coverage"):
        return None
    cov = start(cfg["coverage"], name)
    return lambda: stop_and_save(cov)


if __name__ == "__main__":
    base.SIGTERM_HOOKS.append(_save_and_exit)
    actor_main(record=_record)
