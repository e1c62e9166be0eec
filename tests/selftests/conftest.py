# Shared fixture for the kernel-test ports: run one built-in scenario in a fresh cluster
# (without lock-event logging, which only slows these runs down) with its run folder under
# the test's tmp_path, and check afterwards that nothing of the run is left in /dev/shm.
from __future__ import annotations

from typing import Any

import pytest_asyncio


@pytest_asyncio.fixture
async def run_builtin(tmp_path):
    from ksmlab.scenario import load_scenario, run_scenario
    from shared_mem.segment import list_segments

    runs: list[dict[str, Any]] = []

    async def run(name: str, args: dict[str, Any] | None = None, **options: Any) -> dict[str, Any]:
        options.setdefault("trace_locks", False)
        options.setdefault("run_dir", str(tmp_path / f"{name}-{len(runs)}"))
        res = await run_scenario(load_scenario(name), args=args, **options)
        runs.append(res)
        return res

    yield run
    for res in runs:
        run_id = res.get("options", {}).get("run_id")
        if run_id:
            assert not list_segments(run_id), f"segments of {res['scenario']} left behind"
