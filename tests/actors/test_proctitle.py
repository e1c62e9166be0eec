# actors/proctitle.py: a process shows another command line in its own argument area,
# NUL-separated and padded, only if it fits; what ps and the leftover searches read.
from __future__ import annotations

import ast
import subprocess
import sys

_SCRIPT = """
import sys
from actors import proctitle
cap = proctitle.capacity()
fits = proctitle.set_cmdline(["python", "-m", "actors.main", "/r/cluster.json", "zygote", "zygote"])
after = open("/proc/self/cmdline", "rb").read()
too_long = proctitle.set_cmdline(["x" * (cap + 1)])
print(repr((cap, fits, after, too_long, open("/proc/self/cmdline", "rb").read() == after)))
"""


def _run(*extra: str) -> tuple:
    out = subprocess.run([sys.executable, "-c", _SCRIPT, *extra], capture_output=True, text=True, check=True)
    return ast.literal_eval(out.stdout)


def test_a_command_line_that_fits_replaces_the_old_one_and_the_rest_is_nul():
    cap, fits, after, too_long, unchanged = _run("=" * 200)
    want = b"python\0-m\0actors.main\0/r/cluster.json\0zygote\0zygote\0"
    assert fits and len(after) == cap and after.startswith(want) and set(after[len(want):]) == {0}
    assert [a for a in after.split(b"\0") if a] == [b"python", b"-m", b"actors.main", b"/r/cluster.json",
                                                    b"zygote", b"zygote"]
    assert not too_long and unchanged  # one that does not fit changes nothing
