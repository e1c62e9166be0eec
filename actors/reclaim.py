# kswapd: background and direct reclaim of anonymous and KSM pages to swap.
#
# Every tick, if a zone's free frames fall under its low watermark, kswapd
# reclaims until the high watermark (shrink_pages, a clock hand over the frames).
# An allocation that finds no free frame asks for direct reclaim (a `reclaim`
# request) before it calls the OOM killer; a test or scenario can also ask for
# specific frames to be reclaimed (`pfns`, `force` to ignore the accessed bit).
from __future__ import annotations

import time

from actors.base import Actor
from actors.kernel.vmscan import shrink_page, shrink_pages


class Kswapd(Actor):
    role = "kswapd"

    def setup(self) -> None:
        self.handlers["reclaim"] = self._on_reclaim
        self.hand = 1
        self.next_tick = 0.0
        self.enabled = self.km.swap is not None

    def flush_every(self) -> int:
        return 256

    def parked(self) -> bool:
        """The invariant checker asked reclaim to stand still (between pages)."""
        ksm = self.k.ksm
        if ksm["reclaim_paused"]:
            ksm["reclaim_paused"] = 2
            return True
        return False

    def _on_reclaim(self, m: dict) -> dict:
        k = self.k
        if not self.enabled or self.parked():
            return {"freed": 0, "results": {}}
        if m["pfns"]:
            results = {str(p): shrink_page(k, int(p), m["force"]) for p in m["pfns"]}
            return {"freed": sum(r == "freed" for r in results.values()), "results": results}
        freed, self.hand = shrink_pages(k, m["nr"], self.hand, m["force"])
        if not freed:  # a second lap ignores the accessed bits: better swap than OOM
            freed, self.hand = shrink_pages(k, m["nr"], self.hand, True)
        return {"freed": freed}

    def poll_timeout_ms(self) -> int:
        return 50

    def tick(self) -> None:
        if not self.enabled or time.monotonic() < self.next_tick or self.parked():
            return
        self.next_tick = time.monotonic() + 0.05
        k = self.k
        for z in self.km.zones:
            if int(z["nr_free"]) < int(z["low_watermark"]):
                want = int(z["high_watermark"]) - int(z["nr_free"])
                freed, self.hand = shrink_pages(k, want, self.hand)
                k.ev("kswapd_balance", want=want, freed=freed)
                self.ev.flush()
                break
