# Scenarios: async programs against the Cluster API, with kernel-test style checks.
#
# A scenario module defines NAME, DESCRIPTION, OPTIONS (Cluster options it needs)
# and `async def scenario(c, ctx)`. ctx.expect() checks one expectation the way
# the kernel's tests do (stop at the first failure, say which), and snapshots the
# KSM counters at every check, so a run can report the counters "as they stood at
# the test's last assertion" rather than after clean-up.
from __future__ import annotations

import asyncio
import importlib
import importlib.util
import json
import os
import pkgutil
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from actors.cluster import Cluster
from ksmlab import picture, scenarios


class ExpectationFailed(AssertionError):
    """A check of the scenario failed (got is not want), or, with only `what`, the run
    failed as a whole (its deadline passed)."""

    def __init__(self, what: str, got: Any = None, want: Any = None, ksm: dict[str, int] | None = None) -> None:
        super().__init__(what if got is None and want is None else f"{what}: got {got!r}, expected {want!r}")
        self.what = what
        self.got = got
        self.want = want
        self.ksm = ksm or {}


class Skipped(Exception):
    """The scenario cannot run in this configuration (like KSFT_SKIP)."""


@dataclass
class ScenarioContext:
    cluster: Cluster
    args: dict[str, Any] = field(default_factory=dict)
    checks: list[dict[str, Any]] = field(default_factory=list)
    last_ksm: dict[str, int] | None = None
    log: Callable[[str], None] = lambda s: None

    def snapshot(self) -> dict[str, int]:
        self.last_ksm = self.cluster.ksm_counters()
        return self.last_ksm

    def expect(self, what: str, got: Any, want: Any) -> None:
        ksm = self.snapshot()
        ok = got == want
        self.checks.append({"what": what, "got": got, "want": want, "ok": ok})
        # kselftest/TAP: "ok N - what", "not ok N - what"
        n = len(self.checks)
        self.log(f"{'ok' if ok else 'not ok'} {n} - {what}: {got!r}" + ("" if ok else f" (expected {want!r})"))
        if not ok:
            raise ExpectationFailed(what, got, want, ksm)

    def expect_counters(self, what: str, **want: int) -> None:
        """Compare KSM counters by sysfs name, all at once (one snapshot)."""
        ksm = self.snapshot()
        got = {k: ksm[k] for k in want}
        self.expect(what, got, want)


@dataclass
class ScenarioSpec:
    name: str
    description: str
    options: dict[str, Any]
    fn: Callable[[Cluster, ScenarioContext], Awaitable[Any]]
    module: ModuleType


def _from_module(mod: ModuleType) -> ScenarioSpec:
    fn = getattr(mod, "scenario", None)
    if fn is None:
        raise ValueError(f"{mod.__name__}: a scenario module needs `async def scenario(c, ctx)`")
    return ScenarioSpec(getattr(mod, "NAME", mod.__name__.rsplit(".", 1)[-1]),
                        getattr(mod, "DESCRIPTION", (mod.__doc__ or "").strip()),
                        dict(getattr(mod, "OPTIONS", {})), fn, mod)


def builtin_scenarios() -> dict[str, ScenarioSpec]:
    out = {}
    for info in pkgutil.iter_modules(scenarios.__path__):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"ksmlab.scenarios.{info.name}")
        for spec in getattr(mod, "SCENARIOS", None) or [_from_module(mod)]:
            out[spec.name] = spec
    return out


def load_scenario(name_or_path: str) -> ScenarioSpec:
    if os.path.exists(name_or_path):
        modname = "ksmlab_user_scenario_" + os.path.basename(name_or_path).replace(".", "_")
        spec = importlib.util.spec_from_file_location(modname, name_or_path)
        if spec is None or spec.loader is None:
            raise ValueError(f"cannot load scenario file {name_or_path}")
        mod = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(mod)
        except SyntaxError as e:
            raise ValueError(f"scenario file {name_or_path}:{e.lineno}: {e.msg}") from e
        except Exception as e:     # the file's own code failed while loading
            raise ValueError(f"scenario file {name_or_path}: {type(e).__name__}: {e}") from e
        return _from_module(mod)
    found = builtin_scenarios()
    if name_or_path not in found:
        raise KeyError(f"no scenario {name_or_path!r}; built-in: {', '.join(sorted(found))}")
    return found[name_or_path]


