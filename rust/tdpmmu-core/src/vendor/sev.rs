//! KVM's SEV-SNP side (svm/sev.c): guest_memfd prepare and invalidate keep the RMP in step
//! with private memory (the upstream `gmem` design), the private mapping level follows the RMP
//! entry, the RMP size-mismatch fault is handled by PSMASH, and the guest validates pages it
//! is given. Under the `private` design the RMP instead follows every private NPT change
//! (`SnpPrivateHooks`).

use std::any::Any;
use std::sync::Arc;

use crate::sync::Mutex;

use super::rmp::{self, Rmp, RmpStatus};
use super::{CheckResult, Vendor};
use crate::error::{Result, bad_arg};
use crate::hooks::{ExternalOps, HookDesign, HookRet};
use crate::page_fault::Ret;
use crate::spte::spte_to_pfn;
use crate::stats::{C, Ctx};

pub struct Snp {
    pub rmp: Arc<Rmp>,
    pub design: HookDesign,
    /// guest_memfd folio level: 1 (4K) or 2 (2M).
    pub folio_level: u8,
    /// guest_memfd prepares a folio under its folio lock, and the guest validates a page once:
    /// both are serialized per 2M region here (striped locks), so vCPUs faulting the same
    /// pages concurrently prepare and validate each once.
    folio_locks: Box<[Mutex<()>]>,
}

const FOLIO_LOCKS: usize = 256;

impl Snp {
    pub fn new(design: HookDesign, folio_level: u8) -> Result<Self> {
        Ok(Self {
            rmp: Arc::new(Rmp::new()?),
            design,
            folio_level,
            folio_locks: (0..FOLIO_LOCKS).map(|_| Mutex::new(())).collect(),
        })
    }

    fn folio_lock(&self, pfn: u64) -> crate::sync::MutexGuard<'_, ()> {
        self.folio_locks[((pfn >> 9) as usize) % FOLIO_LOCKS].lock()
    }

    /// The external-hook backend of the `private` design.
    pub fn private_hooks(&self) -> Arc<dyn ExternalOps> {
        Arc::new(SnpPrivateHooks {
            rmp: self.rmp.clone(),
        })
    }

    /// `sev_handle_rmp_fault` for the page at `pfn`: PSMASH its 2M entry (one already split
    /// is tolerated). The caller zaps the 2M gfn range so the NPT is rebuilt.
    pub fn handle_rmp_fault(&self, ctx: &mut Ctx, pfn: u64) {
        ctx.inc(C::rmp_faults);
        let e = self.rmp.get(pfn);
        if rmp::is_2m(e) && rmp::assigned(e) {
            self.rmp.psmash(ctx, pfn);
        }
    }
}

impl Vendor for Snp {
    /// `sev_gmem_prepare`: a 2M RMP entry when the folio is 2M and its whole 2M range is
    /// shared and inside the bound range with pfn and gfn 2M-aligned alike, else 4K.
    fn gmem_prepare(&self, ctx: &mut Ctx, pfn: u64, gfn: u64) {
        if self.design != HookDesign::Gmem || rmp::assigned(self.rmp.get(pfn)) {
            return;
        }
        if self.folio_level < 2 {
            // A 4K folio: one compare-and-swap decides which vCPU prepares it.
            if self.rmp.assign_4k_once(ctx, pfn, gfn).is_some() {
                ctx.inc(C::gmem_prepare);
            }
            return;
        }
        let _folio = self.folio_lock(pfn);
        if rmp::assigned(self.rmp.get(pfn)) {
            return; // another vCPU prepared it while this one waited for the folio
        }
        ctx.inc(C::gmem_prepare);
        let head = pfn & !511;
        let whole_2m_shared = (gfn & 511) == (pfn & 511)
            && self.rmp.is_bound(head + 511)
            && (0..512).all(|i| !rmp::assigned(self.rmp.get(head + i)));
        let st = if whole_2m_shared {
            self.rmp.rmpupdate(ctx, head, gfn & !511, true, true)
        } else {
            self.rmp.rmpupdate(ctx, pfn, gfn, true, false)
        };
        if st != RmpStatus::Success {
            ctx.bug(format!(
                "gmem prepare RMPUPDATE failed for gfn {gfn:#x}: {}",
                st.name()
            ));
        }
    }

    /// `sev_private_max_mapping_level`: the RMP entry's size, 4K if unassigned.
    fn private_max_level(&self, pfn: u64) -> u8 {
        self.rmp.level(pfn)
    }

