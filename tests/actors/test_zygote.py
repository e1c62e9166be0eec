# The fork server (actors/zygote.py): actors forked from one process that has imported
# them. What a spawned actor had must still hold for a forked one: it is the server's
# child and carries its own name, it dies with the server (and so with the supervisor),
# its exit status reaches the supervisor in Popen's convention, and when the server
# itself dies the run ends with a report that names it. Nothing of the run is left.
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from actors import zygote
from actors.registry import KERNEL_ACTORS
from shared_mem.layout import PAGE_SIZE
from shared_mem.segment import list_segments
from tests.actors.test_robustness import _actor_pids_from_proc, _gone
from tests.helpers import wait_for

pytestmark = [pytest.mark.timeout(60)]


def _ppid(pid: int) -> int:
    return int(Path("/proc", str(pid), "stat").read_text().rsplit(")", 1)[1].split()[1])


@pytest.mark.asyncio
async def test_actors_are_forked_children_of_the_server_with_their_own_names(cluster_factory):
    c = await cluster_factory(frames=256)
    t = await c.spawn_task()
    addr = await t.mmap(2 * PAGE_SIZE)
    await t.write(addr, b"forked")
    assert await t.read(addr, 6) == b"forked"
    assert c.forks is not None and _ppid(c.forks.pid) == os.getpid()
    for name in (*KERNEL_ACTORS, t.name):
        pid = c.procs[name].pid
        assert isinstance(c.procs[name], zygote.ForkedProcess)
        assert _ppid(pid) == c.forks.pid, name
        assert Path("/proc", str(pid), "comm").read_text().strip() == name[:15]
    assert set(_actor_pids_from_proc(c.cfg_path).values()) == {*KERNEL_ACTORS, t.name, "zygote"}
    await c.stop()
    assert all(p.poll() is not None for p in c.procs.values())
    assert c.forks.proc.poll() == 0
    assert _actor_pids_from_proc(c.cfg_path) == {}


@pytest.mark.asyncio
async def test_a_forked_task_killed_from_outside_has_popens_returncode(cluster_factory):
    c = await cluster_factory(frames=256)
    t = await c.spawn_task()
    p = c.procs[t.name]
    assert p.poll() is None and p.returncode is None
    with pytest.raises(subprocess.TimeoutExpired):
        p.wait(timeout=0.05)
    os.kill(p.pid, signal.SIGKILL)
    assert p.wait(timeout=10) == -signal.SIGKILL
    assert p.returncode == -signal.SIGKILL
    p.kill()  # a process already reaped is never signalled (its pid may be reused)
    await wait_for(lambda: c.crashed, 15, "the cluster to notice the death")
    assert [r["data"] for r in c.reports_of("actor_died")] == [{"actor": t.name, "rc": -signal.SIGKILL}]


@pytest.mark.asyncio
async def test_the_death_of_the_server_ends_the_run_and_takes_every_actor_with_it(cluster_factory):
    c = await cluster_factory(frames=256)
    t = await c.spawn_task()
    await t.mmap(PAGE_SIZE)
    pids = {n: p.pid for n, p in c.procs.items()}
    os.kill(c.forks.pid, signal.SIGKILL)
    await wait_for(lambda: c.crashed, 15, "the cluster to notice the server's death")
    died = c.reports_of("actor_died")
    assert died and died[0]["data"] == {"actor": "zygote", "rc": -signal.SIGKILL}
    assert f"actor zygote (pid {c.forks.pid}) died unexpectedly" in died[0]["title"]
    await wait_for(lambda: all(_gone(p) for p in pids.values()), 15, "every forked actor to die with it")
    assert all(c.procs[n].poll() == -signal.SIGKILL for n in pids)
    await c.stop()
    assert list_segments(c.run_id) == []
    assert c.forks.proc.stdin.closed and c.forks.proc.stdout.closed


@pytest.mark.asyncio
async def test_without_the_fork_server_each_actor_is_its_own_interpreter(cluster_factory):
    c = await cluster_factory(frames=256, fork_server=False)
    t = await c.spawn_task()
    await t.mmap(PAGE_SIZE)
    assert c.forks is None
    assert all(isinstance(p, subprocess.Popen) for p in c.procs.values())
    assert all(_ppid(p.pid) == os.getpid() for p in c.procs.values())
    assert set(_actor_pids_from_proc(c.cfg_path).values()) == {*KERNEL_ACTORS, t.name}


def test_a_server_whose_supervisor_goes_kills_its_children(tmp_path):
    """The server's stdin closing (its supervisor is done or gone) ends it, and no child
    it forked outlives it. The child here is an actor whose config does not exist: it
    fails at once, and its status still reaches the supervisor (exit code 1)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    fs = zygote.ForkServer(str(tmp_path / "no-such-cluster.json"), env, str(tmp_path / "zygote.stderr"))
    try:
        p = fs.spawn("ksmd", "ksmd", [], str(tmp_path / "ksmd.stderr"))
        assert p.wait(timeout=20) == 1
        assert "FileNotFoundError" in (tmp_path / "ksmd.stderr").read_text()
    finally:
        fs.close()
    assert fs.proc.returncode == 0 and fs.dead and fs.proc.stdin.closed and fs.proc.stdout.closed
    fs.close()  # again: nothing to do
    with pytest.raises(zygote.ForkServerError):
        fs.spawn("ksmd", "ksmd", [], str(tmp_path / "ksmd.stderr"))
