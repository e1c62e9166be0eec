"""Uncontended cost of the model's kernel locks (shared_mem/locks.py).

    .venv/bin/python bench/bench_locks.py [--n 100000] [--repeat 5]

Each row is one lock+unlock pair by one context with nobody else around, which is what
the per-page paths of the model pay almost every time. Best of --repeat runs. The raw
OFD row is the floor (two fcntl syscalls); multiprocessing.Lock (a POSIX semaphore, no
syscall when uncontended) is the reference the ratio column is against. The target for
the lock model is <= 5 us per pair without an event hook.
"""

from __future__ import annotations

import argparse
import fcntl
import multiprocessing as mp
import os
import secrets
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

try:
    from shared_mem.locks import BIT, MUTEX, RWSEM, SPIN, LockSpace
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from shared_mem.locks import BIT, MUTEX, RWSEM, SPIN, LockSpace

TARGET_US = 5.0
CLASSES = [
    ("ksm_thread_mutex", MUTEX, 1),
    ("ksm_mmlist_lock", SPIN, 1),
    ("mmap_lock", RWSEM, 64),
    ("ptl", SPIN, 64),
    ("page_lock", BIT, 4096),
]


def best_us(fn: Callable[[int], None], n: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn(n)
        best = min(best, time.perf_counter() - t)
    return best / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    sp = LockSpace.create("bench" + secrets.token_hex(3), CLASSES)
    try:
        sp.bind_context("bench")
        m = sp.get("ksm_thread_mutex")
        spin = sp.get("ksm_mmlist_lock")
        mm = sp.get("mmap_lock", 7)
        ptl = sp.get("ptl", 7)
        page = sp.get("page_lock", 1234)

        fd = os.open(sp.descriptor()["lock_path"], os.O_RDWR)
        f = struct.Struct("hhqqi4x")
        raw_l = f.pack(fcntl.F_WRLCK, os.SEEK_SET, 10**6, 1, 0)
        raw_u = f.pack(fcntl.F_UNLCK, os.SEEK_SET, 10**6, 1, 0)
        setlk = getattr(fcntl, "F_OFD_SETLK", 37)

        def raw(n: int) -> None:
            for _ in range(n):
                fcntl.fcntl(fd, setlk, raw_l)
                fcntl.fcntl(fd, setlk, raw_u)

        def mutex(n: int) -> None:
            for _ in range(n):
                m.lock()
                m.unlock()

        def mutex_with(n: int) -> None:
            for _ in range(n):
                with m:
                    pass

        def spinlock(n: int) -> None:
            for _ in range(n):
                spin.lock()
                spin.unlock()

        def rw_read(n: int) -> None:
            for _ in range(n):
                mm.down_read()
                mm.up_read()

        def rw_write(n: int) -> None:
            for _ in range(n):
                mm.down_write()
                mm.up_write()

        def bit_try(n: int) -> None:
            for _ in range(n):
                page.trylock()
                page.unlock()

        def ptl_under_mmap(n: int) -> None:
            # lockdep's check runs here (a lock is held): known edge mmap_lock -> ptl
            mm.down_read()
            for _ in range(n):
                ptl.lock()
                ptl.unlock()
            mm.up_read()

        def mutex_hooked(n: int) -> None:
            sp.set_event_hook(lambda *e: None)
            try:
                mutex(n)
            finally:
                sp.set_event_hook(None)

        mpl = mp.Lock()

        def mp_lock(n: int) -> None:
            for _ in range(n):
                mpl.acquire()
                mpl.release()

        rows = [
            ("raw OFD fcntl lock+unlock", raw),
            ("Mutex lock/unlock", mutex),
            ("Mutex with-block", mutex_with),
            ("SpinLock lock/unlock", spinlock),
            ("RWSem down_read/up_read", rw_read),
            ("RWSem down_write/up_write", rw_write),
            ("BitLock trylock/unlock", bit_try),
            ("ptl under mmap_lock (lockdep check)", ptl_under_mmap),
            ("Mutex lock/unlock, no-op event hook", mutex_hooked),
            ("multiprocessing.Lock acquire/release", mp_lock),
        ]
        results = [(name, best_us(fn, args.n, args.repeat)) for name, fn in rows]
        os.close(fd)
    finally:
        sp.close()
        sp.unlink()

    ref = results[-1][1]
    width = max(len(name) for name, _ in results)
    print(f"uncontended lock+unlock pairs, best of {args.repeat} x {args.n}")
    print(f"{'operation':<{width}}  {'us/op':>7}  {'x mp.Lock':>9}")
    print(f"{'-' * width}  {'-' * 7}  {'-' * 9}")
    for name, us in results:
        print(f"{name:<{width}}  {us:7.2f}  {us / ref:9.1f}")
    model = [us for name, us in results[1:8]]
    verdict = "OK" if max(model) <= TARGET_US else "OVER"
    print(
        f"slowest model lock without hook: {max(model):.2f} us (target <= {TARGET_US} us): {verdict}"
    )


if __name__ == "__main__":
    main()
