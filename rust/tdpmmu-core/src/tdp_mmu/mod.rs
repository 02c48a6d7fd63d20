//! The TDP MMU proper (KVM's tdp_mmu.c): roots, the SPTE setters with the FROZEN protocol,
//! `handle_changed_spte`/`handle_removed_pt`, map, zaps and splits, over the page-table arena
//! and a hook dispatch site. It knows nothing of VM types: a mirror root and a shared alias
//! bit are properties it is built with, and external changes go through `hooks::Dispatch`.

mod map;
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
        ctx.charge(Cost::tlb_flush_base_ns, 1);
        ctx.charge(Cost::tlb_flush_per_vcpu_ns, self.shape.vcpus as u64);
    }
}
