# kswapd: background and direct reclaim of anonymous and KSM pages to swap.
#
# Every tick, if a zone's free frames fall under its low watermark, kswapd
# reclaims until the high watermark (shrink_pages, a clock hand over the frames).
# An allocation that finds no free frame asks for direct reclaim (a `reclaim`
# request) before it calls the OOM killer; a test or scenario can also ask for
# specific frames to be reclaimed (`pfns`, `force` to ignore the accessed bit).
# The reclaim itself is actors/kernel/vmscan.py (kswapd_balance, try_to_free_pages);
# this shell keeps the clock hand and the tick.
from __future__ import annotations

import time

from actors.base import Actor
from actors.kernel.vmscan import kswapd_balance, reclaim_parked, shrink_page, try_to_free_pages


class Kswapd(Actor):
    role = "kswapd"

    def setup(self) -> None:
        self.handlers["reclaim"] = self._on_reclaim
        self.hand = 1
        self.next_tick = 0.0
        self.enabled = self.km.swap is not None

    def flush_every(self) -> int:
        return 256

    def _on_reclaim(self, m: dict) -> dict:
        k = self.k
        if not self.enabled or reclaim_parked(k):
            return {"freed": 0, "results": {}}
        if m["pfns"]:
            results = {str(p): shrink_page(k, int(p), m["force"]) for p in m["pfns"]}
            return {"freed": sum(r == "freed" for r in results.values()), "results": results}
        freed, self.hand = try_to_free_pages(k, m["nr"], self.hand, m["force"])
        return {"freed": freed}

    def poll_timeout_ms(self) -> int:
        return 50

    def tick(self) -> None:
        if not self.enabled or time.monotonic() < self.next_tick or reclaim_parked(self.k):
            return
        self.next_tick = time.monotonic() + 0.05
        self.hand = kswapd_balance(self.k, self.hand)
        self.ev.flush()
