# actor_main(): what every actor process runs, whichever way it was started.
#
# An actor is started as `python -m actors.main CONFIG ROLE NAME [ARGS]` (actors/main.py,
# which first ties the process to its supervisor), as `python -m actors.kcov ...` to
# record coverage, or forked by a fork server (actors/zygote.py) that calls this with
# the same argv. It lives apart from actors/main.py because that module acts on import
# (PR_SET_PDEATHSIG, and an exit if the parent is not the supervisor), and a supervisor
# that forks its own fork server must be able to name actor_main without doing either.
from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any

from actors.registry import ROLES

Recorder = Callable[[dict[str, Any], str], Callable[[], None] | None]


def actor_main(argv: list[str] | None = None, record: Recorder | None = None) -> None:
    """Entry point of every actor process: CONFIG ROLE NAME [ARG].

    record(cfg, name), when given, starts recording before the actor is built and
    returns what to call once it has closed (actors/kcov.py: save the coverage data).
    """
    argv = sys.argv[1:] if argv is None else argv
    cfg_path, role, name = argv[0], argv[1], argv[2]
    extra = argv[3:] if len(argv) > 3 else []
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    cls = ROLES[role]
    done = record(cfg, name) if record is not None else None
    actor = cls(cfg, name, *extra)
    try:
        actor.boot()
        actor.run()
    finally:
        actor.close()
        if done is not None:
            done()
    os._exit(0)
