//! The external-hook interface (KVM's `kvm_x86_ops` external page-table hooks) and the single
//! place that dispatches to it. Backends (the TDX module model, SNP's RMP-following `private`
//! design, the software mirror, a caller's hook object) only act; every call is counted and
//! traced here, so the same dispatches give the same counters under every backend.

use std::sync::Arc;

pub use crate::config::Design as HookDesign;
use crate::config::Interface;
use crate::stats::{C, COUNTER_NAMES, Ctx};

/// The cmpxchg lost (or a hook reported contention): KVM's -EBUSY.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Busy;

/// Result of an install hook: 0 / -EBUSY / -EIO in KVM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookRet {
    Ok,
    Busy,
    /// The backend hit a KVM_BUG_ON; it has already recorded the bug in the context.
    Io,
}

/// The four hooks of v6.16-6.19. `level` is the level of the entry written (for
/// `free_external_spt`, the level of the freed table, as KVM passes `sp->role.level`).
pub trait ExternalOps: Send + Sync {
    fn link_external_spt(&self, ctx: &mut Ctx, gfn: u64, level: u8, child_table: u32) -> HookRet;
    fn set_external_spte(&self, ctx: &mut Ctx, gfn: u64, level: u8, new_spte: u64) -> HookRet;
    fn remove_external_spte(&self, ctx: &mut Ctx, gfn: u64, level: u8, old_spte: u64);
    fn free_external_spt(&self, ctx: &mut Ctx, gfn: u64, level: u8, table: u32) -> HookRet;
    /// Split the huge external leaf at (`gfn`, `level`) into the table `child` (TDX huge-page
    /// RFC's `split_external_spt`). Backends without huge private pages never get it.
    fn split_external_spt(&self, ctx: &mut Ctx, gfn: u64, level: u8, child: u32) -> HookRet {
        let _ = (gfn, level, child);
        ctx.bug("split_external_spt: this backend has no huge private pages");
        HookRet::Io
    }
    /// End of a zap over a range (the `track=batched` TDX option flushes its blocked pages
    /// here); not a KVM hook, so not counted.
    fn zap_end(&self, _ctx: &mut Ctx) {}
}

/// The dispatch site: which backend receives the hooks, and under which interface shape.
#[derive(Clone)]
pub struct Dispatch {
    pub design: HookDesign,
    pub interface: Interface,
    ext: Option<Arc<dyn ExternalOps>>,
}

impl Dispatch {
    pub fn new(
        design: HookDesign,
        interface: Interface,
        ext: Option<Arc<dyn ExternalOps>>,
    ) -> Self {
        Self {
            design,
            interface,
            ext,
        }
    }

    /// True if SPTE changes call a backend at all (designs `mirror` and `private`).
    #[inline(always)]
    pub fn on_spte_changes(&self) -> bool {
        matches!(self.design, HookDesign::Mirror | HookDesign::Private)
    }

    #[inline]
    fn count(&self, ctx: &mut Ctx, hook: C, gfn: u64, level: u8, detail: u64) {
        // The two-hook interface delivers links and removals as set_external_spte.
        let c = match (self.interface, hook) {
            (Interface::TwoHook, C::link_external_spt | C::remove_external_spte) => {
                C::set_external_spte
            }
            _ => hook,
        };
        ctx.inc(c);
        ctx.trace(COUNTER_NAMES[c as usize], gfn, level, detail);
    }

    fn backend(&self, ctx: &mut Ctx) -> Option<&dyn ExternalOps> {
        if self.ext.is_none() {
            ctx.bug("external SPTE change without an external backend");
        }
        self.ext.as_deref()
    }

    pub fn link_external_spt(&self, ctx: &mut Ctx, gfn: u64, level: u8, child: u32) -> HookRet {
        self.count(ctx, C::link_external_spt, gfn, level, child as u64);
        match self.backend(ctx) {
            Some(b) => b.link_external_spt(ctx, gfn, level, child),
            None => HookRet::Io,
        }
    }

    pub fn set_external_spte(&self, ctx: &mut Ctx, gfn: u64, level: u8, spte: u64) -> HookRet {
        self.count(ctx, C::set_external_spte, gfn, level, spte);
        match self.backend(ctx) {
            Some(b) => b.set_external_spte(ctx, gfn, level, spte),
            None => HookRet::Io,
        }
    }

    pub fn remove_external_spte(&self, ctx: &mut Ctx, gfn: u64, level: u8, old: u64) {
        self.count(ctx, C::remove_external_spte, gfn, level, old);
        if let Some(b) = self.backend(ctx) {
            b.remove_external_spte(ctx, gfn, level, old);
        }
    }

    pub fn free_external_spt(&self, ctx: &mut Ctx, gfn: u64, level: u8, table: u32) -> HookRet {
        self.count(ctx, C::free_external_spt, gfn, level, 0);
        match self.backend(ctx) {
            Some(b) => b.free_external_spt(ctx, gfn, level, table),
            None => HookRet::Io,
        }
    }

    pub fn split_external_spt(&self, ctx: &mut Ctx, gfn: u64, level: u8, child: u32) -> HookRet {
        self.count(ctx, C::split_external_spt, gfn, level, child as u64);
        match self.backend(ctx) {
            Some(b) => b.split_external_spt(ctx, gfn, level, child),
            None => HookRet::Io,
        }
    }

    pub fn zap_end(&self, ctx: &mut Ctx) {
        if let Some(b) = self.ext.as_deref() {
            b.zap_end(ctx);
        }
    }
}
