# Knob writes at the edges of their C types, on this machine's kernel and on ksmlab.
#
# Each value is written to the real /sys/kernel/mm/ksm file and to a booted ksmlab kernel
# (in process); both must refuse it with the same errno, or both accept it and read back
# the same text. Every real knob is put back right after each write (the conftest checks
# that nothing was left changed). Opt-in: --realkernel.
from __future__ import annotations

import errno
import secrets

import pytest

from actors.boot import boot_kernel
from actors.kernel import sysfs
from actors.kernel.context import Kernel
from actors.kernel.variants import Variants
from ksmlab.realkernel import KSM_SYSFS, ksm_available, read_knob, write_knob
from shared_mem.layout import Geometry

pytestmark = [pytest.mark.realkernel, pytest.mark.timeout(60)]

VALUES = ("4294967295", "4294967296", "4294967301", "18446744073709551615", "18446744073709551616",
          "-1", "+5", "5x", "", "007")
# Knobs a write may change without disturbing the machine (restored at once).
FREE = ("advisor_max_cpu", "advisor_max_pages_to_scan", "advisor_min_pages_to_scan", "pages_to_scan",
        "sleep_millisecs", "stable_node_chains_prune_millisecs")
# Knobs only written with values both sides must refuse (a valid value could be EBUSY or
# change merging on the machine).
REFUSED_ONLY = ("max_page_sharing", "merge_across_nodes", "run", "use_zero_pages", "smart_scan")


@pytest.fixture
def model():
    km, locks = boot_kernel(Geometry(nr_frames=64, max_mms=4, max_tasks=4, va_pages=8192),
                            "kv" + secrets.token_hex(3), Variants())
    try:
        yield Kernel(km, locks, "test")
    finally:
        km.close()
        km.unlink()
        locks.close()
        locks.unlink()


def _real(name: str, value: str) -> str:
    before = read_knob(name)
    try:
        write_knob(name, value)
    except OSError as e:
        return errno.errorcode[e.errno]
    try:
        return "ok:" + read_knob(name)
    finally:
        write_knob(name, before)


def _model(k: Kernel, name: str, value: str) -> str:
    try:
        sysfs.store(k, name, value + "\n")
    except sysfs.SysfsError as e:
        return e.errno_name
    return "ok:" + sysfs.show(k, name)


@pytest.mark.parametrize("name", FREE + REFUSED_ONLY)
def test_edge_values_match_the_kernel(model, name):
    if not ksm_available() or not (KSM_SYSFS / name).exists():
        pytest.skip(f"no writable /sys/kernel/mm/ksm/{name} here")
    for value in VALUES:
        want_model = _model(model, name, value)
        if name in REFUSED_ONLY and want_model.startswith("ok:"):
            continue          # would change the machine: compared only where both refuse
        assert _real(name, value) == want_model, f"{name} <- {value!r}"
        sysfs.boot_init(model)
