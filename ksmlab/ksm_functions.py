# docs/ksm-functions.md as data: each function of today's mm/ksm.c and ours.
#
# The table is written for people (one row per kernel function, in mm/ksm.c's order,
# with the ksmlab function that does its work or why it is not modelled); this module
# is its one parser, used by the test that keeps it from rotting
# (tests/test_function_table.py) and by `ksmlab cover`, which answers the question a
# kernel engineer asks of a campaign: which functions of mm/ksm.c did it run?
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

TABLE = Path(__file__).resolve().parents[1] / "docs" / "ksm-functions.md"
REF = re.compile(r"`([A-Za-z_][\w.]*):([A-Za-z_][\w.]*)`")
NAME = re.compile(r"`([A-Za-z_]\w*)`")


@dataclass(frozen=True)
class Row:
    line: int
    kernel: tuple[str, ...]              # the mm/ksm.c function(s) the row is about
    refs: tuple[tuple[str, str], ...]    # (module, attribute) of ours; () if not modelled
    notes: str

    @property
    def modelled(self) -> bool:
        return bool(self.refs)


def rows(text: str) -> list[tuple[int, list[str]]]:
    """(line number, cells) of every table body row (header and rule rows skipped)."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.startswith("|") or line.startswith("|---") or line.startswith("| kernel function"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        out.append((n, cells))
    return out


def parse(text: str) -> list[Row]:
    """The well-formed rows (three cells); tests/test_function_table.py names the others."""
    return [Row(n, tuple(NAME.findall(c[0])), tuple(REF.findall(c[1])), c[2])
            for n, c in rows(text) if len(c) == 3]


def load(path: Path = TABLE) -> list[Row]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the mm/ksm.c function table is missing (a ksmlab source tree has it)")
    return parse(path.read_text(encoding="utf-8"))


def module_path(module: str) -> str:
    """A table reference's module as a dotted path (a bare name is under actors/kernel)."""
    return module if "." in module else f"actors.kernel.{module}"
