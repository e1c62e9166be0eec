# Named shared-memory segments: the "physical memory" of one ksmlab run.
#
# We deliberately do not use multiprocessing.shared_memory: on Python 3.11 every
# attach registers the segment with the resource tracker, whose cleanup unlinks the
# owner's segment when an attaching process exits (python/cpython#82300). A segment
# here is just a file in /dev/shm opened with os.open + mmap, so no tracker is
# involved and its lifetime is exactly what the supervisor says it is.
#
# Naming: ksmlab_<supervisor pid>_<run id>_<what>. The pid lets the next start
# sweep what a SIGKILLed supervisor left behind (see sweep_stale()).
from __future__ import annotations

import contextlib
import errno
import mmap
import os
import re
from dataclasses import dataclass

SHM_DIR = "/dev/shm"
PREFIX = "ksmlab_"
_NAME_RE = re.compile(r"^ksmlab_(\d+)_([0-9a-z]+)_")


def segment_name(run_id: str, what: str, owner_pid: int | None = None) -> str:
    pid = os.getpid() if owner_pid is None else owner_pid
    return f"{PREFIX}{pid}_{run_id}_{what}"


@dataclass
class Segment:
    """One mapped shared-memory file. `buf` is a writable mmap."""

    name: str
    size: int
    buf: mmap.mmap
    owner: bool

    @property
    def path(self) -> str:
        return os.path.join(SHM_DIR, self.name)

    @classmethod
    def create(cls, name: str, size: int) -> Segment:
        size = max(int(size), mmap.PAGESIZE)
        path = os.path.join(SHM_DIR, name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            buf = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        return cls(name, size, buf, True)

    @classmethod
    def attach(cls, name: str) -> Segment:
        path = os.path.join(SHM_DIR, name)
        fd = os.open(path, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            buf = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        return cls(name, size, buf, False)

    def close(self) -> None:
        """Unmap. numpy views of buf must be gone first, or mmap refuses (BufferError)."""
        try:
            self.buf.close()
        except BufferError:
            # Views still alive somewhere: the mapping goes away with the process.
            pass

    def unlink(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM
    return True


def owned_by_us(path: str) -> bool:
    """Is path (not followed if a link) ours? Sweeps leave anything else alone."""
    try:
        return os.lstat(path).st_uid == os.geteuid()
    except FileNotFoundError:
        return False


def sweep_stale(run_id: str | None = None, dry_run: bool = False,
                skipped: list[str] | None = None) -> list[str]:
    """Remove segments whose supervisor is dead (or all of one run id).

    Returns the names removed. A live supervisor's segments are never touched
    unless its run id is named explicitly, and neither is a file another user owns,
    even one named like ours (root could remove it; a sweep must not): its name goes
    to `skipped`, with the reason.
    """
    removed = []
    try:
        names = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return removed
    for name in names:
        m = _NAME_RE.match(name)
        if not m:
            continue
        pid, rid = int(m.group(1)), m.group(2)
        if (run_id is not None and rid == run_id) or (run_id is None and not pid_alive(pid)):
            path = os.path.join(SHM_DIR, name)
            if not owned_by_us(path):
                if skipped is not None and os.path.lexists(path):
                    skipped.append(f"{path}: owned by uid {os.lstat(path).st_uid}, not by us")
                continue
            if not dry_run:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    continue
                except PermissionError as e:
                    if skipped is not None:
                        skipped.append(f"{path}: {e.strerror}")
                    continue
            removed.append(name)
    return removed


def list_segments(run_id: str | None = None) -> list[str]:
    out = []
    for name in sorted(os.listdir(SHM_DIR)):
        m = _NAME_RE.match(name)
        if m and (run_id is None or m.group(2) == run_id):
            out.append(name)
    return out
