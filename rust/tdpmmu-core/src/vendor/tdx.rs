//! KVM's TDX side (vmx/tdx.c): the external hooks turned into SEAMCALL sequences
//! (`tdx_sept_*`), the TD lifecycle (finalize, HKID release), what the guest does after a
//! private fault (ACCEPT), and the local retry of private faults. The TDX module itself is
//! modeled in `tdx_module`.

use std::any::Any;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::tdx_module::{FREE, ST_TABLE, Status, TdxModule, state};
use super::{CheckResult, Vendor};
use crate::arena::{Arena, TABLE_BASE_PFN};
use crate::config::{SeptFree, TdxOptions};
use crate::cost::Cost;
use crate::error::{Result, bad_arg};
use crate::hooks::{ExternalOps, HookRet};
use crate::page_fault::Ret;
use crate::spte::spte_to_pfn;
use crate::stats::{C, Ctx};

pub struct Tdx {
    pub module: Arc<TdxModule>,
    /// The hooks drive the module (false when a caller's hook object receives them).
    pub module_hooked: bool,
}

impl Tdx {
    /// A TD of `vcpus` vCPUs whose S-EPT tables come from an arena of `capacity` tables.
    pub fn new(
        levels: u8,
        vcpus: u32,
        capacity: usize,
        opts: TdxOptions,
        seed: u64,
        module_hooked: bool,
    ) -> Result<Self> {
        Ok(Self {
            module: Arc::new(TdxModule::new(levels, vcpus, capacity, opts, seed, false)?),
            module_hooked,
        })
    }

    /// The external-hook backend that drives the module.
    pub fn hooks(&self) -> Arc<dyn ExternalOps> {
        Arc::new(TdxHooks {
            module: self.module.clone(),
        })
    }

    /// The private-leaf and table comparison of the mirror tree against the S-EPT.
    pub(crate) fn compare_with_mirror(
        module: &TdxModule,
        mirror_tables: usize,
        mut mirror_leaves: Vec<(u64, u64)>,
    ) -> CheckResult {
        let (sept_tables, mut sept_leaves) = module.snapshot();
        sept_leaves.sort_unstable();
        mirror_leaves.sort_unstable();
        if sept_leaves != mirror_leaves {
            let only_s: Vec<_> = sept_leaves
                .iter()
                .filter(|x| !mirror_leaves.contains(x))
                .take(4)
                .collect();
            let only_m: Vec<_> = mirror_leaves
                .iter()
                .filter(|x| !sept_leaves.contains(x))
                .take(4)
                .collect();
            return Err(format!(
                "mirror and S-EPT disagree: {} vs {} private leaves; only in S-EPT {only_s:x?}, only in mirror {only_m:x?}",
                mirror_leaves.len(),
                sept_leaves.len()
            ));
        }
        if sept_tables != mirror_tables {
            return Err(format!(
                "{mirror_tables} mirror page tables but {sept_tables} S-EPT tables"
            ));
        }
        Ok(())
    }

    pub(crate) fn teardown_left(module: &TdxModule) -> CheckResult {
        let (tables, leaves) = module.snapshot();
        if tables != 0 || !leaves.is_empty() {
            return Err(format!(
                "teardown left {tables} S-EPT/external table(s) and {} private leaf(s) never freed",
                leaves.len()
            ));
        }
        Ok(())
    }
}

impl Vendor for Tdx {
    fn exit_cost(&self) -> Cost {
        Cost::td_exit_entry_ns
    }

    fn vcpu_run_allowed(&self) -> Result<()> {
        if self.module.finalized() {
            Ok(())
        } else {
            Err(bad_arg(
                "vm",
                "the TD is not finalized: no vCPU can run yet (use populate, then finalize)",
            ))
        }
    }

    fn private_fault_is_write(&self) -> bool {
        true
    }

    fn private_fault_local_retries(&self) -> u32 {
        self.module.opts.max_local_retries
    }

    /// TDX maps private memory at 4K, or with the `huge_pages` option at 2M once the TD runs
    /// (TDH.MEM.PAGE.ADD of the initial image is 4K only).
    fn private_max_level(&self, _pfn: u64) -> u8 {
        if self.module.opts.huge_pages && self.module_hooked && self.module.finalized() {
            2
        } else {
            1
        }
    }

    /// Back in the guest, TDG.MEM.PAGE.ACCEPT turns an AUGed page into a mapped one.
    fn post_private_fault(&self, ctx: &mut Ctx, gfn: u64, _pfn: u64, ret: Ret) {
        if self.module_hooked && matches!(ret, Ret::Fixed | Ret::Spurious) {
            self.module.accept(ctx, gfn);
        }
    }

