//! KVM-named counters. Each operation (or each vCPU thread of a batch) counts into its own
//! `Ctx`, which is merged into the VM's totals once at the end: no shared cache line per fault.

use crate::sync::Mutex;

use crate::cost::{Cost, CostModel, NCOSTS, NWAITS, Wait, ledger_ns};
pub use crate::trace::Event;

macro_rules! counters {
    ($($name:ident $(= $display:literal)?),* $(,)?) => {
        #[allow(non_camel_case_types)]
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[repr(usize)]
        pub enum C { $($name),* }
        /// Names as users see them: KVM's counter names, hook names, SEAMCALL leaf names.
        pub const COUNTER_NAMES: &[&str] = &[$(counters!(@name $name $($display)?)),*];
    };
    (@name $name:ident $display:literal) => { $display };
    (@name $name:ident) => { stringify!($name) };
}

counters!(
    pf_taken,
    pf_fixed,
    pf_spurious,
    pf_emulate,
    pf_retry,
    pf_write_protected,
    pf_fast,
    pf_memory_fault,
    pf_mmio_spte_created,
    pages_4k,
    pages_2m,
    pages_1g,
    tdp_mmu_pages,
    huge_page_splits,
    remote_tlb_flush,
    remote_tlb_flush_requests,
    roots_allocated,
    roots_freed,
    host_pages_allocated,
    // External hooks (TDX mirror page tables).
    link_external_spt,
    set_external_spte,
    remove_external_spte,
    free_external_spt,
    split_external_spt,
    external_spt_leaked,
    // TDX module SEAMCALLs and guest TDCALLs.
    sept_add = "TDH.MEM.SEPT.ADD",
    page_aug = "TDH.MEM.PAGE.AUG",
    page_add = "TDH.MEM.PAGE.ADD",
    mr_extend = "TDH.MR.EXTEND",
    range_block = "TDH.MEM.RANGE.BLOCK",
    mem_track = "TDH.MEM.TRACK",
    page_remove = "TDH.MEM.PAGE.REMOVE",
    page_demote = "TDH.MEM.PAGE.DEMOTE",
    page_wbinvd = "TDH.PHYMEM.PAGE.WBINVD",
    page_reclaim = "TDH.PHYMEM.PAGE.RECLAIM",
    sept_remove = "TDH.MEM.SEPT.REMOVE",
    vp_flush = "TDH.VP.FLUSH",
    vpflushdone = "TDH.MNG.VPFLUSHDONE",
    cache_wb = "TDH.PHYMEM.CACHE.WB",
    key_freeid = "TDH.MNG.KEY.FREEID",
    page_accept = "TDG.MEM.PAGE.ACCEPT",
    seamcall_busy,
    vcpu_kicks,
    page_clear,
    tdx_local_retries,
    sept_tables,
    // SEV-SNP RMP and guest validation.
    rmpupdate,
    psmash,
    pvalidate,
    pvalidate_errors,
    rmp_failures,
    rmp_faults,
    gmem_prepare,
    gmem_invalidate,
    conversions,
    gmem_splits,
    // Dirty logging, aging, eager split and huge-page recovery.
    sptes_write_protected,
    dirty_pages_logged,
    sptes_aged,
    huge_pages_recovered,
    // NX huge page mitigation: tables on the recovery list, and those the recovery zapped.
    nx_lpage_splits,
    nx_huge_pages_recovered,
    // PML: 4K pages the CPU logged, and the exits when a vCPU's 512-entry log filled.
    pml_logged,
    pml_full_exits,
);

pub const NCOUNTERS: usize = COUNTER_NAMES.len();

/// Per-operation / per-thread accumulator.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub c: [i64; NCOUNTERS],
    /// The cost ledger: units charged per `CostModel` field.
    pub units: [i64; NCOSTS],
    /// Modeled time added by the virtual-time engine's shared resources, per kind.
    pub waits: [f64; NWAITS],
    /// The VM's cost values, so a charge also advances the running clock below.
    rates: [f64; NCOSTS],
    /// Running modeled clock of this context (per-fault and per-vCPU figures); the VM's total
    /// is computed from the ledger instead, so it equals its breakdown exactly.
    pub modeled_ns: f64,
    /// Set when a KVM_BUG_ON fired during this operation.
    pub bug: Option<String>,
    /// Events, only when the VM traces (None costs one branch per event).
    pub events: Option<Vec<Event>>,
    /// The operation acts for private memory (a private fault or a PRIVATE-filtered zap).
    pub op_private: bool,
}

