# python -m actors.main CONFIG ROLE NAME [ARGS]: start one actor process.
#
# The top of the actor layer: it knows every role (actors/registry.py) and the shell they
# share (actors/base.py). A run that records kernel-path coverage starts its actors
# through actors/kcov.py instead, which calls actor_main() with a recorder.
from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any

from actors.base import die_with_parent
from actors.registry import ROLES

Recorder = Callable[[dict[str, Any], str], Callable[[], None] | None]


def actor_main(argv: list[str] | None = None, record: Recorder | None = None) -> None:
    """Entry point of every actor process: python -m actors.main CONFIG ROLE NAME [ARG].

    record(cfg, name), when given, starts recording before the actor is built and
    returns what to call once it has closed (actors/kcov.py: save the coverage data).
    """
    die_with_parent()
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


if __name__ == "__main__":
    actor_main()
