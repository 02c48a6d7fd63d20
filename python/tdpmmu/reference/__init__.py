"""A readable, pure-Python reference model of tdpmmu's VMs.

This package re-implements the semantics pinned down in ``docs/model.md`` (which in turn
follows KVM's TDP MMU and ``docs/model.md``) in plain Python; from the rest of ``tdpmmu`` it takes
only the exception classes, ``Ret`` and ``tdpmmu.config`` (the engine's one definition of the
VM-type x hook-design matrix and of the TDX option choices).  It is slow on purpose: every
SPTE lives in a plain Python list and every step of KVM's fault and zap paths is a named
method, so it can be read side by side with ``arch/x86/kvm/mmu/tdp_mmu.c``.  The differential
test (``tests/test_differential.py``) runs it next to the native engine and demands that both
agree SPTE for SPTE, counter for counter, nanosecond for nanosecond of each cost field.

Its modules mirror the engine's core, each holding what KVM's file of that name holds;
imports point downward only:

========================  ==================================================================
``spte``                  SPTE bits, encodings, geometry (spte.h)
``errors``, ``cost``      exceptions and ``Ret``; the cost fields and the ledger (integer
                          units per field; ``modeled_ns`` is their exact field-order sum)
``stats``                 counters, trace events, the accounting context ``Ctx``
``arena``                 page-table memory, ``struct kvm_mmu_page``, the grace period
``attrs``, ``memslot``    memory attributes; memslots (read-only, moved), host placement,
                          dirty logs (PML), write-tracking counts
``tdp_iter``              the pre-order walker (tdp_iter.c)
``hooks``                 the external-hook interface and its one dispatch site, where
                          every hook call is counted and traced, whatever the backend
``tdp_mmu``               roots, SPTE setters with the FROZEN protocol, map, zaps, mirror
                          splits, write-protection and D clearing, aging, eager split,
                          recovery, the NX huge page list (tdp_mmu.c)
``gmem``                  guest_memfd folios (guest_memfd.c)
``vendor``                ``base`` (the vendor interface), ``tdx`` over ``tdx_module``,
                          ``sev`` over ``rmp``, ``sw_mirror``
``mmu``                   fault entry: kvm_page_fault, fast_page_fault, faultin_pfn, huge
                          pages, MMIO (mmu.c)
``check``                 invariants
``vm``                    ``ReferenceVM``: the public operations of ``tdpmmu.VM``
========================  ==================================================================

All four VM types are modeled:

* ``default``: one direct root per role, shared memory only.
* ``tdx``: a mirror root for private memory next to the direct (shared) root, the external
  page-table hooks (``link_external_spt`` ...) as ``tdx.c`` implements them on top of a model of
  the TDX module (its own S-EPT tree with per-entry states, SEAMCALLs counted by leaf name),
  the TD lifecycle (initial image, ``finalize``, teardown in KVM's order) and the options of
  ``docs/model.md`` (kernel 6.16/6.19, per-page or batched TLB tracking, four- or two-hook
  interface, upstream teardown or pre-upstream ``TDH.MEM.SEPT.REMOVE``, KVM_TDX_TERMINATE_VM,
  and the huge-page series: 2M private pages, split by ``split_external_spt`` with BLOCK,
  TRACK, kick and TDH.MEM.PAGE.DEMOTE).
* ``snp``: one direct root; guest_memfd pages have Reverse Map Table entries that
  ``sev_gmem_prepare``/``sev_gmem_invalidate`` (hook design ``gmem``) or every private NPT
  change (design ``private``) update with RMPUPDATE/PSMASH; the guest PVALIDATEs what it gets.
* ``sw_protected``: private memory from guest_memfd and nothing else, or (``mirror=True``) the
  TDX-shaped mirror root with a software external tree and no SEAMCALLs.

Every VM type also has memslot flags and moves (KVM_MEM_READONLY, KVM_MR_MOVE), page write
tracking, dirty logging with or without PML, aging, eager splitting, huge-page recovery, the
NX huge page recovery worker, host mm changes of the memslots' shared mappings
(``madvise_dontneed``: zapped and freed, so the next touch allocates again; ``mprotect``:
zapped, and while read-only a shared write fault is a memory-fault exit and a read maps
without write access) and one vCPU's guest accesses in order (``access_batch``: a hardware
walk that sets A/D and fills the PML log, else the fault path), as far as the operations of
``tdpmmu.VM`` reach them.

Not modeled: contention (the ``TDH.*`` busy probabilities must be 0, so no ``-EBUSY`` and no
TDX local retries happen), user hook objects, the memory budget (``committed_bytes``), and
the multi-vCPU guest runs (``run_memstress``, ``run_virtual``).
``trace_events()`` holds the external-hook calls only, not the SEAMCALLs or RMP instructions
the backends issue.

Names follow KVM: a method called ``tdp_mmu_link_sp`` does what ``tdp_mmu_link_sp`` does,
``tdx_sept_set_private_spte`` what tdx.c's function of that name does, ``tdh_mem_page_aug`` is
the SEAMCALL leaf TDH.MEM.PAGE.AUG.  The prose is ours; nothing here is copied from the kernel.
"""