    fn populate_allowed(&self, private: bool) -> Result<()> {
        if !self.module.finalized() && !private {
            return Err(bad_arg(
                "private",
                "before finalize only the private initial image can be populated",
            ));
        }
        Ok(())
    }

    /// v6.16 `tdx_gmem_post_populate` issues PAGE.ADD after the map.
    fn post_populate(&self, ctx: &mut Ctx, gfn: u64, pfn: u64) {
        if self.module_hooked && self.module.opts.v6_16() && !self.module.finalized() {
            let s = self.module.populate_page_add(ctx, gfn, pfn);
            if s != Status::Success {
                ctx.bug(format!(
                    "TDH.MEM.PAGE.ADD failed for gfn {gfn:#x}: {}",
                    s.name()
                ));
            }
        }
    }

    fn finalize_supported(&self) -> Result<()> {
        Ok(())
    }

    fn finalize(&self) -> Result<()> {
        self.module.finalize()
    }

    fn finalized(&self) -> bool {
        self.module.finalized()
    }

    fn release_before_private_zap(&self) -> bool {
        self.module.opts.teardown == crate::config::Teardown::TerminateVm
    }

    fn zap_mirror_before_pre_destroy(&self) -> bool {
        self.module.opts.sept_free == SeptFree::SeptRemove
    }

    /// `tdx_mmu_release_hkid`.
    fn vm_pre_destroy(&self, ctx: &mut Ctx) {
        self.module.release_hkid(ctx);
    }

    /// A huge private leaf only with the `huge_pages` option, and only at 2M.
    fn check_private_leaf(&self, gfn: u64, _pfn: u64, level: u8) -> CheckResult {
        let max = if self.module.opts.huge_pages { 2 } else { 1 };
        if level > max {
            return Err(format!(
                "private leaf at gfn {gfn:#x} is level {level}; TDX allows level {max} here"
            ));
        }
        Ok(())
    }

    fn check_external(&self, mirror_tables: usize, mirror_leaves: Vec<(u64, u64)>) -> CheckResult {
        if !self.module_hooked {
            return Ok(());
        }
        Self::compare_with_mirror(&self.module, mirror_tables, mirror_leaves)
    }

