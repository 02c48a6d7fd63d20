//! SEV-SNP's Reverse Map Table, per host pfn of guest_memfd memory: assigned (private to the
//! guest), guest-physical address, page size (4K or 2M), validated. RMPUPDATE, PSMASH and the
//! guest's PVALIDATE check their preconditions and fail as the architecture does. `SnpHooks`
//! is the `private` hook design on SNP: the RMP follows every private NPT change.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::cost::Cost;
use crate::external::{ExternalOps, HookRet};
use crate::spte::spte_to_pfn;
use crate::stats::{C, Ctx};
use std::sync::Arc;

const ASSIGNED: u64 = 1 << 0;
const VALIDATED: u64 = 1 << 1;
const SIZE_2M: u64 = 1 << 2;
const GFN_SHIFT: u32 = 12;

/// Architectural failures (RMPUPDATE/PSMASH return codes; PVALIDATE's as the model reports them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RmpStatus {
    Success,
    /// FAIL_INPUT: misaligned or out-of-range operand.
    FailInput,
    /// FAIL_PERMISSION: the page is not in the state the instruction needs.
    FailPermission,
    /// FAIL_OVERLAP: a 2M operation overlaps an assigned 4K entry (or vice versa).
    FailOverlap,
    /// FAIL_SIZEMISMATCH: 4K operation on a page covered by a 2M entry.
    FailSizeMismatch,
    /// PVALIDATE found the page already in the requested state (rFLAGS.CF=1).
    NoUpdate,
}

impl RmpStatus {
    pub fn name(self) -> &'static str {
        match self {
            Self::Success => "SUCCESS",
            Self::FailInput => "FAIL_INPUT",
            Self::FailPermission => "FAIL_PERMISSION",
            Self::FailOverlap => "FAIL_OVERLAP",
            Self::FailSizeMismatch => "FAIL_SIZEMISMATCH",
            Self::NoUpdate => "NO_UPDATE",
        }
    }
}

/// The RMP entries of one guest_memfd memslot (its pages are contiguous host pfns).
#[derive(Debug)]
pub struct Rmp {
    entries: Box<[AtomicU64]>,
    /// One bit per folio: prepared (zeroed and made private by `kvm_arch_gmem_prepare`).
    prepared: Box<[AtomicU64]>,
    pub folio_level: u8,
}

fn zeroed_atomics(n: usize) -> Box<[AtomicU64]> {
    // Zeroed allocation stays untouched (lazily backed) until used: TiB guests cost nothing up
    // front. AtomicU64 has the layout of u64.
    let v: Vec<u64> = vec![0; n];
    let b = v.into_boxed_slice();
    // SAFETY: same size and alignment; every bit pattern is a valid AtomicU64.
    unsafe { Box::from_raw(Box::into_raw(b) as *mut [AtomicU64]) }
}

impl Rmp {
    pub fn new(npages: u64, folio_level: u8) -> Self {
        let folios = npages >> (9 * (folio_level as u32 - 1));
        Self {
            entries: zeroed_atomics(npages as usize),
            prepared: zeroed_atomics(folios.div_ceil(64) as usize),
            folio_level,
        }
    }

    pub fn get(&self, off: u64) -> u64 {
        self.entries[off as usize].load(Ordering::Acquire)
    }

    pub fn assigned(e: u64) -> bool {
        e & ASSIGNED != 0
    }
    pub fn validated(e: u64) -> bool {
        e & VALIDATED != 0
    }
    pub fn is_2m(e: u64) -> bool {
        e & SIZE_2M != 0
    }
    pub fn gfn(e: u64) -> u64 {
        e >> GFN_SHIFT
    }

    /// Level of the RMP entry covering `off` (1 = 4K, 2 = 2M), 1 if unassigned.
    pub fn level(&self, off: u64) -> u8 {
        let e = self.get(off);
        if Self::assigned(e) && Self::is_2m(e) {
            2
        } else {
            1
        }
    }

    fn folio(&self, off: u64) -> (usize, u64) {
        let f = off >> (9 * (self.folio_level as u32 - 1));
        ((f / 64) as usize, 1u64 << (f % 64))
    }
    pub fn prepared(&self, off: u64) -> bool {
        let (w, b) = self.folio(off);
        self.prepared[w].load(Ordering::Acquire) & b != 0
    }
    pub fn set_prepared(&self, off: u64, on: bool) {
        let (w, b) = self.folio(off);
        if on {
            self.prepared[w].fetch_or(b, Ordering::AcqRel);
        } else {
            self.prepared[w].fetch_and(!b, Ordering::AcqRel);
        }
    }

