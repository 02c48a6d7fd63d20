//! What a fault is and how it ends: KVM's `struct kvm_page_fault` (built once when the fault
//! enters, then filled by `faultin_pfn` and the huge-page adjust) and its RET_PF_* outcome.
//! Shared by the fault entry (`mmu`) and the TDP MMU's map (`tdp_mmu`), as mmu_internal.h is.

use crate::spte::SHADOW_NONPRESENT_VALUE;

/// KVM's RET_PF_* codes, plus MEMORY_FAULT for a KVM_EXIT_MEMORY_FAULT (-EFAULT) exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Ret {
    Continue = 0,
    Retry = 1,
    Emulate = 2,
    WriteProtected = 3,
    Invalid = 4,
    Fixed = 5,
    Spurious = 6,
    MemoryFault = 7,
}

/// Result of one fault as the caller sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FaultResult {
    pub ret: Ret,
    pub level: u8,
    pub retries: u32,
    pub modeled_ns: f64,
    pub spte: u64,
    pub gfn: u64,
    pub private: bool,
}

/// `struct kvm_page_fault`, reduced to what the model uses.
#[derive(Debug, Clone, Copy)]
pub struct KvmPageFault {
    pub gfn: u64,
    pub write: bool,
    pub exec: bool,
    pub prefetch: bool,
    pub is_private: bool,
    pub max_level: u8,
    pub req_level: u8,
    pub goal_level: u8,
    pub pfn: u64,
    pub huge_page_disallowed: bool,
    /// No memslot: the fault installs an MMIO SPTE.
    pub mmio: bool,
    /// The host mapping may be written (false for a KVM_MEM_READONLY slot): the SPTE gets W.
    pub map_writable: bool,
    /// The gfn is write-tracked (`kvm_gfn_is_write_tracked`): the SPTE is made read-only and a
    /// write returns RET_PF_WRITE_PROTECTED.
    pub write_tracked: bool,
    /// Where the fault ended: the level and value of the entry it installed or found.
    pub level: u8,
    pub spte: u64,
}

impl KvmPageFault {
    pub fn new(gfn: u64, is_private: bool, write: bool, exec: bool, prefetch: bool) -> Self {
        Self {
            gfn,
            write,
            exec,
            prefetch,
            is_private,
            map_writable: true,
            write_tracked: false,
            max_level: 1,
            req_level: 1,
            goal_level: 1,
            pfn: 0,
            huge_page_disallowed: false,
            mmio: false,
            level: 1,
            spte: SHADOW_NONPRESENT_VALUE,
        }
    }

    pub fn result(&self, ret: Ret) -> FaultResult {
        FaultResult {
            ret,
            level: self.level,
            retries: 0,
            modeled_ns: 0.0,
            spte: self.spte,
            gfn: self.gfn,
            private: self.is_private,
        }
    }
}
