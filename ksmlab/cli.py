# The `ksmlab` command line: run, replay, stress, ctl, stat, log, sweep, scenarios.
#
# A thin front: it wires options to the Cluster/scenario API and to a live run's
# shared memory and sockets; it holds no kernel logic.
from __future__ import annotations

import argparse
import asyncio
import errno
import json
import os
import signal
import sys
from dataclasses import asdict, fields
from typing import Any

from actors.cluster import ClusterOptions
from actors.kernel.ksm_scan import SCAN_MODES
from actors.kernel.schedule import STRATEGIES
from ksmlab import kcov, live, logview, stress, trace
from ksmlab.scenario import builtin_scenarios, load_scenario, run_scenario
from ksmlab.sim import command as sim_command
from shared_mem.locks import IMPLS
from shared_mem.segment import sweep_stale

_CLUSTER_FIELDS = frozenset(f.name for f in fields(ClusterOptions))
_TEARDOWN_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _delay(s: str) -> tuple[str, float]:
    name, _, ms = s.partition("=")
    try:
        value = float(ms)
    except ValueError:
        value = -1.0
    if not name or not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected POINT=MS with MS a number >= 0, not {s!r}")
    return name, value / 1000.0


def _run_options(a: argparse.Namespace) -> dict[str, Any]:
    """Cluster options from the run/replay command line (None: the scenario's own)."""
    opts: dict[str, Any] = {"seed": a.seed, "frames": a.frames, "nodes": a.nodes, "run_dir": a.run_dir,
                            "echo_reports": not a.json, "sched": a.sched, "depth": a.depth}
    if a.variant:
        opts["variants"] = tuple(a.variant)
    if a.delay_at:
        opts["delays"] = dict(a.delay_at)
    if a.no_trace_locks:
        opts["trace_locks"] = False
    if getattr(a, "no_ksm_tracepoints", False):
        opts["ksm_tracepoints"] = False
    if getattr(a, "no_fork_server", False):
        opts["fork_server"] = False
    if getattr(a, "trace_locks", False):
        opts["trace_locks"] = True
    if a.stop_on_report:
        opts["stop_on_report"] = True
    if a.coverage:
        opts["coverage"] = a.coverage
    if getattr(a, "time_limit", None) is not None:
        opts["time_limit"] = a.time_limit
    if getattr(a, "chaos", None):
        opts["chaos"] = a.chaos
    for name in ("scan", "locks"):
        if getattr(a, name, None):
            opts[name] = getattr(a, name)
    return opts


