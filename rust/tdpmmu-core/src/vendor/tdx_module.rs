//! A model of the TDX module's side of private memory: the TD's state (HKID, finalized, TLB
//! epoch), its own S-EPT tree (in a separate arena, one state per entry), and the SEAMCALL
//! leaves KVM issues, each checking its preconditions and answering with a status code instead
//! of trusting the caller. OPERAND_BUSY can be injected per try of a leaf (`TdxOptions::busy`).

use std::sync::atomic::Ordering;

use crate::sync::Mutex;

use crate::arena::Arena;
use crate::config::{TdxOptions, Track};
use crate::cost::Cost;
use crate::error::{Result, bad_arg};
use crate::sim::TdxLock;
use crate::spte::{self, SHADOW_NONPRESENT_VALUE, spte_to_pfn};
use crate::stats::{C, Ctx};

/// SEAMCALL completion status (class bits as the module reports them; bit 63 = error).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub enum Status {
    Success = 0,
    OperandBusy = 0x8000_0200_0000_0000,
    EptWalkFailed = 0xC000_0B00_0000_0000,
    EptEntryStateIncorrect = 0xC000_0B0D_0000_0000,
    TlbTrackingNotDone = 0xC000_0B08_0000_0000,
    OpStateIncorrect = 0xC000_0C00_0000_0000,
    PageMetadataIncorrect = 0xC000_0300_0000_0000,
    OperandInvalid = 0xC000_0100_0000_0000,
}

impl Status {
    pub fn name(self) -> &'static str {
        match self {
            Self::Success => "TDX_SUCCESS",
            Self::OperandBusy => "TDX_OPERAND_BUSY",
            Self::EptWalkFailed => "TDX_EPT_WALK_FAILED",
            Self::EptEntryStateIncorrect => "TDX_EPT_ENTRY_STATE_INCORRECT",
            Self::TlbTrackingNotDone => "TDX_TLB_TRACKING_NOT_DONE",
            Self::OpStateIncorrect => "TDX_OP_STATE_INCORRECT",
            Self::PageMetadataIncorrect => "TDX_PAGE_METADATA_INCORRECT",
            Self::OperandInvalid => "TDX_OPERAND_INVALID",
        }
    }
}

// S-EPT entry encoding inside the model (not an EPT format): state in bits 0-3, pfn or table
// pfn in 12-51, the TLB epoch an entry was blocked in, in 52-62.
pub(crate) const FREE: u64 = SHADOW_NONPRESENT_VALUE;
pub(crate) const ST_TABLE: u64 = 1;
const ST_MAPPED: u64 = 2;
const ST_PENDING: u64 = 3;
const ST_BLOCKED_LEAF: u64 = 4;
const ST_BLOCKED_TABLE: u64 = 5;
const EPOCH_SHIFT: u32 = 52;
const EPOCH_MASK: u64 = 0x7ff;

pub(crate) fn state(e: u64) -> u64 {
    if e == FREE { 0 } else { e & 0xf }
}
fn mk(st: u64, pfn: u64, epoch: u64) -> u64 {
    st | (pfn << 12) & spte::PFN_MASK | (epoch & EPOCH_MASK) << EPOCH_SHIFT
}
fn epoch_of(e: u64) -> u64 {
    (e >> EPOCH_SHIFT) & EPOCH_MASK
}

#[derive(Debug)]
pub struct TdState {
    pub(crate) finalized: bool,
    pub(crate) hkid_assigned: bool,
    epoch: u64,
    /// Epoch at which all vCPUs were last forced out of the guest.
    kicked_epoch: u64,
    pub(crate) nr_premapped: i64,
    rng: u64,
    /// Leaves blocked by a batched zap, waiting for the single TRACK.
    pending_remove: Vec<(u64, u8)>,
}

/// The TDX module, as far as private memory goes.
pub struct TdxModule {
    pub arena: Arena,
    pub root: u32,
    levels: u8,
    vcpus: u32,
    pub opts: TdxOptions,
    pub software: bool,
    pub(crate) st: Mutex<TdState>,
    /// Mirror of `TdState::finalized` for the fault path.
    finalized_flag: std::sync::atomic::AtomicBool,
}