from .arena import (
    ROLE_ACCESS_SHIFT,
    ROLE_AD_DISABLED,
    ROLE_CR0_WP,
    ROLE_DIRECT,
    ROLE_EFER_NX,
    ROLE_INVALID,
    ROLE_IS_MIRROR,
    ROLE_LEVEL_MASK,
    TABLE_BASE_PFN,
    Arena,
    MmuPage,
)
from .attrs import PrivateRanges
from .cost import DEFAULT_COSTS, CostLedger
from .errors import ConfigError, InvariantError, Ret, VmBugged
from .hooks import HOOK_EBUSY, HOOK_EIO, HOOK_OK, ExternalHooks, ExternalOps
from .memslot import DATA_BASE_PFN, DirtyLog, Memslot, Memslots, parse_size
from .mmu import Mmu, ReferenceFault
from .spte import (
    ACC_ALL,
    FROZEN_SPTE,
    MMIO_SPTE_GEN_MASK,
    PAGE_SHIFT,
    PG_LEVEL_1G,
    PG_LEVEL_2M,
    PG_LEVEL_4K,
    PT64_ROOT_MAX_LEVEL,
    PT_PAGE_SIZE_MASK,
    SHADOW_MMIO_MASK,
    SHADOW_MMIO_VALUE,
    SHADOW_NONPRESENT_VALUE,
    SPTE_ACCESSED,
    SPTE_BASE_ADDR_MASK,
    SPTE_DIRTY,
    SPTE_ENT_PER_PAGE,
    SPTE_EXECUTABLE,
    SPTE_HOST_WRITABLE,
    SPTE_IPAT,
    SPTE_LEVEL_BITS,
    SPTE_MMU_PRESENT_MASK,
    SPTE_MMU_WRITABLE,
    SPTE_MT_WB,
    SPTE_READABLE,
    SPTE_RWX,
    SPTE_SUPPRESS_VE,
    SPTE_WRITABLE,
    gfn_round_for_level,
    is_frozen_spte,
    is_large_pte,
    is_last_spte,
    is_mmio_spte,
    is_shadow_present_pte,
    make_leaf_spte,
    make_mmio_spte,
    make_nonleaf_spte,
    make_small_spte,
    mmio_spte_generation,
    pages_per_hpage,
    spte_index,
    spte_to_pfn,
)
from .stats import COUNTER_NAMES, SEAMCALL_LEAVES, Ctx, TraceEvent
from .tdp_iter import TdpIter
from .tdp_mmu import (
    KVM_ALL_ROOTS,
    KVM_DIRECT_ROOTS,
    KVM_INVALID_ROOTS,
    KVM_MIRROR_ROOTS,
    KVM_VALID_ROOTS,
    KvmPageFault,
    TdpMmu,
    tdp_root_role,
)
from .vendor.rmp import (
    RMP_FAIL_INPUT,
    RMP_FAIL_OVERLAP,
    RMP_FAIL_PERMISSION,
    RMP_FAIL_SIZEMISMATCH,
    RMP_NO_UPDATE,
    RMP_SUCCESS,
    Rmp,
    RmpEntry,
)
from .vendor.sev import SevVendor, SnpPrivateHooks
from .vendor.sw_mirror import SoftwareSept, SwMirrorHooks, SwMirrorVendor
from .vendor.tdx import TdxOptions, TdxSeptHooks, TdxVendor
from .vendor.tdx_module import (
    SEPT_BLOCKED,
    SEPT_BLOCKED_TABLE,
    SEPT_MAPPED,
    SEPT_PENDING,
    SEPT_TABLE,
    TDX_EPT_ENTRY_STATE_INCORRECT,
    TDX_EPT_WALK_FAILED,
    TDX_OP_STATE_INCORRECT,
    TDX_OPERAND_BUSY,
    TDX_SUCCESS,
    TDX_TLB_TRACKING_NOT_DONE,
    SeptEntry,
    TdxModule,
)
from .vm import DEFAULT_HOOKS, VM_TYPES, ReferenceVM

