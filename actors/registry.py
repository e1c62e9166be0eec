# Actor roles by name, for actors.main.
from __future__ import annotations

from actors.ctl import Ctl
from actors.exit_path import ExitPath
from actors.fault import FaultHandler
from actors.ksmd import Ksmd
from actors.oom_killer import OomKiller
from actors.reclaim import Kswapd
from actors.task import Task

ROLES = {
    "ksmd": Ksmd,
    "fault": FaultHandler,
    "exit": ExitPath,
    "oom": OomKiller,
    "ctl": Ctl,
    "task": Task,
    "kswapd": Kswapd,
}

# The kernel threads every cluster starts, in boot order (tasks come later).
KERNEL_ACTORS = ("oom", "kswapd", "exit", "fault", "ctl", "ksmd")
