# The hung-task watchdog ends a deadlocked run with a kernel-style report (seed 000), and
# a run whose actor stops answering without holding a lock ends with one too.
from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import threading
import time

import pytest

from actors.cluster import ClusterCrashed, SyscallFailed, proc_state
from ksmlab.scenario import load_scenario, run_scenario
from protocol.abi import PAGE_SIZE
from tests.helpers import assert_around_shows

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(120)]


async def test_oom_during_run2_completes_today(tmp_path):
    """Seed 000 applied: the OOM victim's exit never waits for ksm_thread_mutex; run=2 completes."""
    res = await run_scenario(load_scenario("oom-deadlock"), run_dir=str(tmp_path / "r"), trace_locks=False)
    assert res["ok"], (res.get("failed"), [r["title"] for r in res["reports"]])


async def test_oom_deadlock_variant_is_reported_as_hung_task(tmp_path):
    """Seed 000 reverted: the victim's __ksm_exit blocks on ksm_thread_mutex held by run=2.

        CPU0 (ctl: echo 2 > run)            CPU1 (exit of the OOM victim)
        mutex_lock(ksm_thread_mutex)
        break_ksm -> alloc_page: no frame
        out_of_memory -> kill the hog
                                            __ksm_exit: mutex_lock(ksm_thread_mutex)
        alloc_page retries forever          ... blocked
    """
    res = await run_scenario(load_scenario("oom-deadlock"), run_dir=str(tmp_path / "r"),
                             variants=("oom-deadlock",), trace_locks=False)
    assert not res["ok"]
    hung = [r for r in res["reports"] if r["kind"] == "hung_task"]
    assert hung, [r["title"] for r in res["reports"]]
    text = hung[0]["text"]
    assert "blocked for more than" in text and "ksm_thread_mutex" in text
    assert hung[0]["title"].startswith("INFO: task exit")
    assert_around_shows(res["run_dir"], "INFO: task exit", "exit", "ctl")


@pytest.mark.timeout(60)
async def test_an_actor_that_stops_answering_ends_the_run_with_a_report(cluster_factory):
    """The fault handler is SIGSTOPped for good: it holds no lock, so the lock watchdog
    sees nothing, but the task's store waits on it and the supervisor waits on the task.
    The task's context publishes its wait for the reply, and after twice the hung-task
    timeout the run ends with a hung-task report that names the wait and the stopped
    process (issue 11, "Not every hang ends"). The supervisor's own watch of its request
    to the task would come later."""
    c = await cluster_factory(frames=256, hung_task_timeout=1.5)
    t = await c.spawn_task()
    a = await t.mmap(4 * PAGE_SIZE)
    fault = c.procs["fault"].pid
    os.kill(fault, signal.SIGSTOP)
    try:
        with pytest.raises(ClusterCrashed):
            await asyncio.wait_for(t.write(a, b"never stored"), 30)
    finally:
        with contextlib.suppress(ProcessLookupError):  # killed and reaped by the crash already
            os.kill(fault, signal.SIGCONT)
    rep = next(r for r in c.reports if r["kind"] == "hung_task")
    assert rep["title"].startswith(f"INFO: task {t.name}") and "blocked for more than 3 seconds." in rep["title"]
    assert "waiting for an event that does not come (wait_event) in wait_for_reply(fault:fault)" in rep["text"]
    assert f"fault (pid {fault}) is stopped (SIGSTOP)" in rep["text"]
    assert rep["data"]["states"]["fault"] == "T" and rep["data"]["blocked_ns"] > 3e9


async def _goes_on(c, t) -> None:
    """The run carries on: another task maps, stores and loads, and nothing is reported."""
    b = await t.mmap(PAGE_SIZE)
    await t.write(b, b"still here")
    assert await t.read(b, 10) == b"still here"
    assert c.reports == [] and c.crashed is None


@pytest.mark.timeout(60)
async def test_a_task_killed_from_outside_between_requests_is_an_exit(cluster_factory):
    """What chaos does to an idle task (Cluster(chaos=...)), done by hand: the task's
    process is SIGKILLed between requests. As a SIGKILL from outside is to the kernel, it
    is an exit (code 137, "killed"): its mm is torn down, the run goes on, nothing is
    reported."""
    c = await cluster_factory(frames=256)
    t = await c.spawn_task()
    other = await c.spawn_task()
    a = await t.mmap(4 * PAGE_SIZE)
    await t.write(a, b"gone soon")
    pid = c.procs[t.name].pid
    c._chaos_killed.add(pid)
    os.kill(pid, signal.SIGKILL)
    assert await t.wait_exit(20) == {"code": 137, "reason": "killed"}
    assert c.km.mm.nr_live() == 1                      # only the other task's mm is left
    await _goes_on(c, other)


@pytest.mark.timeout(60)
async def test_a_kill_after_the_task_exited_is_esrch_not_a_second_exit(cluster_factory):
    """The race the chaos soak met (a KASAN use-after-free in do_exit): a task exits, and
    between its reply and its process's end chaos takes it for idle and SIGKILLs it; the
    supervisor then asked for a second do_exit of a task record already released and
    reused. Chaos now skips tasks that are exiting, and a do_exit from the supervisor
    for a handle that names no live task is ESRCH: nothing is reported."""
    c = await cluster_factory(frames=256)
    t = await c.spawn_task()
    assert c._idle_task(t.name)
    await t.exit()
    assert not c._idle_task(t.name)
    reuse = await c.spawn_task()                          # its slot may be taken again
    with pytest.raises(SyscallFailed) as e:
        await c.request("exit", "do_exit", timeout=20, task=t.handle, code=137, reason="killed")
    assert e.value.errno == errno.ESRCH
    await _goes_on(c, reuse)


@pytest.mark.timeout(60)
async def test_a_chaos_stop_ends_even_while_the_supervisor_loop_is_blocked(cluster_factory):
    """The 10-minute chaos soak's hang: ksmd was SIGSTOPped while it held a kernel lock
    the supervisor's own kernel context then waited for, synchronously, in its event
    loop; the SIGCONT was the loop's next line, so it never came, and nothing (the
    watchdog runs in the same loop) could say so. The stop now ends from a timer thread:
    here the loop is blocked for a second, as behind that lock, and ksmd runs again
    after its 0.3 s all the same."""
    c = await cluster_factory(frames=256)
    pid = c.procs["ksmd"].pid
    stop = asyncio.get_running_loop().create_task(c._chaos_stop("ksmd", 0.3))
    await asyncio.sleep(0.05)
    assert proc_state(pid) == "T"
    seen: list[str] = []
    probe = threading.Timer(0.7, lambda: seen.append(proc_state(pid)))
    probe.start()
    time.sleep(1.0)           # the supervisor's loop blocked: no coroutine runs meanwhile
    probe.join()
    await stop
    assert seen and seen[0] != "T", seen
    assert c.chaos_counts["stops"] == 1 and c.crashed is None