__all__ = [
    "ACC_ALL",
    "COUNTER_NAMES",
    "DATA_BASE_PFN",
    "DEFAULT_COSTS",
    "DEFAULT_HOOKS",
    "FROZEN_SPTE",
    "HOOK_EBUSY",
    "HOOK_EIO",
    "HOOK_OK",
    "KVM_ALL_ROOTS",
    "KVM_DIRECT_ROOTS",
    "KVM_INVALID_ROOTS",
    "KVM_MIRROR_ROOTS",
    "KVM_VALID_ROOTS",
    "MMIO_SPTE_GEN_MASK",
    "PAGE_SHIFT",
    "PG_LEVEL_1G",
    "PG_LEVEL_2M",
    "PG_LEVEL_4K",
    "PT64_ROOT_MAX_LEVEL",
    "PT_PAGE_SIZE_MASK",
    "RMP_FAIL_INPUT",
    "RMP_FAIL_OVERLAP",
    "RMP_FAIL_PERMISSION",
    "RMP_FAIL_SIZEMISMATCH",
    "RMP_NO_UPDATE",
    "RMP_SUCCESS",
    "ROLE_ACCESS_SHIFT",
    "ROLE_AD_DISABLED",
    "ROLE_CR0_WP",
    "ROLE_DIRECT",
    "ROLE_EFER_NX",
    "ROLE_INVALID",
    "ROLE_IS_MIRROR",
    "ROLE_LEVEL_MASK",
    "SEAMCALL_LEAVES",
    "SEPT_BLOCKED",
    "SEPT_BLOCKED_TABLE",
    "SEPT_MAPPED",
    "SEPT_PENDING",
    "SEPT_TABLE",
    "SHADOW_MMIO_MASK",
    "SHADOW_MMIO_VALUE",
    "SHADOW_NONPRESENT_VALUE",
    "SPTE_ACCESSED",
    "SPTE_BASE_ADDR_MASK",
    "SPTE_DIRTY",
    "SPTE_ENT_PER_PAGE",
    "SPTE_EXECUTABLE",
    "SPTE_HOST_WRITABLE",
    "SPTE_IPAT",
    "SPTE_LEVEL_BITS",
    "SPTE_MMU_PRESENT_MASK",
    "SPTE_MMU_WRITABLE",
    "SPTE_MT_WB",
    "SPTE_READABLE",
    "SPTE_RWX",
    "SPTE_SUPPRESS_VE",
    "SPTE_WRITABLE",
    "TABLE_BASE_PFN",
    "TDX_EPT_ENTRY_STATE_INCORRECT",
    "TDX_EPT_WALK_FAILED",
    "TDX_OPERAND_BUSY",
    "TDX_OP_STATE_INCORRECT",
    "TDX_SUCCESS",
    "TDX_TLB_TRACKING_NOT_DONE",
    "VM_TYPES",
    "Arena",
    "ConfigError",
    "CostLedger",
    "Ctx",
    "DirtyLog",
    "ExternalHooks",
    "ExternalOps",
    "InvariantError",
    "KvmPageFault",
    "Memslot",
    "Memslots",
    "Mmu",
    "MmuPage",
    "PrivateRanges",
    "ReferenceFault",
    "ReferenceVM",
    "Ret",
    "Rmp",
    "RmpEntry",
    "SeptEntry",
    "SevVendor",
    "SnpPrivateHooks",
    "SoftwareSept",
    "SwMirrorHooks",
    "SwMirrorVendor",
    "TdpIter",
    "TdpMmu",
    "TdxModule",
    "TdxOptions",
    "TdxSeptHooks",
    "TdxVendor",
    "TraceEvent",
    "VmBugged",
    "gfn_round_for_level",
    "is_frozen_spte",
    "is_large_pte",
    "is_last_spte",
    "is_mmio_spte",
    "is_shadow_present_pte",
    "make_leaf_spte",
    "make_mmio_spte",
    "make_nonleaf_spte",
    "make_small_spte",
    "mmio_spte_generation",
    "pages_per_hpage",
    "parse_size",
    "spte_index",
    "spte_to_pfn",
    "tdp_root_role",
]
