"""KVM's RET_PF_* fault results (arch/x86/kvm/mmu/mmu_internal.h)."""

import enum

from tdpmmu import _core


class Ret(enum.IntEnum):
    """Result of one fault, with KVM's numbering so codes from ``fault_batch`` compare equal."""

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
