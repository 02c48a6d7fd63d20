//! KVM-named counters. Each operation (or each vCPU thread of a batch) counts into its own
//! `Ctx`, which is merged into the VM's totals once at the end: no shared cache line per fault.

use parking_lot::Mutex;

macro_rules! counters {
    ($($name:ident),* $(,)?) => {
        #[allow(non_camel_case_types)]
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[repr(usize)]
        pub enum C { $($name),* }
        pub const COUNTER_NAMES: &[&str] = &[$(stringify!($name)),*];
    };
}

counters!(
    pf_taken,
    pf_fixed,
    pf_spurious,
    pf_emulate,
    pf_retry,
    pf_write_protected,
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
);

pub const NCOUNTERS: usize = COUNTER_NAMES.len();

/// Per-operation / per-thread accumulator.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub c: [i64; NCOUNTERS],
    pub modeled_ns: f64,
    /// Set when a KVM_BUG_ON fired during this operation.
    pub bug: Option<String>,
}

impl Default for Ctx {
    fn default() -> Self {
        Self {
            c: [0; NCOUNTERS],
            modeled_ns: 0.0,
            bug: None,
        }
    }
}

impl Ctx {
    #[inline(always)]
    pub fn inc(&mut self, c: C) {
        self.c[c as usize] += 1;
    }
    #[inline(always)]
    pub fn add(&mut self, c: C, n: i64) {
        self.c[c as usize] += n;
    }
    #[inline(always)]
    pub fn cost(&mut self, ns: f64) {
        self.modeled_ns += ns;
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
}

impl Totals {
    pub fn merge(&self, ctx: &Ctx) {
        let mut t = self.inner.lock();
        for (a, b) in t.c.iter_mut().zip(ctx.c.iter()) {
            *a += *b;
        }
        t.modeled_ns += ctx.modeled_ns;
    }
    pub fn snapshot(&self) -> Ctx {
        self.inner.lock().clone()
    }
    pub fn get(&self, c: C) -> i64 {
        self.inner.lock().c[c as usize]
    }
}
