# Shared pytest configuration for the ksmlab test suite.
from __future__ import annotations

import os

import pytest
import pytest_asyncio

# --- realkernel opt-in ------------------------------------------------------------------------
# Tests marked @pytest.mark.realkernel drive this machine's /sys/kernel/mm/ksm. They run only
# with --realkernel or KSMLAB_REALKERNEL=1, and are skipped when /sys/kernel/mm/ksm/run cannot
# be opened for writing.

_KSM_RUN = "/sys/kernel/mm/ksm/run"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--realkernel",
        action="store_true",
        default=False,
        help="run tests marked realkernel against this machine's /sys/kernel/mm/ksm",
    )


def _ksm_run_writable() -> str | None:
    """None if /sys/kernel/mm/ksm/run can be opened for writing, else the reason it cannot."""
    try:
        fd = os.open(_KSM_RUN, os.O_WRONLY)  # opening writes nothing
    except OSError as e:
        return f"{_KSM_RUN} is not writable ({e.strerror})"
    os.close(fd)
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    marked = [item for item in items if item.get_closest_marker("realkernel")]
    if not marked:
        return
    enabled = config.getoption("--realkernel") or os.environ.get("KSMLAB_REALKERNEL") == "1"
    if not enabled:
        reason = "real-kernel KSM test: pass --realkernel or set KSMLAB_REALKERNEL=1"
    else:
        reason = _ksm_run_writable()
    if reason:
        skip = pytest.mark.skip(reason=reason)
        for item in marked:
            item.add_marker(skip)


# --- end realkernel opt-in --------------------------------------------------------------------


# --- cluster fixtures -------------------------------------------------------------------------
# A real cluster (processes, sockets, shared memory) per test, torn down even when the test
# fails; afterwards nothing of the run may be left in /dev/shm or the process table.


@pytest_asyncio.fixture
async def cluster_factory(tmp_path):
    """async factory: `c = await cluster_factory(frames=...)`; every cluster is stopped after."""
    from actors.cluster import Cluster
    from shared_mem.segment import list_segments

    made = []

    async def make(**opts):
        opts.setdefault("run_dir", str(tmp_path / f"run{len(made)}"))
        opts.setdefault("hung_task_timeout", 20.0)
        c = Cluster(**opts)
        made.append(c)
        await c.boot()
        return c

    yield make
    for c in made:
        await c.stop()
        leftovers = list_segments(c.run_id)
        assert not leftovers, f"segments left behind: {leftovers}"
        for p in c.procs.values():
            assert p.poll() is not None, f"actor process {p.pid} left running"