    /// RMPUPDATE: make [off, off + 1 or 512) private to the guest at `gfn`, or shared again.
    pub fn rmpupdate(
        &self,
        ctx: &mut Ctx,
        off: u64,
        gfn: u64,
        private: bool,
        size_2m: bool,
    ) -> RmpStatus {
        ctx.inc(C::rmpupdate);
        ctx.charge(Cost::rmpupdate_ns, 1);
        let st = self.rmpupdate_inner(off, gfn, private, size_2m);
        ctx.trace(
            "rmpupdate",
            gfn,
            if size_2m { 2 } else { 1 },
            private as u64,
        );
        if st != RmpStatus::Success {
            ctx.inc(C::rmp_failures);
        }
        st
    }

    fn rmpupdate_inner(&self, off: u64, gfn: u64, private: bool, size_2m: bool) -> RmpStatus {
        let n = if size_2m { 512 } else { 1 };
        if (size_2m && (!off.is_multiple_of(512) || !gfn.is_multiple_of(512)))
            || off + n > self.entries.len() as u64
        {
            return RmpStatus::FailInput;
        }
        let head = off & !511;
        let head_e = self
            .entries
            .get(head as usize)
            .map(|e| e.load(Ordering::Acquire))
            .unwrap_or(0);
        if !size_2m && Self::assigned(head_e) && Self::is_2m(head_e) {
            return RmpStatus::FailSizeMismatch;
        }
        if private && size_2m && (0..512).any(|i| Self::assigned(self.get(off + i))) {
            return RmpStatus::FailOverlap;
        }
        if private && !size_2m && Self::assigned(self.get(off)) {
            return RmpStatus::FailPermission;
        }
        for i in 0..n {
            let v = if private {
                ASSIGNED | if size_2m { SIZE_2M } else { 0 } | (gfn + i) << GFN_SHIFT
            } else {
                0
            };
            self.entries[(off + i) as usize].store(v, Ordering::Release);
        }
        RmpStatus::Success
    }

    /// PSMASH: split an assigned 2M entry into 512 4K entries with the same attributes.
    pub fn psmash(&self, ctx: &mut Ctx, off: u64) -> RmpStatus {
        ctx.inc(C::psmash);
        ctx.charge(Cost::psmash_ns, 1);
        let head = off & !511;
        let e = self.get(head);
        ctx.trace("psmash", Self::gfn(e), 2, 0);
        if !(Self::assigned(e) && Self::is_2m(e)) {
            ctx.inc(C::rmp_failures);
            return RmpStatus::FailPermission;
        }
        for i in 0..512 {
            let v = self.get(head + i) & !SIZE_2M;
            self.entries[(head + i) as usize].store(v, Ordering::Release);
        }
        RmpStatus::Success
    }

    /// The guest's PVALIDATE of the page at `off` (4K or 2M).
    pub fn pvalidate(
        &self,
        ctx: &mut Ctx,
        off: u64,
        gfn: u64,
        size_2m: bool,
        validate: bool,
    ) -> RmpStatus {
        ctx.inc(C::pvalidate);
        ctx.charge(Cost::pvalidate_ns, 1);
        ctx.trace(
            "pvalidate",
            gfn,
            if size_2m { 2 } else { 1 },
            validate as u64,
        );
        let e = self.get(off);
        let st = if !Self::assigned(e) || Self::gfn(e) != gfn {
            RmpStatus::FailPermission
        } else if Self::is_2m(e) != size_2m {
            RmpStatus::FailSizeMismatch
        } else if Self::validated(e) == validate {
            RmpStatus::NoUpdate
        } else {
            let n = if size_2m { 512 } else { 1 };
            for i in 0..n {
                let x = &self.entries[(off + i) as usize];
                let v = x.load(Ordering::Acquire);
                x.store(
                    if validate {
                        v | VALIDATED
                    } else {
                        v & !VALIDATED
                    },
                    Ordering::Release,
                );
            }
            RmpStatus::Success
        };
        if st != RmpStatus::Success {
            ctx.inc(C::pvalidate_errors);
        }
        st
    }

