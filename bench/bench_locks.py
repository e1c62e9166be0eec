"""Cost of the model's kernel locks (shared_mem/locks.py), word locks against OFD locks.

    .venv/bin/python bench/bench_locks.py [--n 100000] [--repeat 5] [--contended-n 20000]

Each uncontended row is one lock+unlock pair by one context with nobody else around,
which is what the per-page paths of the model pay almost every time, for both lock
implementations (impl="word", the default: a compare-and-swap on a shared word; and
impl="ofd": an F_OFD_SETLK byte lock). Best of --repeat runs. The raw OFD row is the
floor of the OFD design (two fcntl syscalls); multiprocessing.Lock (a POSIX semaphore, no
syscall when uncontended) is the reference the ratio columns are against. The contended
rows are two processes taking one mutex back to back --contended-n times each (us per
pair, wall). The target for the lock model is <= 5 us per uncontended pair.
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


def uncontended(impl: str, n: int, repeat: int) -> list[tuple[str, float]]:
    sp = LockSpace.create("bench" + secrets.token_hex(3), CLASSES, impl=impl)
    try:
        sp.bind_context("bench")
        m = sp.get("ksm_thread_mutex")
        spin = sp.get("ksm_mmlist_lock")
        mm = sp.get("mmap_lock", 7)
        ptl = sp.get("ptl", 7)
        page = sp.get("page_lock", 1234)

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

        rows = [
            ("Mutex lock/unlock", mutex),
            ("Mutex with-block", mutex_with),
            ("SpinLock lock/unlock", spinlock),
            ("RWSem down_read/up_read", rw_read),
            ("RWSem down_write/up_write", rw_write),
            ("BitLock trylock/unlock", bit_try),
            ("ptl under mmap_lock (lockdep check)", ptl_under_mmap),
            ("Mutex lock/unlock, no-op event hook", mutex_hooked),
        ]
        return [(name, best_us(fn, n, repeat)) for name, fn in rows]
    finally:
        sp.close()
        sp.unlink()


def raw_ofd(n: int, repeat: int) -> float:
    sp = LockSpace.create("benchr" + secrets.token_hex(3), CLASSES, impl="ofd")
    fd = os.open(sp.descriptor()["lock_path"], os.O_RDWR)
    try:
        f = struct.Struct("hhqqi4x")
        raw_l = f.pack(fcntl.F_WRLCK, os.SEEK_SET, 10**6, 1, 0)
        raw_u = f.pack(fcntl.F_UNLCK, os.SEEK_SET, 10**6, 1, 0)
        setlk = getattr(fcntl, "F_OFD_SETLK", 37)

        def raw(n: int) -> None:
            for _ in range(n):
                fcntl.fcntl(fd, setlk, raw_l)
                fcntl.fcntl(fd, setlk, raw_u)

        return best_us(raw, n, repeat)
    finally:
        os.close(fd)
        sp.close()
        sp.unlink()


def mp_uncontended(n: int, repeat: int) -> float:
    mpl = mp.Lock()

    def mp_lock(n: int) -> None:
        for _ in range(n):
            mpl.acquire()
            mpl.release()

    return best_us(mp_lock, n, repeat)


def _two_processes(take: Callable[[], Callable[[], None]], n: int, what: str) -> float:
    """us per lock+unlock pair when two forked processes each run take()() n times at
    once (take() runs in the child: it binds what it needs and returns one pair)."""
    fork = mp.get_context("fork")
    go = fork.Event()

    def hammer() -> None:
        pair = take()
        go.wait()
        for _ in range(n):
            pair()

    kids = [fork.Process(target=hammer) for _ in range(2)]
    for k in kids:
        k.start()
    t = time.perf_counter()
    go.set()
    for k in kids:
        k.join(120)
        if k.exitcode != 0:
            raise RuntimeError(f"contended {what}: a child failed ({k.exitcode})")
    return (time.perf_counter() - t) / (2 * n) * 1e6


def _contended(impl: str, n: int) -> float:
    sp = LockSpace.create("benchc" + secrets.token_hex(3), CLASSES, impl=impl)

    def take() -> Callable[[], None]:
        sp.bind_context("hammer")
        m = sp.get("ksm_thread_mutex")

        def pair() -> None:
            m.lock()
            m.unlock()

        return pair

    try:
        return _two_processes(take, n, impl)
    finally:
        sp.close()
        sp.unlink()


def _mp_contended(n: int) -> float:
    lk = mp.get_context("fork").Lock()

    def pair() -> None:
        lk.acquire()
        lk.release()

    return _two_processes(lambda: pair, n, "multiprocessing.Lock")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--contended-n", type=int, default=20_000)
    args = ap.parse_args()

    word = uncontended("word", args.n, args.repeat)
    ofd = uncontended("ofd", args.n, args.repeat)
    ref = mp_uncontended(args.n, args.repeat)
    raw = raw_ofd(args.n, args.repeat)
    width = max(len(name) for name, _ in word) + 2
    print(f"uncontended lock+unlock pairs, best of {args.repeat} x {args.n} (us per pair)")
    hdr = f"{'operation':<{width}}  {'word':>7}  {'ofd':>7}  {'ofd/word':>8}  {'word/mp.Lock':>12}"
    print(hdr)
    print("-" * len(hdr))
    for (name, w), (_, o) in zip(word, ofd):
        print(f"{name:<{width}}  {w:7.2f}  {o:7.2f}  {o / w:8.2f}  {w / ref:12.1f}")
    print(f"{'raw OFD fcntl lock+unlock':<{width}}  {'':>7}  {raw:7.2f}")
    print(f"{'multiprocessing.Lock acquire/release':<{width}}  {ref:7.2f}")
    cn = args.contended_n
    cw, co, cm = _contended("word", cn), _contended("ofd", cn), _mp_contended(cn)
    print(f"\ncontended: 2 processes x {cn} lock+unlock pairs of one mutex (us per pair, wall)")
    print(f"  word {cw:.2f}   ofd {co:.2f}   multiprocessing.Lock {cm:.2f}   ofd/word {co / cw:.2f}")
    model = [us for _, us in word[:7]]
    verdict = "OK" if max(model) <= TARGET_US else "OVER"
    print(
        f"slowest word lock without hook: {max(model):.2f} us (target <= {TARGET_US} us): {verdict}"
    )


if __name__ == "__main__":
    main()
