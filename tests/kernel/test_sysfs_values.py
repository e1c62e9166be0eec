# Knob values at the edges of their C types, as this machine's kernel stores them.
#
# advisor_max_cpu is an `unsigned int` written through kstrtoul(): a value above 2^32
# keeps its low 32 bits (4294967301 reads back 5), one above 2^64 - 1 fails kstrtoul
# and the store returns -EINVAL (not ERANGE); the advisor's page counts are `unsigned
# long` and read back whole up to 2^64 - 1. Checked against the real kernel by hand
# (echo ... > /sys/kernel/mm/ksm/advisor_max_cpu) on 2026-12-02.
from __future__ import annotations

import pytest

from actors.kernel import sysfs

pytestmark = [pytest.mark.timeout(30)]


@pytest.mark.parametrize("value,shown", [
    ("4294967301", "5"),
    ("18446744073709551615", "4294967295"),
    ("99999999999", "1215752191"),
    ("70", "70"),
])
def test_advisor_max_cpu_keeps_the_low_32_bits(kern, value, shown):
    sysfs.store(kern.k, "advisor_max_cpu", value)
    assert sysfs.show(kern.k, "advisor_max_cpu") == shown


@pytest.mark.parametrize("knob", ["advisor_max_cpu", "advisor_max_pages_to_scan", "advisor_min_pages_to_scan"])
def test_a_value_past_2_64_is_einval_and_changes_nothing(kern, knob):
    before = sysfs.show(kern.k, knob)
    with pytest.raises(sysfs.SysfsError) as e:
        sysfs.store(kern.k, knob, "18446744073709551616")
    assert e.value.errno_name == "EINVAL"
    assert sysfs.show(kern.k, knob) == before


def test_unsigned_long_knobs_read_back_whole(kern):
    sysfs.store(kern.k, "advisor_max_pages_to_scan", "18446744073709551615")
    assert sysfs.show(kern.k, "advisor_max_pages_to_scan") == "18446744073709551615"
    assert sysfs.knobs(kern.k)["advisor_max_pages_to_scan"] == (1 << 64) - 1
