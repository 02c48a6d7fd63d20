//! Private memory operations: memory attributes (KVM_SET_MEMORY_ATTRIBUTES), guest_memfd
//! punch hole, and the TD lifecycle (finalize, destroy).

use std::sync::atomic::Ordering;

use crate::arena::NO_TABLE;
use crate::cost::Cost;
use crate::error::{Result, bad_arg};
use crate::snp::Rmp;
use crate::stats::C;
use crate::stats::Ctx;
use crate::vm::{HookDesign, MmuState, Vm, VmType};

impl Vm {
    fn check_confidential(&self, what: &str) -> Result<()> {
        if !self.vm_type.confidential() {
            return Err(bad_arg(
                what,
                format!("a {} VM has no private memory", self.vm_type.name()),
            ));
        }
        Ok(())
    }

    /// Every gfn of the range must be in a memslot (with guest_memfd if `gmem`).
    fn check_covered(st: &MmuState, gfn: u64, end: u64, gmem: bool) -> Result<()> {
        let mut g = gfn;
        while g < end {
            match st.memslots.find(g) {
                Some(s) if !gmem || s.gmem => g = s.end(),
                Some(s) => {
                    return Err(bad_arg(
                        "gfn",
                        format!("memslot {} holding gfn {g:#x} has no guest_memfd", s.id),
                    ));
                }
                None => {
                    return Err(bad_arg(
                        "gfn",
                        format!("gfn {g:#x} of [{gfn:#x}, {end:#x}) is not in any memslot"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// KVM_SET_MEMORY_ATTRIBUTES: before the change, unmap the range under the *old*
    /// attribute's filter (to-shared zaps private mappings, to-private zaps shared ones).
    /// Returns the number of leaves zapped.
    pub fn set_memory_attributes(&self, gfn: u64, npages: u64, private: bool) -> Result<u64> {
        self.check_confidential("private")?;
        self.check_range(gfn, npages)?;
        let end = gfn + npages;
        self.write_op(|st, ctx| {
            Self::check_covered(st, gfn, end, false)?;
            if st.attrs.uniform(gfn, end) == Some(private) {
                return Ok(0);
            }
            // The guest's conversion request exits to the host (SNP page-state change, TDX
            // MapGPA), and guest_memfd does its bookkeeping; a 2M folio only partly converted
            // is split.
            ctx.inc(C::conversions);
            ctx.charge(Cost::psc_exit_ns, 1);
            ctx.charge(Cost::gmem_convert_ns, 1);
            if self.cfg.folio_level == 2 {
                let mut splits = 0;
                for edge in [gfn, end] {
                    let inside_gmem = st.memslots.find(edge.min(end - 1)).is_some_and(|s| s.gmem);
                    if !edge.is_multiple_of(512) && inside_gmem {
                        splits += 1;
                    }
                }
                if gfn / 512 == (end - 1) / 512 && splits == 2 {
                    splits = 1; // both edges inside one folio
                }
                ctx.add(C::gmem_splits, splits);
                ctx.charge(Cost::gmem_split_2m_ns, splits as u64);
            }
            let out = self.unmap_gfn_range(ctx, !private, private, gfn, end);
            if out.flush {
                self.flush_remote_tlbs(ctx);
            }
            st.attrs.set(gfn, end, private);
            Ok(out.zapped)
        })
    }

    /// guest_memfd punch hole: `kvm_gmem_invalidate_begin` unmaps with the PRIVATE filter.
    pub fn punch_hole(&self, gfn: u64, npages: u64) -> Result<u64> {
        self.check_confidential("vm_type")?;
        self.check_range(gfn, npages)?;
        let end = gfn + npages;
        self.write_op(|st, ctx| {
            Self::check_covered(st, gfn, end, true)?;
            let out = self.unmap_gfn_range(ctx, true, false, gfn, end);
            if out.flush {
                self.flush_remote_tlbs(ctx);
            }
            self.gmem_invalidate(st, ctx, gfn, end);
            for slot in st
                .memslots
                .slots
                .iter()
                .filter(|s| s.gfn < end && gfn < s.end())
            {
                slot.untouch_gmem(gfn, end);
            }
            Ok(out.zapped)
        })
    }

    /// guest_memfd folios freed over [gfn, end): `kvm_arch_gmem_invalidate` (SNP: the RMP goes
    /// back to shared, PSMASHing 2M entries that are only partly freed).
    fn gmem_invalidate(&self, st: &MmuState, ctx: &mut Ctx, gfn: u64, end: u64) {
        if self.design != HookDesign::Gmem {
            return;
        }
        for slot in st
            .memslots
            .slots
            .iter()
            .filter(|s| s.gfn < end && gfn < s.end())
        {
            if let Some(rmp) = slot.rmp.as_ref() {
                let a = gfn.max(slot.gfn) - slot.gfn;
                let b = end.min(slot.end()) - slot.gfn;
                ctx.inc(C::gmem_invalidate);
                rmp.gmem_invalidate(ctx, a, b - a);
            }
        }
    }

    /// The guest's PVALIDATE over [gfn, gfn + npages) at 4K or 2M. Validation of a page that
    /// is not assigned to the guest is bad input (checked before anything changes); other
    /// architectural failures (double validation, size mismatch) are counted and returned.
    pub fn pvalidate(
        &self,
        gfn: u64,
        npages: u64,
        size_2m: bool,
        validate: bool,
    ) -> Result<Vec<(&'static str, u64)>> {
        if self.vm_type != VmType::Snp {
            return Err(bad_arg(
                "vm_type",
                "PVALIDATE is an SEV-SNP guest instruction",
            ));
        }
        self.check_range(gfn, npages)?;
        let step = if size_2m { 512 } else { 1 };
        if size_2m && (!gfn.is_multiple_of(512) || !npages.is_multiple_of(512)) {
            return Err(bad_arg(
                "gfn",
                "2M PVALIDATE needs a 2M-aligned gfn and a multiple of 512 pages",
            ));
        }
        self.write_op(|st, ctx| {
            for g in (gfn..gfn + npages).step_by(step as usize) {
                let slot = st.memslots.find(g).filter(|s| s.rmp.is_some());
                let Some(slot) = slot else {
                    return Err(bad_arg("gfn", format!("gfn {g:#x} is not guest_memfd memory of an SNP guest")));
                };
                let e = slot.rmp.as_ref().expect("filtered").get(g - slot.gfn);
                if !Rmp::assigned(e) || Rmp::gfn(e) != g {
                    return Err(bad_arg(
                        "gfn",
                        format!("gfn {g:#x} is not assigned to the guest in the RMP (validate an assigned page)"),
                    ));
                }
            }
            let mut out: Vec<(&'static str, u64)> = Vec::new();
            for g in (gfn..gfn + npages).step_by(step as usize) {
                let slot = st.memslots.find(g).expect("checked");
                let rmp = slot.rmp.as_ref().expect("checked");
                let s = rmp.pvalidate(ctx, g - slot.gfn, g, size_2m, validate);
                match out.iter_mut().find(|(n, _)| *n == s.name()) {
                    Some((_, c)) => *c += 1,
                    None => out.push((s.name(), 1)),
                }
            }
            Ok(out)
        })
    }

    /// An NPF with the RMP size-mismatch bit (`sev_handle_rmp_fault`): PSMASH the 2M RMP entry
    /// (tolerating one already split) and zap the 512-page gfn range so the NPT is rebuilt.
    pub fn rmp_fault(&self, gfn: u64) -> Result<()> {
        if self.vm_type != VmType::Snp {
            return Err(bad_arg("vm_type", "RMP faults exist only on SEV-SNP"));
        }
        self.check_gfn(gfn, "gfn")?;
        self.write_op(|st, ctx| {
            let Some(slot) = st.memslots.find(gfn).filter(|s| s.rmp.is_some()) else {
                return Err(bad_arg(
                    "gfn",
                    format!("gfn {gfn:#x} is not guest_memfd memory"),
                ));
            };
            ctx.inc(C::rmp_faults);
            let rmp = slot.rmp.as_ref().expect("filtered");
            let off = gfn - slot.gfn;
            if Rmp::is_2m(rmp.get(off)) && Rmp::assigned(rmp.get(off)) {
                rmp.psmash(ctx, off);
            }
            let base = gfn & !511;
            let out = self.zap_leafs(ctx, crate::vm::RootTypes::VALID, base, base + 512);
            if out.flush {
                self.flush_remote_tlbs(ctx);
            }
            Ok(())
        })
    }

    /// RMP entry of the guest_memfd page behind `gfn`: (assigned, validated, 2M, gfn).
    pub fn rmp_entry(&self, gfn: u64) -> Result<(bool, bool, bool, u64)> {
        self.check_gfn(gfn, "gfn")?;
        let st = self.mmu_lock.read();
        let Some(slot) = st.memslots.find(gfn).filter(|s| s.rmp.is_some()) else {
            return Err(bad_arg(
                "gfn",
                format!("gfn {gfn:#x} has no RMP entry (not SNP guest_memfd memory)"),
            ));
        };
        let e = slot.rmp.as_ref().expect("filtered").get(gfn - slot.gfn);
        Ok((
            Rmp::assigned(e),
            Rmp::validated(e),
            Rmp::is_2m(e),
            Rmp::gfn(e),
        ))
    }

    /// KVM_TDX_FINALIZE_VM: the TD becomes runnable.
    pub fn finalize(&self) -> Result<()> {
        let Some(t) = self.tdx.as_ref().filter(|_| self.vm_type == VmType::Tdx) else {
            return Err(bad_arg(
                "vm_type",
                format!(
                    "finalize is a TDX operation; a {} VM is not a TD",
                    self.vm_type.name()
                ),
            ));
        };
        self.write_op(|_, _| t.module.finalize())
    }

    /// Tear the VM down in KVM's order: release guest_memfd (zap every private leaf, HKID still
    /// assigned), release the HKID, then invalidate and zap every root exclusively (on a TD only
    /// `free_external_spt` → RECLAIM runs then). Afterwards every operation is refused.
    pub fn destroy(&self) -> Result<()> {
        self.write_op(|st, ctx| {
            let gmem: Vec<(u64, u64)> = st
                .memslots
                .slots
                .iter()
                .filter(|s| s.gmem)
                .map(|s| (s.gfn, s.end()))
                .collect();
            for (s, e) in gmem {
                let out = self.unmap_gfn_range(ctx, true, false, s, e);
                if out.flush {
                    self.flush_remote_tlbs(ctx);
                }
                self.gmem_invalidate(st, ctx, s, e);
            }
            if let Some(t) = &self.tdx {
                if t.module.opts.sept_free == crate::tdx::SeptFree::SeptRemove
                    && let Some(mirror) = self.current_root(true)
                {
                    // Pre-upstream order: tear the (now leaf-less) mirror tree down while the
                    // HKID is still assigned, so each S-EPT table goes by SEPT.REMOVE.
                    self.zap_root(ctx, mirror, false);
                }
                t.module.release_hkid(ctx);
            }
            self.uninit_tdp_mmu(ctx);
            Ok(())
        })?;
        self.destroyed.store(true, Ordering::Release);
        Ok(())
    }

    /// `kvm_mmu_uninit_tdp_mmu` after every vCPU dropped its roots (`kvm_mmu_destroy`).
    fn uninit_tdp_mmu(&self, ctx: &mut Ctx) {
        let tables: Vec<u32> = {
            let mut roots = self.roots.lock();
            for v in self.vcpu_root.iter().chain(self.vcpu_mirror_root.iter()) {
                let t = v.swap(NO_TABLE, Ordering::AcqRel);
                if t != NO_TABLE {
                    if let Some(r) = roots.iter_mut().find(|r| r.table == t) {
                        r.invalid = true;
                    }
                    self.put_root_locked(ctx, &mut roots, t);
                }
            }
            for r in roots.iter_mut() {
                r.invalid = true;
            }
            roots.iter().map(|r| r.table).collect()
        };
        for t in tables {
            self.zap_root(ctx, t, false);
            let mut roots = self.roots.lock();
            self.put_root_locked(ctx, &mut roots, t);
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::error::Error;
    use crate::stats::{C, Ctx};
    use crate::tdx::TdxOptions;
    use crate::vm::{Vm, VmConfig};

    fn running_td() -> Vm {
        let vm = Vm::new(VmConfig {
            vm_type: "tdx".into(),
            hooks: "mirror".into(),
            tdx: TdxOptions::default(),
            ..VmConfig::default()
        })
        .unwrap();
        vm.finalize().unwrap();
        vm.fault(1, Some(true), true, false, 0).unwrap();
        vm
    }

    /// Behaviours 11 and 12: atomic (shared) zaps of mirror entries and freeing S-EPT tables
    /// while the HKID is assigned are KVM bugs; the VM refuses everything afterwards.
    #[test]
    fn kvm_bug_rules_mark_the_vm_bugged() {
        let vm = running_td();
        let mirror = vm.current_root(true).unwrap();
        let mut ctx = Ctx::default();
        {
            let _w = vm.mmu_lock.write();
            vm.zap_root(&mut ctx, mirror, true);
        }
        let msg = ctx.bug.clone().expect("a KVM_BUG_ON fired");
        assert!(msg.contains("mirror"), "{msg}");
        assert!(matches!(vm.finish(&ctx), Err(Error::Bugged(_))));
        assert!(vm.bugged.load(std::sync::atomic::Ordering::Relaxed));
        assert!(matches!(
            vm.fault(2, Some(true), true, false, 0),
            Err(Error::Bugged(_))
        ));

        // Exclusive root zap with the HKID still assigned: free_external_spt is a bug and the
        // S-EPT page is leaked on purpose.
        let vm = running_td();
        let mirror = vm.current_root(true).unwrap();
        let mut ctx = Ctx::default();
        {
            let _w = vm.mmu_lock.write();
            vm.zap_root(&mut ctx, mirror, false);
        }
        assert!(ctx.bug.as_deref().unwrap().contains("HKID"));
        assert_eq!(
            ctx.c[C::external_spt_leaked as usize],
            3,
            "one per mirror table"
        );
        assert_eq!(
            ctx.c[C::sept_remove as usize],
            0,
            "upstream never issues SEPT.REMOVE"
        );
    }
}
