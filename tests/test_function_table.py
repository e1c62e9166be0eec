# docs/ksm-functions.md cannot rot: every ksmlab function it names exists.
#
# The table maps each function of today's mm/ksm.c to the ksmlab function that does its
# work (`module:function`, a bare module being one of actors/kernel/) or says why it is not
# modelled. This test reads the table, imports every module it names and looks every name
# up (attribute by attribute, so `Class.method` works too); a rename that forgets the table,
# a row without a ksmlab function or a reason, or a kernel function listed twice fails.
from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from ksmlab.ksm_functions import NAME, REF, TABLE, module_path, rows

ROOT = Path(__file__).resolve().parents[1]


def resolve(module: str, attr: str) -> object:
    obj: object = importlib.import_module(module_path(module))
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def problems(text: str) -> list[str]:
    out = []
    seen: dict[str, int] = {}
    table = rows(text)
    if not table:
        return ["no table rows found"]
    for n, cells in table:
        if len(cells) != 3:
            out.append(f"line {n}: {len(cells)} cells, expected 3 (kernel | ksmlab | notes)")
            continue
        kernel, ours, _notes = cells
        names = NAME.findall(kernel)
        if not names:
            out.append(f"line {n}: no kernel function named in {kernel!r}")
        for name in names:
            if name in seen:
                out.append(f"line {n}: {name} already listed on line {seen[name]}")
            seen[name] = n
        refs = REF.findall(ours)
        if not refs and not ours.startswith("not modelled"):
            out.append(f"line {n}: {kernel}: neither a ksmlab function nor 'not modelled'")
        for module, attr in refs:
            try:
                obj = resolve(module, attr)
            except (ImportError, AttributeError) as e:
                out.append(f"line {n}: {module}:{attr}: {type(e).__name__}: {e}")
                continue
            if not callable(obj):
                out.append(f"line {n}: {module}:{attr} is not a function")
    return out


def test_every_ksmlab_function_in_the_table_exists():
    text = TABLE.read_text(encoding="utf-8")
    bad = problems(text)
    assert not bad, f"{TABLE.relative_to(ROOT)}:\n" + "\n".join(bad)
    assert len(rows(text)) > 100   # the whole of mm/ksm.c, not a sample


@pytest.mark.parametrize("row, what", [
    ("| `run_store` | `sysfs:_store_run` | |", "_store_run"),
    ("| `ksm_get_folio` | `nosuchmodule:ksm_get_folio` | |", "nosuchmodule"),
    ("| `folio_migrate_ksm` | | |", "neither a ksmlab function"),
    ("| `ksm_init` | `sysfs:KNOB_DEFAULTS` | |", "is not a function"),
    ("| `chain` | `stable_tree:__stable_node_chain` | |\n| `chain` | not modelled | twice |", "already listed"),
])
def test_checker_catches_a_rotten_row(row, what):
    bad = problems("| kernel function | ksmlab | notes |\n|---|---|---|\n" + row + "\n")
    assert any(what in b for b in bad), bad


def test_checker_accepts_good_rows():
    good = ("| kernel function | ksmlab | notes |\n|---|---|---|\n"
            "| `run_store` | `sysfs:run_store` | |\n"
            "| `ksm_scan_thread` | `ksm_scan:ksm_scan_thread_round`, `actors.ksmd:Ksmd.tick` | |\n"
            "| `ksm_disable` | not modelled | s390 only |\n")
    assert problems(good) == []