impl TdxModule {
    /// `software`: the SW_PROTECTED mirror variant — the same external tree, no TDX module:
    /// no SEAMCALL counts or costs, runnable from the start.
    pub fn new(
        levels: u8,
        vcpus: u32,
        capacity: usize,
        opts: TdxOptions,
        seed: u64,
        software: bool,
    ) -> Result<Self> {
        let arena = Arena::new(capacity)?;
        // The S-EPT root belongs to the TD's control structures (not a KVM external_spt page).
        let root = arena.alloc(levels, 0, crate::arena::SP_EXTERNAL)?;
        Ok(Self {
            arena,
            root,
            levels,
            vcpus,
            opts,
            software,
            finalized_flag: std::sync::atomic::AtomicBool::new(software),
            st: Mutex::new(TdState {
                finalized: software,
                hkid_assigned: true,
                epoch: 1,
                kicked_epoch: 0,
                nr_premapped: 0,
                rng: seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1,
                pending_remove: Vec::new(),
            }),
        })
    }

    /// Lock-free: every TD fault asks.
    pub fn finalized(&self) -> bool {
        self.finalized_flag
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Whether this try of SEAMCALL `leaf` (0 SEPT.ADD, 1 PAGE.AUG, 2 RANGE.BLOCK, 3 TRACK,
    /// 4 PAGE.REMOVE) returns OPERAND_BUSY: in virtual time when it overlaps a conflicting
    /// SEAMCALL in modeled time, else by the injection option.
    fn busy(&self, ctx: &Ctx, st: &mut TdState, leaf: usize) -> bool {
        if !self.software {
            let (lock, ns) = match leaf {
                0 => (TdxLock::SeptShared, Cost::tdh_mem_sept_add_ns),
                1 => (TdxLock::SeptShared, Cost::tdh_mem_page_aug_ns),
                2 => (TdxLock::SeptExclusive, Cost::tdh_mem_range_block_ns),
                3 => (TdxLock::EpochExclusive, Cost::tdh_mem_track_ns),
                _ => (TdxLock::SeptShared, Cost::tdh_mem_page_remove_ns),
            };
            if crate::sim::with(|e| e.tdx_busy(ctx, lock, ctx.rate(ns))) == Some(true) {
                return true;
            }
        }
        let p = self.opts.busy[leaf];
        if p <= 0.0 {
            return false;
        }
        st.rng ^= st.rng << 13;
        st.rng ^= st.rng >> 7;
        st.rng ^= st.rng << 17;
        ((st.rng >> 11) as f64 / (1u64 << 53) as f64) < p
    }

    pub(crate) fn seamcall(
        &self,
        ctx: &mut Ctx,
        c: C,
        ns: Cost,
        gfn: u64,
        level: u8,
        status: Status,
    ) -> Status {
        if self.software {
            // The SW_PROTECTED mirror backend keeps the tree but issues no SEAMCALLs.
            return status;
        }
        ctx.inc(c);
        ctx.charge(ns, 1);
        ctx.trace(
            crate::stats::COUNTER_NAMES[c as usize],
            gfn,
            level,
            status as u64,
        );
        if status == Status::OperandBusy {
            ctx.inc(C::seamcall_busy);
        }
        status
    }

    /// The S-EPT entry for `gfn` at `level` (PG level), if every table above it is linked.
    pub(crate) fn entry(
        &self,
        gfn: u64,
        level: u8,
    ) -> std::result::Result<&std::sync::atomic::AtomicU64, Status> {
        let mut table = self.root;
        let mut l = self.levels;
        while l > level {
            let e = self
                .arena
                .entry(table, spte::index(gfn, l))
                .load(Ordering::Acquire);
            if state(e) != ST_TABLE {
                return Err(Status::EptWalkFailed);
            }
            table = (spte_to_pfn(e) - crate::arena::TABLE_BASE_PFN) as u32;
            l -= 1;
        }
        Ok(self.arena.entry(table, spte::index(gfn, l)))
    }

    /// Every non-FREE S-EPT entry in tree order: (gfn, level, state name, pfn). For table
    /// entries the pfn is the S-EPT table's host pfn.
    pub fn dump(&self) -> Vec<(u64, u8, &'static str, u64)> {
        let mut out = Vec::new();
        self.dump_table(self.root, self.levels, 0, &mut out);
        out
    }

    fn dump_table(
        &self,
        t: u32,
        level: u8,
        base: u64,
        out: &mut Vec<(u64, u8, &'static str, u64)>,
    ) {
        for i in 0..spte::ENTRIES_PER_TABLE {
            let e = self.arena.entry(t, i).load(Ordering::Acquire);
            let gfn = base + i as u64 * spte::pages_per_level(level);
            let name = match state(e) {
                0 => continue,
                ST_TABLE => "TABLE",
                ST_MAPPED => "MAPPED",
                ST_PENDING => "PENDING",
                ST_BLOCKED_LEAF => "BLOCKED",
                ST_BLOCKED_TABLE => "BLOCKED_TABLE",
                _ => "UNKNOWN",
            };
            out.push((gfn, level, name, spte_to_pfn(e)));
            if matches!(state(e), ST_TABLE | ST_BLOCKED_TABLE) {
                let c = (spte_to_pfn(e) - crate::arena::TABLE_BASE_PFN) as u32;
                self.dump_table(c, level - 1, gfn, out);
            }
        }
    }

    /// Number of S-EPT tables linked under the root and every present leaf (gfn, pfn).
    pub fn snapshot(&self) -> (usize, Vec<(u64, u64)>) {
        let mut tables = 0;
        let mut leaves = Vec::new();
        self.collect(self.root, self.levels, 0, &mut tables, &mut leaves);
        (tables, leaves)
    }

    fn collect(
        &self,
        t: u32,
        level: u8,
        base: u64,
        tables: &mut usize,
        leaves: &mut Vec<(u64, u64)>,
    ) {
        for i in 0..spte::ENTRIES_PER_TABLE {
            let e = self.arena.entry(t, i).load(Ordering::Acquire);
            let gfn = base + i as u64 * spte::pages_per_level(level);
            match state(e) {
                ST_TABLE | ST_BLOCKED_TABLE => {
                    *tables += 1;
                    let c = (spte_to_pfn(e) - crate::arena::TABLE_BASE_PFN) as u32;
                    self.collect(c, level - 1, gfn, tables, leaves);
                }
                ST_MAPPED | ST_PENDING | ST_BLOCKED_LEAF => leaves.push((gfn, spte_to_pfn(e))),
                _ => {}
            }
        }
    }

    // ----- SEAMCALL leaves --------------------------------------------------------------------

    /// TDH.MEM.SEPT.ADD: link a new S-EPT table under the entry at `level` (PG level).
    pub(crate) fn sept_add(&self, ctx: &mut Ctx, st: &mut TdState, gfn: u64, level: u8) -> Status {
        let ns = Cost::tdh_mem_sept_add_ns;
        if self.busy(ctx, st, 0) {
            return self.seamcall(ctx, C::sept_add, ns, gfn, level, Status::OperandBusy);
        }
        if !st.hkid_assigned {
            return self.seamcall(ctx, C::sept_add, ns, gfn, level, Status::OpStateIncorrect);
        }
        let e = match self.entry(gfn, level) {
            Ok(e) => e,
            Err(s) => return self.seamcall(ctx, C::sept_add, ns, gfn, level, s),
        };
        if e.load(Ordering::Acquire) != FREE {
            return self.seamcall(
                ctx,
                C::sept_add,
                ns,
                gfn,
                level,
                Status::EptEntryStateIncorrect,
            );
        }
        let Ok(t) = self.arena.alloc(
            level - 1,
            spte::round_gfn(gfn, level),
            crate::arena::SP_EXTERNAL,
        ) else {
            return self.seamcall(
                ctx,
                C::sept_add,
                ns,
                gfn,
                level,
                Status::PageMetadataIncorrect,
            );
        };
        e.store(mk(ST_TABLE, Arena::pfn(t), 0), Ordering::Release);
        ctx.inc(C::sept_tables);
        self.seamcall(ctx, C::sept_add, ns, gfn, level, Status::Success)
    }

    pub(crate) fn leaf_install(
        &self,
        ctx: &mut Ctx,
        st: &mut TdState,
        gfn: u64,
        pfn: u64,
        aug: bool,
        level: u8,
    ) -> Status {
        let (c, ns) = if aug {
            (C::page_aug, Cost::tdh_mem_page_aug_ns)
        } else {
            (C::page_add, Cost::tdh_mem_page_add_ns)
        };
        if aug && self.busy(ctx, st, 1) {
            return self.seamcall(ctx, c, ns, gfn, level, Status::OperandBusy);
        }
        if !st.hkid_assigned || st.finalized != aug {
            return self.seamcall(ctx, c, ns, gfn, level, Status::OpStateIncorrect);
        }
        // TDH.MEM.PAGE.ADD is 4K only; AUG also maps 2M.
        if level > 1 + u8::from(aug) {
            return self.seamcall(ctx, c, ns, gfn, level, Status::OperandInvalid);
        }
        let e = match self.entry(gfn, level) {
            Ok(e) => e,
            Err(s) => return self.seamcall(ctx, c, ns, gfn, level, s),
        };
        if e.load(Ordering::Acquire) != FREE {
            return self.seamcall(ctx, c, ns, gfn, level, Status::EptEntryStateIncorrect);
        }
        e.store(
            mk(if aug { ST_PENDING } else { ST_MAPPED }, pfn, 0),
            Ordering::Release,
        );
        let s = self.seamcall(ctx, c, ns, gfn, level, Status::Success);
        if !aug && self.opts.measure {
            for _ in 0..16 {
                self.seamcall(
                    ctx,
                    C::mr_extend,
                    Cost::tdh_mr_extend_ns,
                    gfn,
                    1,
                    Status::Success,
                );
            }
        }
        s
    }

    /// TDG.MEM.PAGE.ACCEPT by the guest after a runtime private fault.
    pub fn accept(&self, ctx: &mut Ctx, gfn: u64) {
        // Under the module's lock: two vCPUs touching the same PENDING page accept it once.
        let _st = self.st.lock();
        let Some((level, e)) = self.leaf_entry(gfn) else {
            return;
        };
        let v = e.load(Ordering::Acquire);
        if state(v) == ST_PENDING {
            e.store(mk(ST_MAPPED, spte_to_pfn(v), 0), Ordering::Release);
            self.seamcall(
                ctx,
                C::page_accept,
                Cost::tdg_mem_page_accept_ns,
                gfn,
                level,
                Status::Success,
            );
            // Accepting a 2M page clears all of it: the per-4K cost for each further page.
            ctx.charge(
                Cost::tdg_mem_page_accept_ns,
                spte::pages_per_level(level) - 1,
            );
        }
    }

    /// The leaf entry mapping `gfn` (at 4K or 2M), if any.
    pub(crate) fn leaf_entry(&self, gfn: u64) -> Option<(u8, &std::sync::atomic::AtomicU64)> {
        for level in [1u8, 2] {
            if let Ok(e) = self.entry(gfn, level) {
                let st = state(e.load(Ordering::Acquire));
                if matches!(st, ST_MAPPED | ST_PENDING | ST_BLOCKED_LEAF) {
                    return Some((level, e));
                }
                return None;
            }
        }
        None
    }

    pub(crate) fn range_block(
        &self,
        ctx: &mut Ctx,
        st: &mut TdState,
        gfn: u64,
        level: u8,
    ) -> Status {
        let ns = Cost::tdh_mem_range_block_ns;
        if self.busy(ctx, st, 2) {
            return self.seamcall(ctx, C::range_block, ns, gfn, level, Status::OperandBusy);
        }
        let e = match self.entry(gfn, level) {
            Ok(e) => e,
            Err(s) => return self.seamcall(ctx, C::range_block, ns, gfn, level, s),
        };
        let v = e.load(Ordering::Acquire);
        let new = match state(v) {
            ST_MAPPED | ST_PENDING if level <= 2 => mk(ST_BLOCKED_LEAF, spte_to_pfn(v), st.epoch),
            ST_TABLE => mk(ST_BLOCKED_TABLE, spte_to_pfn(v), st.epoch),
            _ => {
                return self.seamcall(
                    ctx,
                    C::range_block,
                    ns,
                    gfn,
                    level,
                    Status::EptEntryStateIncorrect,
                );
            }
        };
        e.store(new, Ordering::Release);
        self.seamcall(ctx, C::range_block, ns, gfn, level, Status::Success)
    }

    fn mem_track(&self, ctx: &mut Ctx, st: &mut TdState) -> Status {
        let ns = Cost::tdh_mem_track_ns;
        if self.busy(ctx, st, 3) {
            return self.seamcall(ctx, C::mem_track, ns, 0, 0, Status::OperandBusy);
        }
        if !st.finalized {
            return self.seamcall(ctx, C::mem_track, ns, 0, 0, Status::OpStateIncorrect);
        }
        st.epoch += 1;
        self.seamcall(ctx, C::mem_track, ns, 0, 0, Status::Success)
    }

    /// KVM_REQ_OUTSIDE_GUEST_MODE to every vCPU: all of them leave the old TLB epoch.
    pub(crate) fn kick_all(&self, ctx: &mut Ctx, st: &mut TdState) {
        self.kick(ctx, st, false);
    }

    /// `block_entry`: KVM's `wait_for_sept_zap` keeps vCPUs out until the caller's retry.
    fn kick(&self, ctx: &mut Ctx, st: &mut TdState, block_entry: bool) {
        st.kicked_epoch = st.epoch;
        if self.software {
            return;
        }
        ctx.inc(C::vcpu_kicks);
        if crate::sim::with(|e| e.kick_all(ctx, block_entry)).is_none() {
            ctx.charge(Cost::kick_base_ns, 1);
            ctx.charge(Cost::kick_per_vcpu_ns, self.vcpus as u64);
        }
        ctx.trace("kick", 0, 0, self.vcpus as u64);
    }

    pub(crate) fn tracking_done(&self, st: &TdState, e: u64) -> bool {
        // Blocked in an older epoch, and every vCPU left the guest since the last TRACK.
        !st.finalized
            || ((epoch_of(e) & EPOCH_MASK) != (st.epoch & EPOCH_MASK)
                && st.kicked_epoch == st.epoch)
    }

    pub(crate) fn page_remove(
        &self,
        ctx: &mut Ctx,
        st: &mut TdState,
        gfn: u64,
        level: u8,
    ) -> (Status, u64) {
        let ns = Cost::tdh_mem_page_remove_ns;
        if self.busy(ctx, st, 4) {
            return (
                self.seamcall(ctx, C::page_remove, ns, gfn, level, Status::OperandBusy),
                0,
            );
        }
        let e = match self.entry(gfn, level) {
            Ok(e) => e,
            Err(s) => return (self.seamcall(ctx, C::page_remove, ns, gfn, level, s), 0),
        };
        let v = e.load(Ordering::Acquire);
        if state(v) != ST_BLOCKED_LEAF {
            return (
                self.seamcall(
                    ctx,
                    C::page_remove,
                    ns,
                    gfn,
                    level,
                    Status::EptEntryStateIncorrect,
                ),
                0,
            );
        }
        if !self.tracking_done(st, v) {
            return (
                self.seamcall(
                    ctx,
                    C::page_remove,
                    ns,
                    gfn,
                    level,
                    Status::TlbTrackingNotDone,
                ),
                0,
            );
        }
        e.store(FREE, Ordering::Release);
        (
            self.seamcall(ctx, C::page_remove, ns, gfn, level, Status::Success),
            spte_to_pfn(v),
        )
    }

    /// TDH.PHYMEM.PAGE.RECLAIM of a private page (4K or 2M) after the HKID was released, then
    /// the clear: the teardown order of KVM_TDX_TERMINATE_VM.
    pub(crate) fn reclaim_page(&self, ctx: &mut Ctx, gfn: u64) {
        let Some((level, e)) = self.leaf_entry(gfn) else {
            ctx.bug(format!(
                "reclaim: gfn {gfn:#x} has no private page in the S-EPT"
            ));
            return;
        };
        self.seamcall(
            ctx,
            C::page_reclaim,
            Cost::tdh_phymem_page_reclaim_ns,
            gfn,
            level,
            Status::Success,
        );
        if !self.software {
            let pages = spte::pages_per_level(level);
            ctx.add(C::page_clear, pages as i64);
            ctx.charge(Cost::page_clear_ns, pages);
        }
        e.store(FREE, Ordering::Release);
    }

    /// TDH.MEM.PAGE.DEMOTE: a blocked 2M leaf, tracked out of every vCPU's TLB, becomes a new
    /// S-EPT table of 512 mapped 4K leaves.
    pub(crate) fn page_demote(&self, ctx: &mut Ctx, st: &mut TdState, gfn: u64) -> Status {
        let ns = Cost::tdh_mem_page_demote_ns;
        let e = match self.entry(gfn, 2) {
            Ok(e) => e,
            Err(s) => return self.seamcall(ctx, C::page_demote, ns, gfn, 2, s),
        };
        let v = e.load(Ordering::Acquire);
        if state(v) != ST_BLOCKED_LEAF {
            return self.seamcall(
                ctx,
                C::page_demote,
                ns,
                gfn,
                2,
                Status::EptEntryStateIncorrect,
            );
        }
        if !self.tracking_done(st, v) {
            return self.seamcall(ctx, C::page_demote, ns, gfn, 2, Status::TlbTrackingNotDone);
        }
        let base = spte::round_gfn(gfn, 2);
        let Ok(t) = self.arena.alloc(1, base, crate::arena::SP_EXTERNAL) else {
            return self.seamcall(
                ctx,
                C::page_demote,
                ns,
                gfn,
                2,
                Status::PageMetadataIncorrect,
            );
        };
        let pfn = spte_to_pfn(v);
        for i in 0..spte::ENTRIES_PER_TABLE {
            self.arena
                .entry(t, i)
                .store(mk(ST_MAPPED, pfn + i as u64, 0), Ordering::Release);
        }
        e.store(mk(ST_TABLE, Arena::pfn(t), 0), Ordering::Release);
        ctx.inc(C::sept_tables);
        self.seamcall(ctx, C::page_demote, ns, gfn, 2, Status::Success)
    }

    /// KVM's split of a private 2M leaf: BLOCK (2M), TRACK + kick, DEMOTE, each retried once
    /// after kicking every vCPU out on OPERAND_BUSY. False (and a KVM bug) on failure.
    pub(crate) fn split_2m(&self, ctx: &mut Ctx, st: &mut TdState, gfn: u64) -> bool {
        let (s, ()) = self.no_vcpus(ctx, st, |m, c, st| (m.range_block(c, st, gfn, 2), ()));
        if s != Status::Success {
            ctx.bug(format!(
                "TDH.MEM.RANGE.BLOCK (2M) failed for gfn {gfn:#x}: {}",
                s.name()
            ));
            return false;
        }
        self.track_and_kick(ctx, st);
        let (s, ()) = self.no_vcpus(ctx, st, |m, c, st| (m.page_demote(c, st, gfn), ()));
        if s != Status::Success {
            ctx.bug(format!(
                "TDH.MEM.PAGE.DEMOTE failed for gfn {gfn:#x}: {}",
                s.name()
            ));
            return false;
        }
        true
    }

    pub(crate) fn wbinvd_and_clear(&self, ctx: &mut Ctx, gfn: u64, pfn: u64) {
        self.wbinvd_and_clear_level(ctx, gfn, pfn, 1);
    }

    /// Write back and invalidate, then clear, every 4K page of a removed leaf at `level`.
    pub(crate) fn wbinvd_and_clear_level(&self, ctx: &mut Ctx, gfn: u64, pfn: u64, level: u8) {
        if self.software {
            return;
        }
        let pages = spte::pages_per_level(level);
        for _ in 0..pages {
            self.seamcall(
                ctx,
                C::page_wbinvd,
                Cost::tdh_phymem_page_wbinvd_ns,
                gfn,
                1,
                Status::Success,
            );
        }
        ctx.add(C::page_clear, pages as i64);
        ctx.charge(Cost::page_clear_ns, pages);
        ctx.trace("clear", gfn, level, pfn);
    }

    /// tdx.c's busy handling on the zap side: on OPERAND_BUSY, block vCPU entry, kick everyone,
    /// retry once; the caller treats any failure of the retry (a second OPERAND_BUSY included)
    /// as a KVM bug. Busy injection applies to the retry too.
    pub(crate) fn no_vcpus<T>(
        &self,
        ctx: &mut Ctx,
        st: &mut TdState,
        mut f: impl FnMut(&Self, &mut Ctx, &mut TdState) -> (Status, T),
    ) -> (Status, T) {
        let (s, v) = f(self, ctx, st);
        if s != Status::OperandBusy {
            return (s, v);
        }
        self.kick(ctx, st, true);
        let r = f(self, ctx, st);
        crate::sim::with(|e| e.unblock_entry(ctx));
        r
    }

    /// BLOCK → TRACK → kick → REMOVE → WBINVD → clear for one private 4K page.
    pub(crate) fn remove_page(&self, ctx: &mut Ctx, st: &mut TdState, gfn: u64, level: u8) {
        let (s, ()) = self.no_vcpus(ctx, st, |m, c, st| (m.range_block(c, st, gfn, level), ()));
        if s != Status::Success {
            if self.opts.v6_16() && !st.finalized && s == Status::EptEntryStateIncorrect {
                // Premapped (counted, never PAGE.ADDed): nothing to remove in the module.
                st.nr_premapped -= 1;
                return;
            }
            ctx.bug(format!(
                "TDH.MEM.RANGE.BLOCK failed for gfn {gfn:#x}: {}",
                s.name()
            ));
            return;
        }
        if self.opts.track == Track::Batched {
            st.pending_remove.push((gfn, level));
            return;
        }
        self.track_and_kick(ctx, st);
        let (s, pfn) = self.no_vcpus(ctx, st, |m, c, st| m.page_remove(c, st, gfn, level));
        if s != Status::Success {
            ctx.bug(format!(
                "TDH.MEM.PAGE.REMOVE failed for gfn {gfn:#x}: {}",
                s.name()
            ));
            return;
        }
        self.wbinvd_and_clear_level(ctx, gfn, pfn, level);
    }

    pub(crate) fn track_and_kick(&self, ctx: &mut Ctx, st: &mut TdState) {
        if st.finalized {
            let (s, ()) = self.no_vcpus(ctx, st, |m, c, st| (m.mem_track(c, st), ()));
            if s != Status::Success {
                ctx.bug(format!("TDH.MEM.TRACK failed: {}", s.name()));
                return;
            }
            self.kick_all(ctx, st);
        }
    }

    /// End of a zap with `track=batched`: one TRACK + kick, then REMOVE each blocked page.
    pub fn flush_batched(&self, ctx: &mut Ctx) {
        let mut st = self.st.lock();
        if st.pending_remove.is_empty() {
            return;
        }
        self.track_and_kick(ctx, &mut st);
        let pending = std::mem::take(&mut st.pending_remove);
        for (gfn, level) in pending {
            let (s, pfn) = self.no_vcpus(ctx, &mut st, |m, c, st| m.page_remove(c, st, gfn, level));
            if s != Status::Success {
                ctx.bug(format!(
                    "TDH.MEM.PAGE.REMOVE failed for gfn {gfn:#x}: {}",
                    s.name()
                ));
                return;
            }
            self.wbinvd_and_clear_level(ctx, gfn, pfn, level);
        }
    }

    /// KVM_TDX_FINALIZE_VM.
    pub fn finalize(&self) -> Result<()> {
        let mut st = self.st.lock();
        if st.finalized {
            return Err(bad_arg("finalize", "the TD is already finalized"));
        }
        if st.nr_premapped != 0 {
            return Err(bad_arg(
                "finalize",
                format!(
                    "{} premapped page(s) still lack TDH.MEM.PAGE.ADD (v6.16 nr_premapped)",
                    st.nr_premapped
                ),
            ));
        }
        st.finalized = true;
        self.finalized_flag
            .store(true, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// v6.16 populate: the caller issues PAGE.ADD for a page set_external_spte only counted.
    pub fn populate_page_add(&self, ctx: &mut Ctx, gfn: u64, pfn: u64) -> Status {
        let mut st = self.st.lock();
        let s = self.leaf_install(ctx, &mut st, gfn, pfn, false, 1);
        if s == Status::Success {
            st.nr_premapped -= 1;
        }
        s
    }

    /// `tdx_mmu_release_hkid`.
    pub fn release_hkid(&self, ctx: &mut Ctx) {
        let mut st = self.st.lock();
        if !st.hkid_assigned {
            return;
        }
        for v in 0..self.vcpus {
            self.seamcall(
                ctx,
                C::vp_flush,
                Cost::tdh_vp_flush_ns,
                0,
                0,
                Status::Success,
            );
            let _ = v;
        }
        self.seamcall(
            ctx,
            C::vpflushdone,
            Cost::tdh_mng_vpflushdone_ns,
            0,
            0,
            Status::Success,
        );
        self.seamcall(
            ctx,
            C::cache_wb,
            Cost::tdh_phymem_cache_wb_ns,
            0,
            0,
            Status::Success,
        );
        self.seamcall(
            ctx,
            C::key_freeid,
            Cost::tdh_mng_key_freeid_ns,
            0,
            0,
            Status::Success,
        );
        st.hkid_assigned = false;
    }
}