    /// The guest validates a page it has just been given (PVALIDATE), if it is not yet.
    fn post_private_fault(&self, ctx: &mut Ctx, gfn: u64, pfn: u64, ret: Ret) {
        if ret != Ret::Fixed {
            return;
        }
        let e = self.rmp.get(pfn);
        if !rmp::assigned(e) || rmp::validated(e) {
            return;
        }
        if !rmp::is_2m(e) {
            // A 4K entry: one compare-and-swap decides which vCPU's guest validates it.
            self.rmp.validate_4k_once(ctx, pfn, gfn);
            return;
        }
        let _folio = self.folio_lock(pfn);
        let e = self.rmp.get(pfn);
        if !rmp::assigned(e) || rmp::validated(e) {
            return;
        }
        let st = self.rmp.pvalidate(ctx, pfn & !511, gfn & !511, true, true);
        if st != RmpStatus::Success {
            ctx.bug(format!(
                "guest PVALIDATE of gfn {gfn:#x} failed: {}",
                st.name()
            ));
        }
    }

    /// `sev_gmem_invalidate` for [pfn, pfn + n): 2M entries fully inside go back at once,
    /// partially covered ones are PSMASHed first; then RMPUPDATE to shared.
    fn gmem_invalidate(&self, ctx: &mut Ctx, pfn: u64, n: u64) {
        if self.design != HookDesign::Gmem {
            return;
        }
        ctx.inc(C::gmem_invalidate);
        let end = pfn + n;
        let mut p = pfn;
        while p < end {
            let e = self.rmp.get(p);
            if !rmp::assigned(e) {
                p += 1;
                continue;
            }
            if rmp::is_2m(e) {
                if p.is_multiple_of(512) && p + 512 <= end {
                    self.rmp.rmpupdate(ctx, p, rmp::entry_gfn(e), false, true);
                    p += 512;
                    continue;
                }
                self.rmp.psmash(ctx, p);
            }
            self.rmp
                .rmpupdate(ctx, p, rmp::entry_gfn(self.rmp.get(p)), false, false);
            p += 1;
        }
    }

    fn gmem_bind(&self, pfn: u64, npages: u64) -> Result<()> {
        self.rmp.bind(pfn, npages)
    }

    fn gmem_unbind(&self, pfn: u64, npages: u64) {
        self.rmp.unbind(pfn, npages);
    }

    fn gmem_metadata_bytes(&self, npages: u64) -> u64 {
        Rmp::bytes_for(npages)
    }

    fn finalize_supported(&self) -> Result<()> {
        Err(bad_arg(
            "vm_type",
            "finalize is a TDX operation; a snp VM is not a TD",
        ))
    }

    /// A private NPT leaf needs an assigned RMP entry of the right gpa and size.
    fn check_private_leaf(&self, gfn: u64, pfn: u64, level: u8) -> CheckResult {
        let e = self.rmp.get(pfn);
        if !rmp::assigned(e) || rmp::entry_gfn(e) != gfn {
            return Err(format!(
                "private NPT leaf at gfn {gfn:#x} but its RMP entry is not assigned to that gpa"
            ));
        }
        if level == 2 && !rmp::is_2m(e) {
            return Err(format!(
                "2M private NPT leaf at gfn {gfn:#x} over 4K RMP entries"
            ));
        }
        Ok(())
    }

    fn check_teardown(&self, gmem: &[(u64, u64, u64)]) -> CheckResult {
        for &(gfn, pfn, npages) in gmem {
            if let Some(p) = self.rmp.first_assigned(pfn, npages) {
                return Err(format!(
                    "teardown left gfn {:#x} assigned in the RMP",
                    gfn + (p - pfn)
                ));
            }
        }
        Ok(())
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// The `private` design on SNP: RMPUPDATE on every private NPT install and removal.
pub struct SnpPrivateHooks {
    rmp: Arc<Rmp>,
}

impl ExternalOps for SnpPrivateHooks {
    fn link_external_spt(&self, _ctx: &mut Ctx, _gfn: u64, _level: u8, _child: u32) -> HookRet {
        HookRet::Ok
    }
    fn set_external_spte(&self, ctx: &mut Ctx, gfn: u64, level: u8, new_spte: u64) -> HookRet {
        let pfn = spte_to_pfn(new_spte);
        if !self.rmp.is_bound(pfn) {
            ctx.bug(format!(
                "private NPT leaf for gfn {gfn:#x} is not guest_memfd memory"
            ));
            return HookRet::Io;
        }
        match self.rmp.rmpupdate(ctx, pfn, gfn, true, level == 2) {
            RmpStatus::Success => HookRet::Ok,
            s => {
                ctx.bug(format!(
                    "RMPUPDATE to private failed for gfn {gfn:#x}: {}",
                    s.name()
                ));
                HookRet::Io
            }
        }
    }
    fn remove_external_spte(&self, ctx: &mut Ctx, gfn: u64, level: u8, old_spte: u64) {
        let pfn = spte_to_pfn(old_spte);
        if self.rmp.is_bound(pfn)
            && self.rmp.rmpupdate(ctx, pfn, gfn, false, level == 2) != RmpStatus::Success
        {
            ctx.bug(format!("RMPUPDATE to shared failed for gfn {gfn:#x}"));
        }
    }
    fn free_external_spt(&self, _ctx: &mut Ctx, _gfn: u64, _level: u8, _table: u32) -> HookRet {
        HookRet::Ok
    }
}
