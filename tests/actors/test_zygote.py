# The fork server (actors/zygote.py): actors forked from one process that has imported
# them. What a spawned actor had must still hold for a forked one: it is the server's
# child and carries its own name, it dies with the server (and so with the supervisor),
# its exit status reaches the supervisor in Popen's convention, and when the server
# itself dies the run ends with a report that names it. Nothing of the run is left.
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
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


_SERVER = """
import os, sys, time, signal
from actors import zygote

def main(argv):
    print(os.getpid(), os.getpgid(0), os.getsid(0), flush=True)
    print("to stderr", file=sys.stderr)
    if argv[0] == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(float(argv[1]))
    return int(argv[2])

zygote.serve(main, eof_signal=signal.SIGTERM, deathsig=signal.SIGTERM, grace_s=float(sys.argv[1]))
"""


def _generic_server(tmp_path, grace: float) -> zygote.ForkServer:
    script = tmp_path / "server.py"
    script.write_text(_SERVER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    return zygote.ForkServer("", env, str(tmp_path / "server.stderr"), cmd=[sys.executable, str(script), str(grace)])


def test_any_main_forked_in_a_session_of_its_own_with_stderr_apart_and_its_return_as_status(tmp_path):
    """The server loop with another main than actor_main (a campaign's runs, ksmlab/runfork.py):
    the child's return is its exit status, its stdout and stderr go to files of their own,
    it leads its own session and process group (killpg reaches what it starts), and forks
    from several threads at once each get their own child back (the server answers by name)."""
    fs = _generic_server(tmp_path, 5)
    try:
        def one(n: int) -> tuple[int, int]:
            p = fs.fork(f"child-{n}", ["plain", "0.2", str(n)], str(tmp_path / f"{n}.out"),
                        str(tmp_path / f"{n}.err"), session=True)
            return p.pid, p.wait(timeout=20)
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(one, range(8)))
        assert [rc for _, rc in got] == list(range(8))
        for n, (pid, _) in enumerate(got):
            assert (tmp_path / f"{n}.out").read_text().split() == [str(pid)] * 3
            assert (tmp_path / f"{n}.err").read_text() == "to stderr\n"
    finally:
        fs.close()
    assert fs.proc.returncode == 0 and not fs.live


def _until(cond, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_a_server_closed_with_children_left_sigterms_them_then_sigkills_after_its_grace(tmp_path):
    """A campaign interrupted with runs going: the runs get SIGTERM (a run stops its cluster
    on it), and one that does not end in the server's grace gets SIGKILL."""
    fs = _generic_server(tmp_path, 1.0)
    polite = fs.fork("polite", ["plain", "60", "0"], str(tmp_path / "p.out"))
    stubborn = fs.fork("stubborn", ["ignore-term", "60", "0"], str(tmp_path / "s.out"))
    for out in ("p.out", "s.out"):  # both are in main (SIGTERM set aside where it will be)
        _until(lambda out=tmp_path / out: out.exists() and "to stderr" in out.read_text(), 20)
    fs.close(timeout=20)
    assert polite.returncode == -signal.SIGTERM
    assert stubborn.returncode == -signal.SIGKILL
    assert not zygote._alive(polite.pid) and not zygote._alive(stubborn.pid)



_FORKS_HERE = """
import json, os, signal, sys, time
from actors import zygote

def main(argv):
    time.sleep(float(argv[0]))
    return int(argv[1])

def cmdline(pid):
    return [a.decode() for a in open(f"/proc/{pid}/cmdline", "rb").read().split(b"\\0") if a]

zygote.FORK_HERE = os.environ["T_HERE"] == "1"
cfg, err = os.environ["T_CFG"], os.environ["T_ERR"]
fs = zygote.ForkServer(cfg, dict(os.environ), err, main=main)
out = {"forked": fs.forked, "parent": int(open(f"/proc/{fs.pid}/stat").read().rsplit(")", 1)[1].split()[1]) == os.getpid()}
out["rc"] = fs.fork("quick", ["0.1", "3"], err + ".quick").wait(timeout=20)
if fs.forked:
    slow = fs.fork("slow", ["60", "0"], err + ".slow")
    out["server_cmdline"], out["child_cmdline"] = cmdline(fs.pid), cmdline(slow.pid)
    out["comm"] = open(f"/proc/{fs.pid}/comm").read().strip()
    os.kill(fs.pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while fs.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    out["server_rc"] = fs.proc.returncode
    out["slow_rc"] = slow.wait(timeout=20)
fs.close()
print(json.dumps(out))
"""


def _supervisor(tmp_path, here: bool, cfg: str, pad: str) -> dict:
    """A supervisor process (a script: its command line is `python SCRIPT PAD`) that
    makes a ForkServer whose children run a test main, and says what it saw."""
    script = tmp_path / "supervisor.py"
    script.write_text(_FORKS_HERE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
           "T_HERE": "1" if here else "0", "T_CFG": cfg, "T_ERR": str(tmp_path / "zygote.stderr")}
    r = subprocess.run([sys.executable, str(script), *([pad] if pad else [])], capture_output=True, text=True,
                       timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_a_supervisor_that_may_forks_its_server_and_the_server_shows_the_command_line_it_would_have(tmp_path):
    """FORK_HERE (a campaign's runs): the server is this process's child with the spawned
    server's command line (config path included) and name, so are its children, its
    children's statuses still come back, and its death takes them with it."""
    cfg = str(tmp_path / "cluster.json")
    out = _supervisor(tmp_path, True, cfg, "=" * 1024)
    want = [sys.executable, "-m", "actors.main", cfg, zygote.ROLE, zygote.ROLE]
    assert out["forked"] and out["parent"] and out["rc"] == 3
    assert out["server_cmdline"] == want and out["child_cmdline"] == want
    assert out["comm"] == os.path.basename(sys.executable)[:15]
    assert out["server_rc"] == -signal.SIGKILL and out["slow_rc"] == -signal.SIGKILL


def test_without_leave_or_without_room_for_its_command_line_the_server_is_spawned(tmp_path):
    """The spawned server is `python -m actors.main CONFIG zygote zygote`, whose children
    run actor_main(): given the test's argv as a config path, one fails (exit 1)."""
    for here, cfg, pad in ((False, str(tmp_path / "cluster.json"), "=" * 1024),
                           (True, str(tmp_path / ("x" * 300) / "cluster.json"), "")):
        out = _supervisor(tmp_path, here, cfg, pad)
        assert not out["forked"] and out["parent"] and out["rc"] == 1, (here, len(cfg), pad)
