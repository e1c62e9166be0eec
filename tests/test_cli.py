# The `ksmlab` command line, run as a real subprocess: run --json, scenarios, scenario
# files, stat and ctl against a running `idle` scenario, and Ctrl-C teardown.
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from actors.cluster import ClusterOptions
from actors.kernel.sysfs import ALL_FILES, COUNTERS
from ksmlab.scenarios.idle import idle_seconds
from shared_mem.segment import list_segments, sweep_stale


def ksmlab(*args: str, cwd: Path | None = None, env: dict | None = None,
           timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ksmlab.cli", *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=timeout)


def _actor_procs(cfg_path: str) -> list[int]:
    """Pids of live (non-zombie) actor processes started with this cluster.json."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            argv = Path("/proc", d, "cmdline").read_bytes().split(b"\0")
            state = Path("/proc", d, "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if b"actors.main" in argv and cfg_path.encode() in argv and state not in ("Z", "X"):
            out.append(int(d))
    return out


@contextlib.contextmanager
def run_guard(run_dir: Path) -> Iterator[None]:
    """Whatever happens to the `ksmlab run` inside (a failure, a timeout that kills it),
    leave no actor process and no segment of the run behind."""
    try:
        yield
    finally:
        cfg = run_dir / "cluster.json"
        if cfg.exists():
            for pid in _actor_procs(str(cfg)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            sweep_stale(json.loads(cfg.read_text())["run_id"])


def _assert_run_cleaned(result: dict) -> None:
    rid = result["options"]["run_id"]
    assert list_segments(rid) == []
    assert _actor_procs(str(Path(result["run_dir"]) / "cluster.json")) == []


# --- run --json ---------------------------------------------------------------------------------

@pytest.mark.timeout(90)
def test_run_json_default_scenario_echoes_seed_and_counters(tmp_path):
    """`ksmlab run --json --seed N` runs the default scenario and prints exactly one JSON
    object: run_dir, the seed N, ksm with all 11 counters by sysfs file name, reports (a
    list, empty for a clean run) and ok; the run folder has its files and nothing of the
    run is left behind."""
    run_dir = tmp_path / "run"
    with run_guard(run_dir):
        r = ksmlab("run", "--json", "--seed", "4242", "--run-dir", str(run_dir), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)  # one object, nothing else on stdout
    assert res["scenario"] == "default"
    assert res["run_dir"] == str(run_dir) and res["seed"] == 4242
    assert res["options"]["seed"] == 4242
    assert set(res["ksm"]) == set(COUNTERS) and len(res["ksm"]) == 11
    assert all(type(v) is int for v in res["ksm"].values())
    assert (res["ksm"]["pages_shared"], res["ksm"]["pages_sharing"]) == (0, 0)  # after run=2
    assert res["reports"] == [] and res["ok"] is True
    assert res["checks"] and all(ch["ok"] for ch in res["checks"])
    assert json.loads((run_dir / "reports.json").read_text()) == []
    assert (run_dir / "cluster.json").exists() and list((run_dir / "logs").glob("ksmd-*.jsonl"))
    _assert_run_cleaned(res)


@pytest.mark.timeout(30)
def test_scenarios_lists_the_builtins():
    """`ksmlab scenarios` lists the built-in scenarios, default and idle among them, each
    with its description."""
    r = ksmlab("scenarios")
    assert r.returncode == 0, r.stderr
    names = {line.split()[0]: line for line in r.stdout.splitlines() if line.strip()}
    assert {"default", "idle"} <= set(names)
    assert "KSMLAB_IDLE_SECONDS" in names["idle"]


@pytest.mark.timeout(30)
def test_unknown_scenario_exits_2_with_a_message(tmp_path):
    """`ksmlab run NAME` for a scenario that does not exist exits 2, says so and lists the
    built-in ones, without starting a run."""
    r = ksmlab("run", "no-such-scenario", "--json", cwd=tmp_path)
    assert r.returncode == 2
    assert "no scenario 'no-such-scenario'" in r.stderr
    assert "default" in r.stderr and "idle" in r.stderr
    assert r.stdout == "" and not (tmp_path / "runs").exists()


_GOOD = '''
from protocol.abi import MADV_MERGEABLE, PAGE_SIZE
NAME = "from-file"
OPTIONS = {"frames": 256}

async def scenario(c, ctx):
    t = await c.spawn_task()
    addr = await t.mmap(8 * PAGE_SIZE)
    await t.memset(addr, 0x5A, 8 * PAGE_SIZE)
    await t.madvise(addr, 8 * PAGE_SIZE, MADV_MERGEABLE)
    await c.ksm_start()
    ctx.expect_counters("merged", pages_shared=1, pages_sharing=7)
    ctx.expect("wanted pages_sharing", c.ksm_counters()["pages_sharing"], WANT)
    return {"frames": c.opts.frames}
'''


@pytest.mark.timeout(90)
@pytest.mark.parametrize("want, rc", [(7, 0), (8, 1)])
def test_scenario_file_path(tmp_path, want, rc):
    """`ksmlab run FILE.py` loads the scenario from the file with its NAME and OPTIONS; it
    exits 0 when every expectation holds and 1 (ok false, the failed check named) when
    one does not."""
    f = tmp_path / "mine.py"
    f.write_text(textwrap.dedent(_GOOD).replace("WANT", str(want)))
    with run_guard(tmp_path / "run"):
        r = ksmlab("run", str(f), "--json", "--run-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert r.returncode == rc, r.stderr[-3000:]
    res = json.loads(r.stdout)
    assert res["scenario"] == "from-file" and res["options"]["frames"] == 256
    assert res["reports"] == []
    if rc == 0:
        assert res["ok"] is True and res["result"] == {"frames": 256}
        assert res["ksm"]["pages_sharing"] == 7
    else:
        assert res["ok"] is False
        assert res["failed"] == "wanted pages_sharing: got 7, expected 8"
    _assert_run_cleaned(res)


@pytest.mark.timeout(10)
def test_idle_time_limit_comes_from_args_then_env_then_default(monkeypatch):
    """The idle scenario's limit: ctx.args["seconds"] wins over $KSMLAB_IDLE_SECONDS, which
    wins over the 30 s default; junk or a negative limit is refused."""
    monkeypatch.delenv("KSMLAB_IDLE_SECONDS", raising=False)
    assert idle_seconds({}) == 30.0
    monkeypatch.setenv("KSMLAB_IDLE_SECONDS", "2.5")
    assert idle_seconds({}) == 2.5
    assert idle_seconds({"seconds": 1}) == 1.0
    assert idle_seconds({"seconds": "0.25"}) == 0.25  # `--arg seconds=0.25` arrives as text
    for bad in ("soon", "-1", "1e9"):
        monkeypatch.setenv("KSMLAB_IDLE_SECONDS", bad)
        with pytest.raises(ValueError, match="idle"):
            idle_seconds({})


@pytest.mark.timeout(60)
def test_idle_ends_by_itself_at_its_time_limit(tmp_path):
    """`ksmlab run idle` is bounded: with KSMLAB_IDLE_SECONDS=0.5 it merges, idles, checks
    that the tasks read back what they wrote, and exits 0 on its own."""
    env = {**os.environ, "KSMLAB_IDLE_SECONDS": "0.5"}
    t0 = time.monotonic()
    with run_guard(tmp_path / "run"):
        r = ksmlab("run", "idle", "--json", "--run-dir", str(tmp_path / "run"), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    assert res["ok"] is True and res["result"]["seconds"] == 0.5
    assert res["seconds"] >= 0.5 and time.monotonic() - t0 < 40
    assert [ch["ok"] for ch in res["checks"]] == [True, True, True]
    _assert_run_cleaned(res)


# --- stat and ctl against a running idle scenario -----------------------------------------------

@pytest.fixture(scope="module")
def idle_run(tmp_path_factory) -> Iterator[Path]:
    """A `ksmlab run idle` in the background, up and merged; at the end it is stopped with
    SIGINT (Ctrl-C), which must tear the whole run down."""
    base = tmp_path_factory.mktemp("idle")
    run_dir = base / "run"
    env = {**os.environ, "KSMLAB_IDLE_SECONDS": "120"}
    errf = open(base / "stderr.txt", "wb")  # noqa: SIM115
    p = subprocess.Popen([sys.executable, "-m", "ksmlab.cli", "run", "idle", "--json",
                          "--run-dir", str(run_dir)], stdout=subprocess.DEVNULL, stderr=errf,
                         env=env, cwd=base)
    errf.close()
    run_id = None
    try:
        deadline = time.monotonic() + 45
        while True:
            assert p.poll() is None, (base / "stderr.txt").read_text()[-3000:]
            if (run_dir / "cluster.json").exists():
                run_id = json.loads((run_dir / "cluster.json").read_text())["run_id"]
                st = ksmlab("stat", "--run", str(run_dir))
                if st.returncode == 0 and "/sys/kernel/mm/ksm/pages_sharing:31\n" in st.stdout:
                    break
            assert time.monotonic() < deadline, "the idle run did not come up and merge"
            time.sleep(0.1)
        yield run_dir
        p.send_signal(signal.SIGINT)
        assert p.wait(30) == 130
        assert "interrupted; the run was torn down" in (base / "stderr.txt").read_text()
        assert list_segments(run_id) == []
        assert _actor_procs(str(run_dir / "cluster.json")) == []
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
        with run_guard(run_dir):
            pass


def _stat(run_dir: Path) -> dict[str, str]:
    r = ksmlab("stat", "--run", str(run_dir))
    assert r.returncode == 0, r.stderr
    out = {}
    for line in r.stdout.splitlines():
        path, _, value = line.partition(":")
        assert path.startswith("/sys/kernel/mm/ksm/"), line
        out[path.rsplit("/", 1)[1]] = value
    return out


@pytest.mark.timeout(90)
def test_stat_prints_every_sysfs_file_of_the_running_cluster(idle_run):
    """`ksmlab stat --run DIR` prints every /sys/kernel/mm/ksm file of the live run as
    grep . would: the idle scenario's merge (1 KSM page, 31 sharing it; the 16 unique
    pages unshared, or volatile once smart_scan skips them), run=1."""
    st = _stat(idle_run)
    assert set(st) == set(ALL_FILES)
    assert (st["run"], st["pages_shared"], st["pages_sharing"]) == ("1", "1", "31")
    assert int(st["pages_unshared"]) + int(st["pages_volatile"]) == 16
    assert int(st["full_scans"]) >= 2 and int(st["general_profit"]) > 0


@pytest.mark.timeout(90)
def test_ctl_set_and_get_with_the_kernels_validation(idle_run):
    """`ksmlab ctl set pages_to_scan 500` takes effect (get and stat show 500); `set run 3`
    fails with EINVAL and a non-zero exit and changes nothing; a bad number is EINVAL;
    `ctl get` of a knob that does not exist fails."""
    r = ksmlab("ctl", "set", "pages_to_scan", "500", "--run", str(idle_run))
    assert (r.returncode, r.stdout) == (0, "500\n"), r.stderr
    r = ksmlab("ctl", "get", "pages_to_scan", "--run", str(idle_run))
    assert (r.returncode, r.stdout) == (0, "500\n"), r.stderr
    assert _stat(idle_run)["pages_to_scan"] == "500"

    r = ksmlab("ctl", "set", "run", "3", "--run", str(idle_run))
    assert r.returncode != 0 and "EINVAL" in r.stderr, (r.returncode, r.stderr)
    r = ksmlab("ctl", "set", "sleep_millisecs", "soon", "--run", str(idle_run))
    assert r.returncode != 0 and "EINVAL" in r.stderr, (r.returncode, r.stderr)
    r = ksmlab("ctl", "get", "run", "--run", str(idle_run))
    assert (r.returncode, r.stdout) == (0, "1\n")

    r = ksmlab("ctl", "get", "no_such_knob", "--run", str(idle_run))
    assert r.returncode != 0 and "no_such_knob" in r.stderr and r.stdout == ""


@pytest.mark.timeout(30)
def test_stat_and_ctl_without_a_live_run_fail(tmp_path):
    """stat/ctl naming a folder with no running cluster exit 2 with a message."""
    for args in (["stat"], ["ctl", "get", "run"], ["ctl", "set", "run", "1"]):
        r = ksmlab(*args, "--run", str(tmp_path), cwd=tmp_path)
        assert r.returncode == 2 and "no running cluster" in r.stderr, (args, r.stderr)


BAD_RUNS = [
    (["--frames", "0"], "nr_frames must be >= 16"),
    (["--nodes", "0"], "nr_nodes must be in 1..8"),
    (["--variant", "nosuch"], "unknown variant 'nosuch'"),
    (["--arg", "noequals"], "--arg takes KEY=VALUE"),
    (["--arg", "=5"], "--arg takes KEY=VALUE"),
    (["--delay-at", "scan_get_next_rmap_item.before_spin_unlock=-1"], "MS a number >= 0"),
    (["--delay-at", "scan_get_next_rmap_item.before_spin_unlock=soon"], "MS a number >= 0"),
    (["--delay-at", "nosuch=1"], "unknown schedule point"),
    (["--frames", str(10**12)], "ENOMEM:"),
    (["--depth", "0"], "depth"),
    (["--scan", "fast"], "invalid choice: 'fast'"),
    (["--locks", "sysv"], "invalid choice: 'sysv'"),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("scan, locks", [("exact", "ofd"), ("vector", "word")])
def test_a_run_on_the_exact_scan_and_ofd_locks_records_both_and_passes(tmp_path, scan, locks):
    """The alternatives to the defaults (--scan batch --locks word) are whole runs too, and
    replay keeps them."""
    r = ksmlab("run", "cve-2011-2183", "--seed", "3", "--arg", "seconds=3", "--scan", scan,
               "--locks", locks, "--json", "--run-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    opts = json.loads((tmp_path / "run" / "cluster.json").read_text())["options"]
    assert (opts["scan"], opts["locks"]) == (scan, locks)
    with pytest.raises(ValueError, match="scan must be one of"):
        ClusterOptions(scan="fast").check()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("extra,message", BAD_RUNS, ids=[" ".join(e) for e, _m in BAD_RUNS])
def test_bad_run_options_exit_2_before_anything_is_created(tmp_path, extra, message):
    """Each is refused with the reason and exit 2, with no traceback, no run folder and no
    segment: the check comes before the boot (issue 11, "Command line" and "Limits")."""
    p = subprocess.Popen([sys.executable, "-m", "ksmlab.cli", "run", "default", "--run-dir",
                          str(tmp_path / "run"), *extra], cwd=tmp_path, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 2, (p.returncode, out[-500:], err[-500:])
    assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()
    assert not [s for s in list_segments() if s.startswith(f"ksmlab_{p.pid}_")]


@pytest.mark.timeout(30)
def test_a_scenario_file_that_does_not_compile_exits_2_with_its_line(tmp_path):
    bad = tmp_path / "broken.py"
    bad.write_text("async def scenario(c, ctx):\n    return (\n")
    r = ksmlab("run", str(bad), cwd=tmp_path)
    assert r.returncode == 2 and f"scenario file {bad}:" in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.timeout(90)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_tear_the_run_down_like_ctrl_c(tmp_path, sig):
    """A run told to stop by SIGTERM (kill, systemd, a CI timeout) or SIGHUP (the terminal
    went away) ends as Ctrl-C does: a message, reports.json, and no process, segment or
    socket left (issue 11, "Not every hang ends")."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "KSMLAB_IDLE_SECONDS": "120"}
    p = subprocess.Popen([sys.executable, "-m", "ksmlab.cli", "run", "idle", "--json",
                          "--run-dir", str(run_dir)], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    with run_guard(run_dir):
        try:
            deadline = time.monotonic() + 45
            while not (run_dir / "cluster.json").exists():
                assert p.poll() is None and time.monotonic() < deadline, p.stderr.read() if p.poll() else ""
                time.sleep(0.1)
            run_id = json.loads((run_dir / "cluster.json").read_text())["run_id"]
            while not list(run_dir.glob("logs/task-*.jsonl")):      # the scenario is running
                assert time.monotonic() < deadline
                time.sleep(0.1)
            p.send_signal(sig)
            err = p.communicate(timeout=40)[1]
        finally:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        assert p.returncode == 128 + sig, err[-2000:]
        assert f"{signal.Signals(sig).name}; the run was torn down" in err
        assert (run_dir / "reports.json").exists()
        assert list_segments(run_id) == []
        assert _actor_procs(str(run_dir / "cluster.json")) == []
        assert not [f for f in run_dir.rglob("*") if f.is_socket()]


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


@pytest.mark.timeout(30)
@pytest.mark.skipif(os.geteuid() != 0, reason="planting another user's files needs root (chown)")
def test_sweep_leaves_another_users_files_alone_with_a_warning(tmp_path):
    """A segment and a socket folder named like a dead run's but owned by someone else:
    sweep (and every run's boot, which sweeps) must neither fail on them nor remove them."""
    rid = "deadbeef"
    seg = f"/dev/shm/ksmlab_{_dead_pid()}_{rid}_kernel"
    sock = "/tmp/ksmlab-deadbee0"      # another run id: one with no segment left
    try:
        Path(seg).write_bytes(b"x")
        os.makedirs(sock, exist_ok=True)
        for p in (seg, sock):
            os.chown(p, 65534, 65534)
        r = ksmlab("sweep", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert f"left alone {seg}: owned by uid 65534" in r.stderr
        assert f"left alone {sock}: owned by uid 65534" in r.stderr
        assert os.path.exists(seg) and os.path.isdir(sock)
        assert seg.rsplit("/", 1)[1] not in r.stdout
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(seg)
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(sock)


@pytest.mark.timeout(90)
def test_a_scenario_that_never_returns_ends_at_its_deadline_with_a_report(tmp_path):
    """No run waits for ever: past --time-limit (or the scenario's default deadline) the run
    ends with a hung-task report naming what it waited for, and is torn down."""
    f = tmp_path / "forever.py"
    f.write_text(textwrap.dedent("""
        import asyncio
        NAME = "forever"
        async def scenario(c, ctx):
            t = await c.spawn_task()
            await t.mmap(4096)
            await asyncio.sleep(3600)
    """))
    run_dir = tmp_path / "run"
    with run_guard(run_dir):
        t0 = time.monotonic()
        r = ksmlab("run", str(f), "--json", "--time-limit", "3", "--run-dir", str(run_dir), cwd=tmp_path)
        assert time.monotonic() - t0 < 60
    assert r.returncode == 2, r.stderr[-2000:]
    res = json.loads(r.stdout.splitlines()[-1])
    assert [x["title"] for x in res["reports"]] == ["INFO: scenario forever did not finish within 3 seconds"]
    assert res["reports"][0]["kind"] == "hung_task" and not res["ok"]
    assert res["failed"] == "INFO: scenario forever did not finish within 3 seconds", res["failed"]
    _assert_run_cleaned(res)
    assert ksmlab("run", "default", "--time-limit", "0", cwd=tmp_path).returncode == 2
