# Boot: create one run's kernel memory and lock space and initialise them.
#
# The supervisor calls boot_kernel() once; every actor then attaches with the
# descriptors it returns. Like start_kernel(), this sets up the page allocator
# (frames.boot_init), the KSM defaults (sysfs.boot_init: run=0, pages_to_scan=100,
# ...), ksm_mm_head and the cursor, and the variant switches of the run.
from __future__ import annotations

from actors.kernel import mm_slot, sysfs
from actors.kernel.context import Kernel
from actors.kernel.variants import Variants
from shared_mem.frames import boot_init as frames_boot
from shared_mem.layout import Geometry, KernelMemory, lock_classes
from shared_mem.locks import LockSpace

MAX_CONTEXTS = 1024
FIRST_PID = 100


def boot_kernel(
    geo: Geometry, run_id: str, variants: Variants, scan_mode: int = 0, lock_impl: str = "word"
) -> tuple[KernelMemory, LockSpace]:
    km = KernelMemory.create(geo, run_id)
    try:
        locks = LockSpace.create(run_id, lock_classes(geo), max_contexts=MAX_CONTEXTS, impl=lock_impl)
    except BaseException:
        km.close()
        km.unlink()
        raise
    km.set_locks(locks)
    km.set_actor("swapper")
    frames_boot(km)
    locks.bind_context("swapper")
    k = Kernel(km, locks, "swapper", variants=variants)
    sysfs.boot_init(k)
    mm_slot.boot_init(k)
    k.ksm["variants"] = variants.mask
    k.ksm["scan_mode"] = scan_mode
    k.ksm["last_pid"] = FIRST_PID - 1
    return km, locks