impl Default for Ctx {
    fn default() -> Self {
        Self {
            c: [0; NCOUNTERS],
            units: [0; NCOSTS],
            waits: [0.0; NWAITS],
            rates: CostModel::default().rates(),
            modeled_ns: 0.0,
            bug: None,
            events: None,
            op_private: false,
        }
    }
}

impl Ctx {
    /// A context charging `costs`, recording events if `trace`.
    pub fn new(costs: &CostModel, trace: bool) -> Self {
        Self {
            events: trace.then(Vec::new),
            rates: costs.rates(),
            ..Self::default()
        }
    }

    /// Charge `n` units of one cost field.
    #[inline(always)]
    pub fn charge(&mut self, f: Cost, n: u64) {
        self.units[f as usize] += n as i64;
        self.modeled_ns += self.rates[f as usize] * n as f64;
    }

    /// Add `ns` of modeled time of kind `w` (virtual-time runs only).
    #[inline(always)]
    pub fn wait(&mut self, w: Wait, ns: f64) {
        if ns > 0.0 {
            self.waits[w as usize] += ns;
            self.modeled_ns += ns;
        }
    }

    /// The value of one cost field.
    #[inline(always)]
    pub fn rate(&self, f: Cost) -> f64 {
        self.rates[f as usize]
    }

    /// Forget what was counted (after it was merged into the totals); the running clock and
    /// the cost values stay.
    pub fn clear_counts(&mut self) {
        self.c = [0; NCOUNTERS];
        self.units = [0; NCOSTS];
        self.waits = [0.0; NWAITS];
        if let Some(ev) = self.events.as_mut() {
            ev.clear();
        }
    }

    /// Modeled time of this context: its ledger (exact sum over fields), then its waits.
    pub fn ledger_ns(&self) -> f64 {
        let mut t = ledger_ns(&self.units, &self.rates);
        for w in self.waits {
            t += w;
        }
        t
    }
    #[inline(always)]
    pub fn trace(&mut self, op: &'static str, gfn: u64, level: u8, detail: u64) {
        if let Some(ev) = self.events.as_mut() {
            ev.push(Event {
                op,
                gfn,
                level,
                detail,
            });
        }
    }

    #[inline(always)]
    pub fn inc(&mut self, c: C) {
        self.c[c as usize] += 1;
    }
    #[inline(always)]
    pub fn add(&mut self, c: C, n: i64) {
        self.c[c as usize] += n;
    }
    pub fn bug(&mut self, msg: impl Into<String>) {
        if self.bug.is_none() {
            self.bug = Some(msg.into());
        }
    }
    #[inline(always)]
    pub fn page_stats(&mut self, level: u8, delta: i64) {
        let c = match level {
            1 => C::pages_4k,
            2 => C::pages_2m,
            _ => C::pages_1g,
        };
        self.add(c, delta);
    }
}

/// The VM's merged totals.
#[derive(Debug, Default)]
pub struct Totals {
    inner: Mutex<Ctx>,
    events: Mutex<Vec<Event>>,
}

impl Totals {
    pub fn merge(&self, ctx: &Ctx) {
        let mut t = self.inner.lock();
        for (a, b) in t.c.iter_mut().zip(ctx.c.iter()) {
            *a += *b;
        }
        for (a, b) in t.units.iter_mut().zip(ctx.units.iter()) {
            *a += *b;
        }
        for (a, b) in t.waits.iter_mut().zip(ctx.waits.iter()) {
            *a += *b;
        }
        t.modeled_ns += ctx.modeled_ns;
        drop(t);
        if let Some(ev) = &ctx.events {
            self.events.lock().extend(ev.iter().cloned());
        }
    }
    pub fn events(&self) -> Vec<Event> {
        self.events.lock().clone()
    }
    pub fn snapshot(&self) -> Ctx {
        let mut c = self.inner.lock().clone();
        c.events = None;
        c
    }

    /// Adopt the VM's cost values (the running clock of the merged totals uses them).
    pub fn set_rates(&self, costs: &crate::cost::CostModel) {
        *self.inner.lock() = Ctx::new(costs, false);
    }
    pub fn get(&self, c: C) -> i64 {
        self.inner.lock().c[c as usize]
    }
}
