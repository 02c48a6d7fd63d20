//! The TDP MMU proper (KVM's tdp_mmu.c): roots, the SPTE setters with the FROZEN protocol,
//! `handle_changed_spte`/`handle_removed_pt`, map, zaps and splits, over the page-table arena
//! and a hook dispatch site. It knows nothing of VM types: a mirror root and a shared alias
//! bit are properties it is built with, and external changes go through `hooks::Dispatch`.

mod dirty;
mod map;
mod nx;
mod roots;
mod set;
mod walk;
mod zap;

use std::sync::atomic::{AtomicU32, Ordering};

use crate::sync::Mutex;

use crate::arena::{Arena, NO_TABLE, SP_MIRROR};
use crate::cost::Cost;
use crate::hooks::{Dispatch, HookDesign};
use crate::stats::{C, Ctx};

pub use roots::{
    ROLE_ACC_ALL, ROLE_CR0_WP, ROLE_DIRECT, ROLE_EFER_NX, ROLE_INVALID, ROLE_IS_MIRROR, Root,
    RootTypes,
};
pub use zap::ZapOutcome;

/// Shape of a TDP MMU, fixed when the VM is built.
#[derive(Debug, Clone, Copy)]
pub struct TdpShape {
    pub levels: u8,
    pub vcpus: u32,
    /// The VM has a mirror root for private memory beside its direct root.
    pub has_mirror: bool,
    /// The shared (direct) alias as a gfn bit, 0 if none.
    pub gfn_direct_bits: u64,
    /// Exclusive bound of guest gfns.
    pub max_gfn: u64,
    pub nx_huge_pages: bool,
    /// KVM's `enable_ept_ad_bits`: leaves carry A/D and the CPU sets them; off, SPTEs are of
    /// the A/D-disabled type and aging uses access tracking.
    pub ad_bits: bool,
}

pub struct TdpMmu {
    pub arena: Arena,
    pub shape: TdpShape,
    pub hooks: Dispatch,
    /// `tdp_mmu_pages_lock`: the root list, newest first.
    pub roots: Mutex<Vec<Root>>,
    /// Per vCPU: the direct root it has loaded (`root.hpa`) and its mirror root.
    pub vcpu_root: Box<[AtomicU32]>,
    pub vcpu_mirror_root: Box<[AtomicU32]>,
    /// `possible_nx_huge_pages`: tables an exec fault had to create under the NX huge page
    /// mitigation, oldest first.
    pub nx: Mutex<nx::NxList>,
}

impl TdpMmu {
    pub fn new(arena: Arena, shape: TdpShape, hooks: Dispatch) -> Self {
        let n = shape.vcpus as usize;
        Self {
            arena,
            shape,
            hooks,
            roots: Mutex::new(Vec::new()),
            vcpu_root: (0..n).map(|_| AtomicU32::new(NO_TABLE)).collect(),
            vcpu_mirror_root: (0..n).map(|_| AtomicU32::new(NO_TABLE)).collect(),
            nx: Mutex::new(nx::NxList::default()),
        }
    }

    #[inline(always)]
    pub fn levels(&self) -> u8 {
        self.shape.levels
    }

    #[inline(always)]
    pub fn is_mirror_table(&self, table: u32) -> bool {
        self.arena.meta(table).flags.load(Ordering::Relaxed) & SP_MIRROR != 0
    }

    /// Alias bits a walk of this kind of root indexes with (the shared bit on a direct root
    /// of a VM with a mirror root).
    #[inline(always)]
    pub fn root_gfn_bits(&self, mirror: bool) -> u64 {
        if mirror {
            0
        } else {
            self.shape.gfn_direct_bits
        }
    }

    /// Do the hooks fire for a change of an entry in `table` during this operation?
    #[inline(always)]
    pub fn hooks_fire(&self, table: u32, ctx: &Ctx) -> bool {
        match self.hooks.design {
            HookDesign::None | HookDesign::Gmem => false,
            HookDesign::Mirror => self.is_mirror_table(table),
            HookDesign::Private => ctx.op_private,
        }
    }

