# python -m actors.main CONFIG ROLE NAME [ARGS]: start one actor process (or, with the
# role zygote, the fork server that forks them: actors/zygote.py).
#
# The top of the actor layer: actor_main() (actors/entry.py) knows every role
# (actors/registry.py) and the shell they share (actors/base.py). A run that records
# kernel-path coverage starts its actors through actors/kcov.py instead, which calls
# actor_main() with a recorder.
from __future__ import annotations

from actors import pdeath

pdeath.die_with_parent()   # before the imports below load numpy and zmq (actors/pdeath.py)

import sys  # noqa: E402

from actors import zygote  # noqa: E402
from actors.entry import actor_main  # noqa: E402

if __name__ == "__main__":
    if sys.argv[2:3] == [zygote.ROLE]:
        zygote.serve(actor_main)   # the fork server (actors/zygote.py)
    actor_main()
