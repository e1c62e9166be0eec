# python -m ksmlab.runfork: the fork server of a stress campaign's runs.
#
# A campaign run is `ksmlab run SCENARIO --seed N ...`, and started as its own
# interpreter it spends about 0.35 s of CPU importing ksmlab.cli (numpy, zmq, structlog,
# the kernel, the cluster; 0.6 to 0.9 s without bytecode) before its cluster boots,
# against 1.3 to 2 s of CPU for the whole of a race run (bench/bench_campaign.py's
# CPU s/run). This process imports
# ksmlab.cli once and forks each run from itself (the same server loop as a cluster's
# actors, actors/zygote.py): the child calls cli.main(argv) with the argv the spawned
# run would have had, in a session of its own, its stdout (the result line) and stderr
# in files of the run's folder, and its exit status reported back.
#
# Each run's cluster forks its own fork server from the run too (actors/zygote.py,
# ForkServer), which saves the 0.3 s of CPU a new interpreter's imports cost a run; the
# server is started with a padding argument so that there is room in the argument area
# for the command lines the runs and their servers show (actors/proctitle.py).
#
# Why it is safe to fork here: the server has no thread (OPENBLAS_NUM_THREADS=1 before
# numpy loads, and nothing of ksmlab starts one on import), no zmq context, no asyncio
# loop and no segment; each run builds all of those after the fork, as a spawned run
# does. `random` reseeds itself in a forked child, tempfile's names too.
#
# Lifetimes:
# * The server dies with the campaign (actors/pdeath.py: SIGKILL when its parent goes,
#   checked against KSMLAB_SUPERVISOR_PID for a death before the prctl).
# * A run gets SIGTERM when the server dies, and when the campaign closes the server with
#   runs still going (an interrupted campaign): a run stops its cluster on SIGTERM,
#   removing its segments and sockets, as it does when a terminal's Ctrl-C reaches it.
#   SIGKILL follows after the grace its command line gives (ksmlab.stress.RUN_GRACE_S).
# * A run past its time limit is SIGKILLed as a group by the campaign (killpg), as a
#   spawned one is, and the campaign sweeps what it left.
from __future__ import annotations

from actors import pdeath

pdeath.die_with_parent()  # before ksmlab.cli loads numpy and zmq

import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402

from actors import proctitle, zygote  # noqa: E402
from ksmlab import cli  # noqa: E402


def run_main(argv: list[str]) -> int:
    """One run, as `python -m ksmlab.cli ARGV` would make it, and shown as that."""
    os.environ.pop(pdeath.SUPERVISOR_PID_ENV, None)  # the server's, not this run's
    sys.argv = ["ksmlab", *argv]
    proctitle.set_cmdline([sys.executable, "-m", "ksmlab.cli", *argv])
    return cli.main(argv)


if __name__ == "__main__":
    # python -m ksmlab.runfork GRACE_S PADDING: the padding is room in the argument area
    # for each run's command line and its cluster's fork server's (actors/proctitle.py)
    proctitle.set_cmdline([sys.executable, "-m", "ksmlab.runfork", sys.argv[1]])
    zygote.FORK_HERE = True  # the runs inherit it: each run's cluster forks its server
    zygote.serve(run_main, eof_signal=signal.SIGTERM, deathsig=signal.SIGTERM, grace_s=float(sys.argv[1]))