    /// `kvm_flush_remote_tlbs`: one request, one IPI fan-out to every vCPU.
    pub fn flush_remote_tlbs(&self, ctx: &mut Ctx) {
        ctx.inc(C::remote_tlb_flush_requests);
        ctx.inc(C::remote_tlb_flush);
        // In virtual time the fan-out goes to the vCPUs actually running, by distance.
        if crate::sim::with(|e| e.flush_remote_tlbs(ctx)).is_none() {
            ctx.charge(Cost::tlb_flush_base_ns, 1);
            ctx.charge(Cost::tlb_flush_per_vcpu_ns, self.shape.vcpus as u64);
        }
    }
}

#[cfg(test)]
mod tests {
    //! The TDP MMU on its own: an arena, a shape, a dispatch site with a recording backend —
    //! no VM, no vendor, no TD.
    use std::sync::Arc;

    use super::*;
    use crate::config::{Design, Interface};
    use crate::hooks::{ExternalOps, HookRet};
    use crate::page_fault::{KvmPageFault, Ret};

    #[derive(Default)]
    struct Record(crate::sync::Mutex<Vec<(&'static str, u64, u8)>>);

    impl ExternalOps for Record {
        fn link_external_spt(&self, _: &mut Ctx, gfn: u64, level: u8, _: u32) -> HookRet {
            self.0.lock().push(("link", gfn, level));
            HookRet::Ok
        }
        fn set_external_spte(&self, _: &mut Ctx, gfn: u64, level: u8, _: u64) -> HookRet {
            self.0.lock().push(("set", gfn, level));
            HookRet::Ok
        }
        fn remove_external_spte(&self, _: &mut Ctx, gfn: u64, level: u8, _: u64) {
            self.0.lock().push(("remove", gfn, level));
        }
        fn free_external_spt(&self, _: &mut Ctx, gfn: u64, level: u8, _: u32) -> HookRet {
            self.0.lock().push(("free", gfn, level));
            HookRet::Ok
        }
    }

    fn mirror_mmu(rec: Arc<Record>) -> TdpMmu {
        let shape = TdpShape {
            levels: 4,
            vcpus: 1,
            has_mirror: true,
            gfn_direct_bits: 1 << 35,
            max_gfn: 1 << 35,
            nx_huge_pages: false,
            ad_bits: true,
        };
        let hooks = Dispatch::new(Design::Mirror, Interface::FourHook, Some(rec));
        TdpMmu::new(Arena::new(64).unwrap(), shape, hooks)
    }

    #[test]
    fn map_and_zap_a_mirror_leaf_without_a_vm() {
        let rec = Arc::new(Record::default());
        let mmu = mirror_mmu(rec.clone());
        let mut ctx = Ctx::default();
        mmu.mmu_load(&mut ctx, 0).unwrap();
        let root = mmu.vcpu_root(0, true);
        let mut f = KvmPageFault::new(0x1234, true, true, false, false);
        f.pfn = 0x4_0000_0000;
        assert_eq!(mmu.map(&mut ctx, &mut f, root, 0).unwrap(), Ret::Fixed);
        assert_eq!(
            *rec.0.lock(),
            vec![
                ("link", 0, 4),
                ("link", 0, 3),
                ("link", 0x1200, 2),
                ("set", 0x1234, 1)
            ]
        );
        assert_eq!(ctx.c[C::link_external_spt as usize], 3);
        assert_eq!(mmu.lookup(root, 0x1234, 0).1, f.spte);
        // A PRIVATE-filtered unmap reaches the mirror root and removes the leaf.
        assert_eq!(
            mmu.unmap_gfn_range(&mut ctx, true, false, 0x1234, 0x1235),
            1
        );
        assert_eq!(rec.0.lock().last(), Some(&("remove", 0x1234, 1)));
        // The direct root (shared alias) was never touched by the hooks.
        let direct = mmu.vcpu_root(0, false);
        assert_eq!(mmu.walk_root(direct, 0x1234, 1 << 35).len(), 1);
    }
}
