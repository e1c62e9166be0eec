# ksmlab sim: the kernel paths of ksmlab under a deterministic scheduler, in one process.
#
# scheduler.py (cooperative contexts, virtual clock, deadlock and hung-task detection),
# locks.py (the lock space as scheduling decisions), strategies.py (pct, random, replay),
# world.py (kernel memory and the simulator's seams), scenarios.py (the race-lab bugs as
# small programs), search.py (sampling, bounded-preemption DFS, replay, minimizer,
# CPU tables). `ksmlab sim` (ksmlab/cli.py) is the command.
