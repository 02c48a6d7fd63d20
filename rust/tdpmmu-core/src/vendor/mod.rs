//! The vendor layer, in the shape of KVM's `kvm_x86_ops` and `kvm_arch_gmem_*` entry points:
//! what the generic MMU asks of the VM type (exit cost, private mapping level, guest_memfd
//! prepare/invalidate, what the guest does after a fault, populate, finalize, teardown) and
//! the invariants only the vendor can check. Backends: `plain` (default and SW_PROTECTED VMs),
//! `tdx` (KVM's TDX side over `tdx_module`), `sev` (KVM's SNP side over `rmp`) and
//! `sw_mirror` (SW_PROTECTED with a mirror root). The generic fault path calls these and never
//! asks which VM type it runs.

pub mod plain;
pub mod rmp;
pub mod sev;
pub mod sw_mirror;
pub mod tdx;
pub mod tdx_module;

use std::any::Any;

use crate::cost::Cost;
use crate::error::Result;
use crate::page_fault::Ret;
use crate::stats::Ctx;

/// A check failed: what is wrong, in words (becomes an `InvariantError`).
pub type CheckResult = std::result::Result<(), String>;

pub trait Vendor: Send + Sync {
    /// `destroy()` releases the VM's key before its private pages go (KVM_TDX_TERMINATE_VM).
    fn release_before_private_zap(&self) -> bool {
        false
    }

    /// The ledger field one VM exit + re-entry is charged to.
    fn exit_cost(&self) -> Cost {
        Cost::exit_entry_ns
    }

    /// Whether vCPUs may run (a TD only once it is finalized); the error says why not.
    fn vcpu_run_allowed(&self) -> Result<()> {
        Ok(())
    }

    /// Private faults are handled as writes (TDX: private memory is always RWX in the S-EPT).
    fn private_fault_is_write(&self) -> bool {
        false
    }

    /// How often a private fault that returned RETRY is retried inside KVM without re-entering
    /// the guest (TDX's local retry); 0 = never.
    fn private_fault_local_retries(&self) -> u32 {
        0
    }

    /// `kvm_arch_gmem_prepare`: guest_memfd hands out the page at `pfn` for `gfn`.
    fn gmem_prepare(&self, _ctx: &mut Ctx, _pfn: u64, _gfn: u64) {}

    /// `private_max_mapping_level` for the private page at `pfn` (u8::MAX = no vendor cap).
    fn private_max_level(&self, _pfn: u64) -> u8 {
        u8::MAX
    }

    /// What the guest does once a private fault returned to it (TDX: TDG.MEM.PAGE.ACCEPT;
    /// SNP: PVALIDATE of a freshly assigned page).
    fn post_private_fault(&self, _ctx: &mut Ctx, _gfn: u64, _pfn: u64, _ret: Ret) {}

    /// `kvm_arch_gmem_invalidate`: guest_memfd frees [pfn, pfn + npages).
    fn gmem_invalidate(&self, _ctx: &mut Ctx, _pfn: u64, _npages: u64) {}

    /// A guest_memfd range [pfn, pfn + npages) is bound to a memslot / unbound from it. The VM
    /// calls both with `mmu_lock` held for write.
    fn gmem_bind(&self, _pfn: u64, _npages: u64) -> Result<()> {
        Ok(())
    }
    fn gmem_unbind(&self, _pfn: u64, _npages: u64) {}
    /// Bytes of vendor metadata binding `npages` of guest_memfd commits (SNP: RMP entries).
    fn gmem_metadata_bytes(&self, _npages: u64) -> u64 {
        0
    }

    /// KVM_PRE_FAULT_MEMORY of private (or shared) memory is allowed now.
    fn populate_allowed(&self, _private: bool) -> Result<()> {
        Ok(())
    }

    /// After a pre-fault installed the private leaf for `gfn` (v6.16 TDX: PAGE.ADD).
    fn post_populate(&self, _ctx: &mut Ctx, _gfn: u64, _pfn: u64) {}

    /// KVM_TDX_FINALIZE_VM exists for this VM type (else the error names the VM type).
    fn finalize_supported(&self) -> Result<()>;
    /// KVM_TDX_FINALIZE_VM (only called when supported).
    fn finalize(&self) -> Result<()> {
        self.finalize_supported()
    }
    fn finalized(&self) -> bool {
        false
    }

    /// Teardown (`kvm_arch_pre_destroy_vm`): TDX releases the HKID. `true` from
    /// `zap_mirror_before_pre_destroy` asks the MMU to tear the mirror tree down first.
    fn zap_mirror_before_pre_destroy(&self) -> bool {
        false
    }
    fn vm_pre_destroy(&self, _ctx: &mut Ctx) {}

    /// Invariants the vendor keeps: a private leaf's backing state (SNP: its RMP entry).
    fn check_private_leaf(&self, _gfn: u64, _pfn: u64, _level: u8) -> CheckResult {
        Ok(())
    }
    /// The external tree agrees with the mirror tree (its tables and present leaves).
    fn check_external(
        &self,
        _mirror_tables: usize,
        _mirror_leaves: Vec<(u64, u64)>,
    ) -> CheckResult {
        Ok(())
    }
    /// After destroy: nothing of the vendor's is left (S-EPT tables, assigned RMP entries).
    /// `gmem` lists the VM's guest_memfd ranges as (gfn, pfn, npages).
    fn check_teardown(&self, _gmem: &[(u64, u64, u64)]) -> CheckResult {
        Ok(())
    }

    /// For VM-type specific introspection in `vm` (S-EPT dump, RMP entries).
    fn as_any(&self) -> &dyn Any;
}
