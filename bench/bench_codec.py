# Benchmark: one encode+decode of a small message (the codec is on every message),
# against plain msgpack packb/unpackb measured in the same run.
from __future__ import annotations

import time

import msgpack

from protocol.codec import decode, encode, request


def best_us(fn, n: int = 20_000, rounds: int = 5) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    return best


def main() -> None:
    msg = request("fault", 12345, "task-3", task=3, mm=7, addr=0x7F0000001000, write=True)
    ours = best_us(lambda: decode(encode(msg)))
    raw = best_us(lambda: msgpack.unpackb(msgpack.packb(msg, use_bin_type=True), raw=False))
    print(f"validated encode+decode  {ours:6.2f} us")
    print(f"plain msgpack round trip {raw:6.2f} us")
    print(f"ratio (validation cost)  {ours / raw:6.2f} x")


if __name__ == "__main__":
    main()