    /// `sev_gmem_prepare`: a 2M RMP entry when the folio is 2M and its whole 2M range is
    /// shared, else 4K.
    pub fn gmem_prepare(&self, ctx: &mut Ctx, off: u64, gfn: u64) -> RmpStatus {
        let e = self.get(off);
        if Self::assigned(e) {
            return RmpStatus::Success;
        }
        let head = off & !511;
        // A 2M entry needs a whole 2M folio inside the slot whose pfn and gpa are both 2M
        // aligned (the slot's gfn must line up with its guest_memfd offset).
        let whole_2m_shared = self.folio_level >= 2
            && (gfn & 511) == (off & 511)
            && head + 512 <= self.entries.len() as u64
            && (0..512).all(|i| !Self::assigned(self.get(head + i)));
        if whole_2m_shared {
            self.rmpupdate(ctx, head, gfn & !511, true, true)
        } else {
            self.rmpupdate(ctx, off, gfn, true, false)
        }
    }

    /// `sev_gmem_invalidate` for [off, off + n): 2M entries fully inside go back at once,
    /// partially covered ones are PSMASHed first; then RMPUPDATE to shared.
    pub fn gmem_invalidate(&self, ctx: &mut Ctx, off: u64, n: u64) {
        let end = off + n;
        let mut p = off;
        while p < end {
            let e = self.get(p);
            if !Self::assigned(e) {
                p += 1;
                continue;
            }
            if Self::is_2m(e) {
                if p.is_multiple_of(512) && p + 512 <= end {
                    self.rmpupdate(ctx, p, Self::gfn(e), false, true);
                    p += 512;
                    continue;
                }
                self.psmash(ctx, p);
            }
            self.rmpupdate(ctx, p, Self::gfn(self.get(p)), false, false);
            p += 1;
        }
    }
}

/// Host pfn → RMP of the guest_memfd slot holding it (what the hardware indexes by pfn).
#[derive(Default)]
pub struct RmpTable {
    slots: parking_lot::RwLock<Vec<(u64, u64, Arc<Rmp>)>>,
}

impl RmpTable {
    pub fn insert(&self, base_pfn: u64, npages: u64, rmp: Arc<Rmp>) {
        self.slots.write().push((base_pfn, npages, rmp));
    }
    pub fn remove(&self, base_pfn: u64) {
        self.slots.write().retain(|(b, _, _)| *b != base_pfn);
    }
    pub fn find(&self, pfn: u64) -> Option<(Arc<Rmp>, u64)> {
        self.slots
            .read()
            .iter()
            .find(|(b, n, _)| pfn >= *b && pfn < b + n)
            .map(|(b, _, r)| (r.clone(), pfn - b))
    }
}

/// The `private` design on SNP: RMPUPDATE on every private NPT install and removal.
pub struct SnpHooks {
    pub table: Arc<RmpTable>,
}

impl ExternalOps for SnpHooks {
    fn link_external_spt(&self, _ctx: &mut Ctx, _gfn: u64, _level: u8, _child: u32) -> HookRet {
        HookRet::Ok
    }
    fn set_external_spte(&self, ctx: &mut Ctx, gfn: u64, level: u8, new_spte: u64) -> HookRet {
        ctx.inc(C::set_external_spte);
        ctx.trace("set_external_spte", gfn, level, new_spte);
        let Some((rmp, off)) = self.table.find(spte_to_pfn(new_spte)) else {
            ctx.bug(format!(
                "private NPT leaf for gfn {gfn:#x} is not guest_memfd memory"
            ));
            return HookRet::Io;
        };
        match rmp.rmpupdate(ctx, off, gfn, true, level == 2) {
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
        ctx.inc(C::remove_external_spte);
        ctx.trace("remove_external_spte", gfn, level, old_spte);
        if let Some((rmp, off)) = self.table.find(spte_to_pfn(old_spte))
            && rmp.rmpupdate(ctx, off, gfn, false, level == 2) != RmpStatus::Success
        {
            ctx.bug(format!("RMPUPDATE to shared failed for gfn {gfn:#x}"));
        }
    }
    fn free_external_spt(&self, _ctx: &mut Ctx, _gfn: u64, _level: u8, _table: u32) -> HookRet {
        HookRet::Ok
    }
}