def run_and_print(scenario: str, opts: dict[str, Any], args: dict[str, str], quiet: bool) -> int:
    """Run one scenario with these options; print the summary or the JSON; exit status."""
    try:
        spec = load_scenario(scenario)
        # The options as the cluster will take them, checked before anything is created.
        merged = {k: v for k, v in {**spec.options, **opts}.items() if v is not None and k in _CLUSTER_FIELDS}
        ClusterOptions(**merged).check()
    except (KeyError, ValueError) as e:
        print(f"ksmlab: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"ksmlab: {errno.errorcode.get(e.errno or 0, 'error')}: {e.strerror or e}", file=sys.stderr)
        return 2
    where = os.path.abspath(scenario) if os.path.exists(scenario) else scenario
    opts = {**opts, "scenario": {"name": where, "args": args}}
    console = live.Console()
    log = (lambda s: None) if quiet else console.line
    peak: dict = {}

    got: list[int] = []

    async def main() -> dict:
        booted: list = []
        task = asyncio.create_task(run_scenario(spec, log=log, args=args, on_boot=booted.append, **opts))
        status = None if quiet else asyncio.create_task(live.status_loop(booted, console, peak))
        loop = asyncio.get_running_loop()
        # SIGTERM and SIGHUP end a run as Ctrl-C does: the scenario is cancelled and the
        # cluster torn down (processes, segments, sockets), not killed where it stands.
        for sig in _TEARDOWN_SIGNALS:
            loop.add_signal_handler(sig, lambda s=sig: (got.append(s), task.cancel()))
        try:
            return await task
        finally:
            for sig in _TEARDOWN_SIGNALS:
                loop.remove_signal_handler(sig)
            if status is not None:
                status.cancel()
            console.done()

    try:
        res = asyncio.run(main())
    except KeyboardInterrupt:
        print("ksmlab: interrupted; the run was torn down", file=sys.stderr)
        return 130
    except asyncio.CancelledError:
        if not got:
            raise
        print(f"ksmlab: {signal.Signals(got[0]).name}; the run was torn down", file=sys.stderr)
        return 128 + got[0]
    if quiet:
        print(json.dumps(res, default=str))
    else:
        _print_summary(res, peak)
    if res.get("failed") and not res.get("reports"):
        return 1
    return 0 if res.get("ok") else (2 if res.get("reports") else 1)


def _scenario_args(pairs: list[str]) -> dict[str, str]:
    bad = [kv for kv in pairs if not kv.partition("=")[0] or "=" not in kv]
    if bad:
        raise ValueError(f"--arg takes KEY=VALUE, not {', '.join(map(repr, bad))}")
    return dict(kv.split("=", 1) for kv in pairs)


def cmd_run(a: argparse.Namespace) -> int:
    try:
        args = _scenario_args(a.arg)
    except ValueError as e:
        print(f"ksmlab: {e}", file=sys.stderr)
        return 2
    return run_and_print(a.scenario, _run_options(a), args, a.json)


def cmd_replay(a: argparse.Namespace) -> int:
    """Run a recorded run again: same scenario, arguments, seed, plan, variants and delays."""
    path = os.path.join(a.run, "cluster.json")
    try:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)["options"]
    except (OSError, KeyError, ValueError) as e:
        print(f"ksmlab: {a.run}: not a run folder with a recorded option set ({e})", file=sys.stderr)
        return 2
    sc = old.get("scenario") or {}
    if not sc.get("name"):
        print(f"ksmlab: {a.run}: the run records no scenario (it was not started by `ksmlab run`)",
              file=sys.stderr)
        return 2
    keep = ("seed", "frames", "nodes", "variants", "delays", "sched", "depth", "stop_on_report",
            "trace_locks", "ksm_tracepoints", "hung_task_timeout", "swap_slots", "max_tasks", "max_mms", "va_pages",
            "oom_reaper_delay", "time_limit", "chaos", "scan", "locks")
    opts = {k: old[k] for k in keep if k in old}
    opts["variants"] = tuple(opts.get("variants") or ())
    opts["run_dir"] = a.run_dir
    opts["echo_reports"] = not a.json
    if not a.json:
        print(f"ksmlab: replaying {a.run}: scenario {sc['name']}, seed {opts.get('seed')}, "
              f"sched {opts.get('sched')}/{opts.get('depth')}, variants {list(opts['variants'])}")
    return run_and_print(sc["name"], opts, dict(sc.get("args") or {}), a.json)


def cmd_cover(a: argparse.Namespace) -> int:
    try:
        rows = kcov.table(a.dir)
    except FileNotFoundError as e:
        print(f"ksmlab: {e}", file=sys.stderr)
        return 2
    ksm_c = kcov.ksm_c_table(rows)
    if a.json:
        print(json.dumps({"functions": [asdict(r) for r in rows], "mm_ksm_c": [asdict(r) for r in ksm_c]}))
    else:
        print(kcov.format_table(rows, only_missing=a.missing))
        print()
        print(kcov.format_ksm_c_table(ksm_c, only_missing=a.missing))
    return 0


def cmd_stress(a: argparse.Namespace) -> int:
    try:
        return stress.main(a)
    except KeyboardInterrupt:
        # run_pool() started no further run and stopped the ones going (SIGTERM: each
        # tore its cluster down) before this reaches here
        print("ksmlab: interrupted; the campaign's runs still going were stopped", file=sys.stderr)
        return 130


def cmd_sim(a: argparse.Namespace) -> int:
    return sim_command.main(a)


def expected_failure(res: dict) -> str | None:
    """The run's variants reverted fixes, and every report is of a kind their bugs give:
    the bug reproduced as intended (an expected failure, TAP's `# TODO`)."""
    variants = (res.get("options") or {}).get("variants") or []
    kinds = {k for v in variants for k in stress.bug_kinds(v)}
    reps = res.get("reports") or []
    if not variants or not reps or not kinds:
        return None
    got = {stress.report_kind(r) for r in reps}
    return ", ".join(sorted(got)) if got <= kinds else None


def _print_sysfs(title: str, values: dict) -> None:
    print(f"{title}: grep . /sys/kernel/mm/ksm/*")
    for k, v in sorted(values.items()):
        if not k.startswith("_"):
            print(f"  /sys/kernel/mm/ksm/{k}:{v}")


