//! External (mirror) page-table hooks: the interface KVM calls for every change of a mirror
//! SPTE, and the freeze protocol around installs (spec §4.1). The hook *design* decides which
//! backend receives the calls; the TDX module model is one backend.

use std::sync::atomic::Ordering;

use crate::iter::TdpIter;
use crate::mmu::Busy;
use crate::spte::{FROZEN_SPTE, is_last, is_shadow_present, spte_to_pfn};
use crate::stats::Ctx;
use crate::vm::Vm;

/// Result of an install hook: 0 / -EBUSY / -EIO in KVM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookRet {
    Ok,
    Busy,
    /// The backend hit a KVM_BUG_ON; it has already recorded the bug in the context.
    Io,
}

/// The four hooks of v6.16–6.19 (`link_external_spt`, `set_external_spte`,
/// `remove_external_spte`, `free_external_spt`). `level` is the level of the entry written.
pub trait ExternalOps: Send + Sync {
    fn link_external_spt(&self, ctx: &mut Ctx, gfn: u64, level: u8, child_table: u32) -> HookRet;
    fn set_external_spte(&self, ctx: &mut Ctx, gfn: u64, level: u8, new_spte: u64) -> HookRet;
    fn remove_external_spte(&self, ctx: &mut Ctx, gfn: u64, level: u8, old_spte: u64);
    fn free_external_spt(&self, ctx: &mut Ctx, gfn: u64, level: u8, table: u32) -> HookRet;
}

impl Vm {
    /// `set_external_spte_present`: freeze the mirror entry, run the hook, then publish the
    /// final value (or restore the old one). The entry is present only after the hook succeeded.
    pub(crate) fn set_external_spte_present(
        &self,
        ctx: &mut Ctx,
        it: &mut TdpIter<'_>,
        new: u64,
    ) -> Result<(), Busy> {
        let old = it.old_spte;
        if !is_shadow_present(new) {
            ctx.bug("atomic zap of a mirror SPTE");
            return Err(Busy);
        }
        if is_shadow_present(old) {
            ctx.bug("atomic install over a present mirror SPTE");
            return Err(Busy);
        }
        let sptep = it.sptep();
        if let Err(cur) =
            sptep.compare_exchange(old, FROZEN_SPTE, Ordering::AcqRel, Ordering::Acquire)
        {
            it.old_spte = cur;
            return Err(Busy);
        }
        let Some(ext) = self.external.as_deref() else {
            ctx.bug("mirror SPTE change without an external backend");
            sptep.store(old, Ordering::Release);
            return Err(Busy);
        };
        let ret = if is_last(new, it.level) {
            ext.set_external_spte(ctx, it.gfn, it.level, new)
        } else {
            let child = self.arena.idx_of_pfn(spte_to_pfn(new));
            match child {
                Some(c) => ext.link_external_spt(ctx, it.gfn, it.level, c),
                None => {
                    ctx.bug("link of a mirror SPTE to a table outside the arena");
                    HookRet::Io
                }
            }
        };
        if ret == HookRet::Ok {
            sptep.store(new, Ordering::Release);
            self.handle_changed_spte(ctx, it.gfn, old, new, it.level, true);
            Ok(())
        } else {
            sptep.store(old, Ordering::Release);
            Err(Busy)
        }
    }

    pub(crate) fn remove_external_spte(&self, ctx: &mut Ctx, gfn: u64, old: u64, level: u8) {
        if !is_shadow_present(old) || !is_last(old, level) {
            return;
        }
        if let Some(ext) = self.external.as_deref() {
            ext.remove_external_spte(ctx, gfn, level, old);
        }
    }

    /// `level` is the level of the freed table (`sp->role.level`), as KVM passes it.
    pub(crate) fn free_external_spt(&self, ctx: &mut Ctx, gfn: u64, level: u8, table: u32) {
        if let Some(ext) = self.external.as_deref() {
            let _ = ext.free_external_spt(ctx, gfn, level, table);
        }
    }
}
