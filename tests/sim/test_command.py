# `ksmlab sim` as a user runs it: the JSON object, replay of a printed schedule, bad input.
from __future__ import annotations

import json
import re

import pytest

from ksmlab.cli import main

pytestmark = [pytest.mark.timeout(120)]

KEYS = {"scenario", "variants", "strategy", "preemptions", "schedules", "exhaustive", "failures", "first_failure"}


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["sim", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_json_of_a_failing_search_and_of_an_exhaustive_one(capsys):
    rc, out, _ = run(capsys, "mmput-race", "--variant", "mmput-race", "--json")
    j = json.loads(out)
    assert rc == 1 and set(j) >= KEYS
    assert j["variants"] == ["mmput-race"] and j["strategy"] == "dfs" and j["failures"] == 1
    assert j["first_failure"]["report_kind"] == "kasan_uaf"
    assert re.fullmatch(r"v1:(\d+>\d+)(,\d+>\d+)*", j["first_failure"]["schedule"])
    rc, out, _ = run(capsys, "mmput-race", "--json")
    j = json.loads(out)
    assert rc == 0 and j["exhaustive"] is True and j["failures"] == 0 and j["first_failure"] is None
    assert j["schedules"] > 10 and j["preemptions"] == 2


def test_the_printed_replay_command_reproduces_the_report(capsys):
    rc, out, _ = run(capsys, "cve-2011-2183", "--variant", "cve-2011-2183")
    assert rc == 1
    sched = re.search(r"--replay '([^']+)'", out).group(1)
    assert "| CPU0: ksmd | CPU1: exit:victim |" in out
    rc, out2, _ = run(capsys, "cve-2011-2183", "--variant", "cve-2011-2183", "--replay", sched, "--json")
    j = json.loads(out2)
    assert rc == 1 and j["failure"]["report_kind"] == "oops"
    assert j["failure"]["title"].startswith("BUG: kernel NULL pointer dereference")
    # Without the variant the same schedule is harmless: the fix is what changed.
    rc, out3, _ = run(capsys, "cve-2011-2183", "--replay", sched, "--json")
    assert rc == 0 and json.loads(out3)["failure"] is None


def test_a_bug_name_selects_its_scenario(capsys):
    rc, out, _ = run(capsys, "stale-stable-nodes:swapin-no-copy", "--variant", "stale-stable-nodes:swapin-no-copy",
                     "--strategy", "pct", "--json")
    j = json.loads(out)
    assert rc == 1 and j["scenario"] == "stale-stable-nodes-swapin"


@pytest.mark.parametrize("argv,what", [
    (["no-such-scenario"], "unknown sim scenario"),
    (["mmput-race", "--replay", "9>1"], "must start with v1:"),
    (["mmput-race", "--replay", "v1:9-1"], "is not STEP>TID"),
    (["mmput-race", "--schedules", "0"], "at least 1"),
])
def test_bad_input_is_einval_and_runs_nothing(capsys, argv, what):
    rc, out, err = run(capsys, *argv)
    assert rc == 2 and out == ""
    assert "EINVAL" in err and what in err


def test_unknown_variant_is_einval(capsys):
    rc, _out, err = run(capsys, "mmput-race", "--variant", "no-such-fix")
    assert rc == 2 and "unknown variant" in err