DEFAULT_TIME_LIMIT = 300.0


def default_time_limit(args: dict[str, Any]) -> float:
    """A scenario's deadline when the run names none and the scenario module has no
    time_limit(args) of its own: twice its `seconds` argument (the race loops) plus two
    minutes for boot and teardown, else five minutes. A scenario past it ends with a
    hung-task report, not never."""
    try:
        return 2 * float(args["seconds"]) + 120
    except (KeyError, TypeError, ValueError):
        return DEFAULT_TIME_LIMIT


async def run_scenario(spec: ScenarioSpec, log: Callable[[str], None] = lambda s: None,
                       args: dict[str, Any] | None = None,
                       on_boot: Callable[[Cluster], Any] | None = None, **options: Any) -> dict[str, Any]:
    """Boot a cluster with the scenario's options (overridden by `options`), run it, tear down."""
    given = {k: v for k, v in options.items() if v is not None}
    if given.get("seed") is None:
        given["seed"] = secrets.randbelow(1 << 31)
    # A scenario may draw cluster options from the seed (the soak draws NUMA nodes);
    # options given by the caller win over drawn ones, drawn ones over OPTIONS.
    derive = getattr(spec.module, "derive", None)
    drawn = derive(int(given["seed"]), dict(args or {})) if derive is not None else {}
    opts = {**spec.options, **drawn, **given}
    t0 = time.monotonic()
    result: dict[str, Any] = {"scenario": spec.name, "ok": False}
    c = Cluster(**opts)
    ctx = ScenarioContext(c, args or {}, log=log)
    log(f"ksmlab: booting a cluster for scenario {spec.name} (seed {given['seed']})")
    try:
        await c.boot()
        if on_boot is not None:
            on_boot(c)
        result.update(run_dir=c.run_dir, seed=c.opts.seed, options=c.describe())
        log(f"run {c.run_id}: scenario {spec.name}, seed {c.opts.seed}, run folder {c.run_dir}")
        log("options: " + json.dumps({k: v for k, v in c.describe().items() if k not in ("run_dir",)},
                                     sort_keys=True))
        hook = getattr(spec.module, "time_limit", None)
        limit = c.opts.time_limit or (hook(args or {}) if hook else default_time_limit(args or {}))
        try:
            deadline = asyncio.timeout(limit)
            try:
                async with deadline:
                    value = await spec.fn(c, ctx)
            except TimeoutError:
                if not deadline.expired():
                    raise                      # the scenario's own timeout, not the deadline
                rep = c.deadline_report(f"scenario {spec.name}", limit)
                raise ExpectationFailed(rep["title"]) from None
            result["ok"] = True
            result["result"] = value
        except Skipped as e:
            result.update(ok=True, skipped=str(e))
        except ExpectationFailed as e:
            result["failed"] = str(e)
        except Exception as e:  # the run crashed or the scenario raised
            result["failed"] = f"{type(e).__name__}: {e}"
        if c.crashed is None and not c.stopped:
            ctx.last_ksm = ctx.last_ksm or c.ksm_counters()
        result["ksm"] = ctx.last_ksm or {}
        result["ksm_final"] = c.ksm_counters() if c.km is not None and not c.stopped else {}
        result["knobs"] = c.ksm_knobs() if c.km is not None and not c.stopped else {}
        result["checks"] = ctx.checks
        if c.opts.chaos:
            result["chaos"] = dict(c.chaos_counts)
    finally:
        await c.stop()
        result.setdefault("run_dir", c.opts.run_dir)
        result.setdefault("seed", c.opts.seed)
        result["reports"] = [{k: v for k, v in r.items() if k != "data"} | {"data": r.get("data")}
                             for r in c.reports]
        result["seconds"] = round(time.monotonic() - t0, 3)
        # A picture of each report (reports/report-N.svg, its "svg"); never fails the run.
        picture.attach_pictures(getattr(c, "run_dir", None), result["reports"])
    if result["ok"] and result["reports"]:
        result["ok"] = False
        result.setdefault("failed", f"{len(result['reports'])} report(s): {result['reports'][0]['title']}")
    return result
