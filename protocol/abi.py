# The user ABI the model exposes: the constants a program passes to mmap, mprotect,
# madvise, prctl and mlockall, with the values of Linux x86-64, so scenarios read
# like the C tests they port.
from __future__ import annotations

PAGE_SIZE = 4096

PROT_NONE = 0x0
PROT_READ = 0x1
PROT_WRITE = 0x2
PROT_EXEC = 0x4

MAP_SHARED = 0x01
MAP_PRIVATE = 0x02
MAP_FIXED = 0x10
MAP_ANONYMOUS = 0x20
MAP_POPULATE = 0x8000

MADV_NORMAL = 0
MADV_DONTNEED = 4
MADV_MERGEABLE = 12
MADV_UNMERGEABLE = 13
MADV_HUGEPAGE = 14
MADV_NOHUGEPAGE = 15
MADV_PAGEOUT = 21

PR_SET_MEMORY_MERGE = 67
PR_GET_MEMORY_MERGE = 68

MCL_CURRENT = 1
MCL_FUTURE = 2
MCL_ONFAULT = 4

SIGKILL = 9
SIGSEGV = 11
SIGBUS = 7