def _print_summary(res: dict, peak: dict | None = None) -> None:
    print()
    checks = res.get("checks") or []
    if checks:
        print(f"1..{len(checks)}")
    xfail = expected_failure(res)
    verdict = "PASS" if res["ok"] else (f"XFAIL (expected: the variant reproduced its bug: {xfail})"
                                        if xfail else "FAIL")
    print(f"scenario {res['scenario']}: {verdict} in {res['seconds']} s (seed {res.get('seed')})")
    if res.get("skipped"):
        print(f"  skipped: {res['skipped']}")
    if res.get("failed"):
        print(f"  failed: {res['failed']}")
    if peak and peak.get("pages_sharing", 0) > 0:
        _print_sysfs(f"at the peak of merging ({peak.get('_t_s')} s)", peak)
    end = {**(res.get("knobs") or {}), **(res.get("ksm_final") or res.get("ksm") or {})}
    _print_sysfs("at the end", end)
    for r in res.get("reports", []):
        print(f"report: {r['title']}")
        if r.get("svg"):
            print(f"picture: {os.path.join(res.get('run_dir') or '', r['svg'])}")
    print(f"run folder: {res.get('run_dir')}")


def cmd_stat(a: argparse.Namespace) -> int:
    try:
        run = live.find_run(a.run)
        with live.attach(run) as km:
            for name, value in sorted(live.sysfs_files(km).items()):
                print(f"/sys/kernel/mm/ksm/{name}:{value}")
    except live.NoRun as e:
        print(f"ksmlab: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_ctl(a: argparse.Namespace) -> int:
    try:
        run = live.find_run(a.run)
        if a.op == "get":
            with live.attach(run) as km:
                files = live.sysfs_files(km)
            if a.knob not in files:
                print(f"ksmlab: /sys/kernel/mm/ksm/{a.knob}: No such file or directory", file=sys.stderr)
                return 2
            print(files[a.knob])
            return 0
        if a.value is None:
            print("ksmlab: ctl set needs KNOB VALUE", file=sys.stderr)
            return 2
        print(live.sysfs_write(run, a.knob, a.value))
        return 0
    except live.NoRun as e:
        print(f"ksmlab: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"ksmlab: write error: {e}", file=sys.stderr)
        return 1


def cmd_sweep(a: argparse.Namespace) -> int:
    skipped: list[str] = []
    removed = sweep_stale(dry_run=a.dry_run, skipped=skipped)
    removed += live.sweep_socket_dirs(dry_run=a.dry_run, skipped=skipped)
    for name in removed:
        print(("would remove " if a.dry_run else "removed ") + name)
    for why in skipped:
        print(f"ksmlab: sweep: left alone {why}", file=sys.stderr)
    return 0


def cmd_scenarios(a: argparse.Namespace) -> int:
    for name, spec in sorted(builtin_scenarios().items()):
        print(f"{name:24} {spec.description}")
    return 0


def cmd_log(a: argparse.Namespace) -> int:
    return logview.main(a)


def cmd_trace(a: argparse.Namespace) -> int:
    return trace.main(a)


def _plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sched", choices=STRATEGIES, help="schedule plan strategy (default pct)")
    p.add_argument("--depth", type=int, help="PCT depth d: d-1 priority change points per epoch (default 3)")


def _impl_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scan", choices=sorted(SCAN_MODES),
                   help="ksmd's scan: batch (vectorized runs of pages, the default), vector (batch plus tree walks on arrays) or exact (page by page)")
    p.add_argument("--locks", choices=sorted(IMPLS),
                   help="lock implementation: word (shared-word CAS, the default) or ofd (OFD byte locks)")
    p.add_argument("--no-fork-server", action="store_true",
                   help="start every actor as its own interpreter instead of forking it from the fork "
                        "server (actors/zygote.py)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ksmlab", description="An executable multiprocess model of Linux KSM.")
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="start a cluster and run a scenario (default: the tour)")
    r.add_argument("scenario", nargs="?", default="default", help="built-in scenario name or a .py file")
    r.add_argument("--seed", type=int)
    r.add_argument("--frames", type=int, help="physical page frames (4 KiB each)")
    r.add_argument("--nodes", type=int, help="simulated NUMA nodes")
    r.add_argument("--run-dir", help="run folder (default: runs/<time>-<run id>)")
    r.add_argument("--chaos", type=float, metavar="RATE",
                   help="chaos events per second: an actor SIGSTOPped for up to 1 s, or a task "
                        "between requests SIGKILLed (its exit then runs)")
    _impl_args(r)
    r.add_argument("--time-limit", type=float, metavar="S",
                   help="end the scenario with a hung-task report after S seconds (default: twice "
                        "its seconds argument plus 120, else 300)")
    r.add_argument("--variant", action="append", metavar="NAME", help="revert a seed fix (repeatable)")
    r.add_argument("--delay-at", action="append", type=_delay, metavar="POINT=MS",
                   help="force a delay at a schedule point (repeatable)")
    r.add_argument("--no-trace-locks", action="store_true", help="do not record lock operations")
    r.add_argument("--no-ksm-tracepoints", action="store_true",
                   help="do not log the per-page KSM tracepoints (ksm_merge_one_page, ...), as a kernel "
                        "with them off")
    r.add_argument("--trace-locks", action="store_true", help="record lock operations even where the scenario "
                   "turns them off (the soak)")
    r.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE",
                   help="scenario argument, e.g. --arg seconds=30 for soak (repeatable)")
    r.add_argument("--json", action="store_true", help="print one JSON object at the end")
    _plan_args(r)
    r.add_argument("--stop-on-report", action="store_true", help="end the run at its first report")
    r.add_argument("--coverage", metavar="DIR", help="record kernel-path coverage of every actor into DIR")
    r.set_defaults(fn=cmd_run)

    rp = sub.add_parser("replay", help="run a recorded run again with its seed and options")
    rp.add_argument("run", help="the run folder to replay")
    rp.add_argument("--run-dir", help="folder for the new run (default: runs/<time>-<run id>)")
    rp.add_argument("--json", action="store_true", help="print one JSON object at the end")
    rp.set_defaults(fn=cmd_replay)

    st = sub.add_parser("stress", help="run a campaign of seeds against historical KSM bugs")
    st.add_argument("--bug", required=True, help="a bug (variant) name, or all")
    st.add_argument("--fixed", action="store_true", help="today's kernel: the campaign must find nothing "
                    "but ksmlab's known findings (run with their proposed fixes, \"fix:\" variants)")
    st.add_argument("--without-proposed-fixes", action="store_true",
                    help="with --fixed: today's kernel exactly, without the \"fix:\" variants")
    st.add_argument("--runs", type=int, default=20, help="seeds per bug")
    st.add_argument("--scenario", help="run this scenario instead of the bug's own (e.g. soak: blind discovery)")
    st.add_argument("--jobs", type=int, default=1, help="runs at a time")
    st.add_argument("--time-limit", type=float, help="seconds per run (default: per bug)")
    st.add_argument("--seed", type=int, help="first seed (default: random); run i uses seed + i")
    st.add_argument("--runs-root", default="runs/stress", help="where the run folders go")
    st.add_argument("--json", action="store_true", help="print one JSON object at the end")
    st.add_argument("--coverage", metavar="DIR", help="record kernel-path coverage of every run into DIR "
                    "and print the coverage table")
    st.add_argument("--chaos", type=float, metavar="RATE",
                    help="every run under chaos (run --chaos): actors SIGSTOPped, idle tasks SIGKILLed")
    _impl_args(st)
    st.add_argument("--spawn-runs", action="store_true",
                    help="start every run as its own interpreter instead of forking it from the "
                         "campaign's run fork server (ksmlab/runfork.py)")
    st.add_argument("--guided", action="store_true",
                    help="coverage-guided: keep seeds that reach new branches and mutate them (needs --coverage)")

    sm = sub.add_parser("sim", help="the kernel paths under a deterministic scheduler: search, replay, "
                        "exhaustive bounded search")
    sim_command.add_arguments(sm)
    sm.set_defaults(fn=cmd_sim)

    cv = sub.add_parser("cover", help="the kernel functions and branches that runs recorded with --coverage reached")
    cv.add_argument("dir", help="the coverage folder")
    cv.add_argument("--missing", action="store_true", help="list only the functions never reached")
    cv.add_argument("--json", action="store_true")
    cv.set_defaults(fn=cmd_cover)
    _plan_args(st)
    st.set_defaults(fn=cmd_stress)

    s = sub.add_parser("stat", help="print every /sys/kernel/mm/ksm file of a running cluster")
    s.add_argument("--run", help="run folder (default: the newest live run under ./runs)")
    s.set_defaults(fn=cmd_stat)

    c = sub.add_parser("ctl", help="read or write a KSM knob of a running cluster")
    c.add_argument("op", choices=["get", "set"])
    c.add_argument("knob")
    c.add_argument("value", nargs="?")
    c.add_argument("--run", help="run folder (default: the newest live run under ./runs)")
    c.set_defaults(fn=cmd_ctl)

    sw = sub.add_parser("sweep", help="remove what killed runs left in /dev/shm and /tmp")
    sw.add_argument("--dry-run", action="store_true")
    sw.set_defaults(fn=cmd_sweep)

    sc = sub.add_parser("scenarios", help="list the built-in scenarios")
    sc.set_defaults(fn=cmd_scenarios)

    lg = sub.add_parser("log", help="a run's merged timeline, trace-cmd style (filters, --around REPORT)")
    logview.add_arguments(lg)
    tr = sub.add_parser("trace", help="export a run as a Trace Event Format file for ui.perfetto.dev")
    trace.add_arguments(tr)
    tr.set_defaults(fn=cmd_trace)
    lg.set_defaults(fn=cmd_log)
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    return a.fn(a)


if __name__ == "__main__":
    sys.exit(main())
