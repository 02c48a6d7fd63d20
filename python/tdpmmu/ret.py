"""KVM's RET_PF_* fault results (arch/x86/kvm/mmu/mmu_internal.h)."""

import enum

from tdpmmu import _core


class Ret(enum.IntEnum):
    """Result of one fault (``Fault.ret``), with KVM's numbering so ``fault_batch``'s codes
    compare equal.

    Members (KVM's ``enum`` in arch/x86/kvm/mmu/mmu_internal.h):
        CONTINUE (0): RET_PF_CONTINUE, "keep going" inside KVM's fault handler; never the
            outcome of a fault in the model.
        RETRY (1): RET_PF_RETRY: let the vCPU fault again (a FROZEN entry, a lost cmpxchg, a
            hook or SEAMCALL busy); nothing was installed.
        EMULATE (2): RET_PF_EMULATE: MMIO, a gfn in no memslot (an MMIO SPTE was installed or
            found) to be emulated.
        WRITE_PROTECTED (3): RET_PF_WRITE_PROTECTED: a write to a write-tracked page; never
            returned by the model (no write tracking).
        INVALID (4): RET_PF_INVALID: the fast path could not fix the fault; never returned by
            the model.
        FIXED (5): RET_PF_FIXED: a new leaf was installed.
        SPURIOUS (6): RET_PF_SPURIOUS: the mapping already allowed the access (another vCPU, a
            pre-fault, or an identical SPTE).
        MEMORY_FAULT (7): not a RET_PF_* code: KVM returns -EFAULT with a
            KVM_EXIT_MEMORY_FAULT exit to userspace (the access's private/shared kind does not
            match the gfn's memory attribute, or private memory without guest_memfd); nothing
            changed.
    """

    CONTINUE = 0
    RETRY = 1
    EMULATE = 2
    WRITE_PROTECTED = 3
    INVALID = 4
    FIXED = 5
    SPURIOUS = 6
    # Not a RET_PF_* code: KVM returns -EFAULT with a KVM_EXIT_MEMORY_FAULT exit instead.
    MEMORY_FAULT = 7


# The native Fault.ret hands out these members instead of bare ints.
_core._register_ret(list(Ret))