    fn check_teardown(&self, _gmem: &[(u64, u64, u64)]) -> CheckResult {
        Self::teardown_left(&self.module)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// tdx.c's hook implementations on top of the module model.
pub struct TdxHooks {
    pub module: Arc<TdxModule>,
}

impl ExternalOps for TdxHooks {
    fn link_external_spt(&self, ctx: &mut Ctx, gfn: u64, level: u8, _child: u32) -> HookRet {
        let m = &self.module;
        let mut st = m.st.lock();
        match m.sept_add(ctx, &mut st, gfn, level) {
            Status::Success => HookRet::Ok,
            Status::OperandBusy => HookRet::Busy,
            s => {
                ctx.bug(format!(
                    "TDH.MEM.SEPT.ADD failed for gfn {gfn:#x} level {level}: {}",
                    s.name()
                ));
                HookRet::Io
            }
        }
    }

    fn set_external_spte(&self, ctx: &mut Ctx, gfn: u64, level: u8, new_spte: u64) -> HookRet {
        let max = if self.module.opts.huge_pages { 2 } else { 1 };
        if level > max {
            ctx.bug(format!(
                "private mapping at level {level}: TDX maps private memory at 4K{}",
                if max == 2 {
                    " or 2M"
                } else {
                    " only (huge_pages is off)"
                }
            ));
            return HookRet::Io;
        }
        let m = &self.module;
        let mut st = m.st.lock();
        let pfn = spte_to_pfn(new_spte);
        if !st.finalized && m.opts.v6_16() {
            // v6.16: only count; the populate path issues PAGE.ADD itself.
            st.nr_premapped += 1;
            return HookRet::Ok;
        }
        let aug = st.finalized;
        match m.leaf_install(ctx, &mut st, gfn, pfn, aug, level) {
            Status::Success => HookRet::Ok,
            Status::OperandBusy => HookRet::Busy,
            s => {
                ctx.bug(format!(
                    "{} failed for gfn {gfn:#x}: {}",
                    if aug {
                        "TDH.MEM.PAGE.AUG"
                    } else {
                        "TDH.MEM.PAGE.ADD"
                    },
                    s.name()
                ));
                HookRet::Io
            }
        }
    }

    fn remove_external_spte(&self, ctx: &mut Ctx, gfn: u64, level: u8, _old_spte: u64) {
        let m = &self.module;
        let mut st = m.st.lock();
        if !st.hkid_assigned {
            // KVM_TDX_TERMINATE_VM: with the key gone the page is reclaimed, no BLOCK/TRACK.
            if m.opts.teardown == crate::config::Teardown::TerminateVm {
                m.reclaim_page(ctx, gfn);
            } else {
                ctx.bug("remove_external_spte with the HKID released: nothing can be mapped");
            }
            return;
        }
        m.remove_page(ctx, &mut st, gfn, level);
    }

    fn free_external_spt(&self, ctx: &mut Ctx, gfn: u64, sp_level: u8, _table: u32) -> HookRet {
        // The S-EPT entry that links this table sits one level up.
        let level = sp_level + 1;
        let m = &self.module;
        let mut st = m.st.lock();
        let e = match m.entry(gfn, level) {
            Ok(e) => e,
            Err(s) => {
                ctx.bug(format!(
                    "free_external_spt: no S-EPT table for gfn {gfn:#x} level {level}: {}",
                    s.name()
                ));
                return HookRet::Io;
            }
        };
        let v = e.load(Ordering::Acquire);
        if state(v) != ST_TABLE {
            ctx.bug(format!(
                "free_external_spt: S-EPT entry for gfn {gfn:#x} level {level} is not a table"
            ));
            return HookRet::Io;
        }
        let child = (spte_to_pfn(v) - TABLE_BASE_PFN) as u32;
        if st.hkid_assigned {
            if m.opts.sept_free == SeptFree::SeptRemove {
                // Pre-upstream: take the (empty) table out of the live TD.
                let (s, ()) = m.no_vcpus(ctx, &mut st, |m, c, st| {
                    (m.range_block(c, st, gfn, level), ())
                });
                if s == Status::Success {
                    m.track_and_kick(ctx, &mut st);
                    let all_free =
                        (0..512).all(|i| m.arena.entry(child, i).load(Ordering::Acquire) == FREE);
                    let ok = all_free && m.tracking_done(&st, e.load(Ordering::Acquire));
                    let s = m.seamcall(
                        ctx,
                        C::sept_remove,
                        Cost::tdh_mem_sept_remove_ns,
                        gfn,
                        level,
                        if ok {
                            Status::Success
                        } else {
                            Status::EptEntryStateIncorrect
                        },
                    );
                    if s == Status::Success {
                        e.store(FREE, Ordering::Release);
                        m.arena.free_now(child);
                        ctx.add(C::sept_tables, -1);
                        m.wbinvd_and_clear(ctx, gfn, Arena::pfn(child));
                        return HookRet::Ok;
                    }
                }
                ctx.bug(format!(
                    "TDH.MEM.SEPT.REMOVE failed for gfn {gfn:#x} level {level}"
                ));
                return HookRet::Io;
            }
            // Upstream never frees S-EPT tables of a live TD; the page is leaked on purpose.
            ctx.bug("free_external_spt while the HKID is assigned");
            ctx.inc(C::external_spt_leaked);
            return HookRet::Io;
        }
        m.seamcall(
            ctx,
            C::page_reclaim,
            Cost::tdh_phymem_page_reclaim_ns,
            gfn,
            level,
            Status::Success,
        );
        if !m.software {
            ctx.inc(C::page_clear);
            ctx.charge(Cost::page_clear_ns, 1);
        }
        e.store(FREE, Ordering::Release);
        m.arena.free_now(child);
        ctx.add(C::sept_tables, -1);
        HookRet::Ok
    }

    /// The huge-page RFC's `tdx_sept_split_private_spt`: BLOCK the 2M leaf, TRACK and kick,
    /// then DEMOTE it into a new S-EPT table (`mmu_lock` held for write, never on a fault).
    fn split_external_spt(&self, ctx: &mut Ctx, gfn: u64, level: u8, _child: u32) -> HookRet {
        let m = &self.module;
        if level != 2 || !m.opts.huge_pages {
            ctx.bug(format!(
                "split_external_spt at level {level} without a 2M private leaf"
            ));
            return HookRet::Io;
        }
        let mut st = m.st.lock();
        if m.split_2m(ctx, &mut st, gfn) {
            HookRet::Ok
        } else {
            HookRet::Io
        }
    }

    fn zap_end(&self, ctx: &mut Ctx) {
        self.module.flush_batched(ctx);
    }
}
