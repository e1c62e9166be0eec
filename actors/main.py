# python -m actors.main CONFIG ROLE NAME [ARGS]: start one actor process (or, with the
# role zygote, the fork server that forks them: actors/zygote.py).
#
# The top of the actor layer: it knows every role (actors/registry.py) and the shell they
# share (actors/base.py). A run that records kernel-path coverage starts its actors
# through actors/kcov.py instead, which calls actor_main() with a recorder.
from __future__ import annotations

from actors import pdeath

pdeath.die_with_parent()   # before the imports below load numpy and zmq (actors/pdeath.py)

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

from actors import zygote  # noqa: E402
from actors.registry import ROLES  # noqa: E402

Recorder = Callable[[dict[str, Any], str], Callable[[], None] | None]


def actor_main(argv: list[str] | None = None, record: Recorder | None = None) -> None:
    """Entry point of every actor process: python -m actors.main CONFIG ROLE NAME [ARG].

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


if __name__ == "__main__":
    if sys.argv[2:3] == [zygote.ROLE]:
        zygote.serve(actor_main)   # the fork server (actors/zygote.py)
    actor_main()
