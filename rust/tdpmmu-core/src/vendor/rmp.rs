//! SEV-SNP's Reverse Map Table, as the hardware keeps it: one entry per host page, indexed by
//! pfn: assigned (private to the guest), guest-physical address, page size (4K or 2M),
//! validated. RMPUPDATE, PSMASH and the guest's PVALIDATE check their preconditions and fail as
//! the architecture does. Only guest_memfd ranges bound to the VM have entries here.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::sync::Mutex;

use crate::arena::try_zeroed_atomics;
use crate::cost::Cost;
use crate::error::{Error, Result};
use crate::memslot::{DATA_BASE_PFN, DATA_PFN_ALIGN};
use crate::stats::{C, Ctx};

const ASSIGNED: u64 = 1 << 0;
const VALIDATED: u64 = 1 << 1;
const SIZE_2M: u64 = 1 << 2;
const GFN_SHIFT: u32 = 12;

/// Pages per directory chunk: guest_memfd ranges start on this alignment (memslot.rs).
const CHUNK: u64 = DATA_PFN_ALIGN;
/// Chunks the directory can name (1 GiB each): 4 PiB of guest_memfd over a VM's life.
const DIR_LEN: usize = 1 << 22;

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

pub fn assigned(e: u64) -> bool {
    e & ASSIGNED != 0
}
pub fn validated(e: u64) -> bool {
    e & VALIDATED != 0
}
pub fn is_2m(e: u64) -> bool {
    e & SIZE_2M != 0
}
pub fn entry_gfn(e: u64) -> u64 {
    e >> GFN_SHIFT
}

struct Chunk {
    entries: Box<[AtomicU64]>,
    /// Entries of this chunk that belong to a bound range (ranges start chunk-aligned).
    len: AtomicU64,
}

/// Give the pages behind `entries` back to the kernel: they read as zero afterwards, and a huge
/// range that was never touched is not touched now (zeroing it by hand would commit it).
fn release_pages(entries: &[AtomicU64]) {
    let bytes = std::mem::size_of_val(entries);
    // SAFETY: the range is one live allocation we own; MADV_DONTNEED on private anonymous
    // memory only replaces its contents with zeros, which is a valid value of every entry.
    let r = unsafe {
        libc::madvise(
            entries.as_ptr() as *mut libc::c_void,
            bytes,
            libc::MADV_DONTNEED,
        )
    };
    if r != 0 {
        // Not page-aligned (a small allocation from the heap): zero it by hand.
        for e in entries {
            e.store(0, Ordering::Relaxed);
        }
    }
}

/// The RMP of the guest_memfd pages bound to one VM.
pub struct Rmp {
    /// Chunk pointers by (pfn - DATA_BASE_PFN) / CHUNK; lazily backed, null = not bound.
    dir: Box<[AtomicU64]>,
    /// Unbound chunks, zeroed, kept for the next bind.
    spare: Mutex<Vec<*mut Chunk>>,
    /// Every chunk ever allocated (freed when the RMP is dropped).
    owned: Mutex<Vec<*mut Chunk>>,
}

// SAFETY: chunk pointers come from Box::into_raw, are only freed in Drop, and everything they
// point to is atomics; the spare list is behind a mutex.
unsafe impl Send for Rmp {}
// SAFETY: see above.
unsafe impl Sync for Rmp {}

impl Rmp {
    pub fn new() -> Result<Self> {
        Ok(Self {
            dir: try_zeroed_atomics(DIR_LEN, "the RMP directory")?,
            spare: Mutex::new(Vec::new()),
            owned: Mutex::new(Vec::new()),
        })
    }

    /// Bytes of RMP entries binding `npages` allocates (whole chunks).
    pub fn bytes_for(npages: u64) -> u64 {
        npages.div_ceil(CHUNK) * CHUNK * 8
    }

    fn dir_index(pfn: u64) -> Option<usize> {
        let i = (pfn.checked_sub(DATA_BASE_PFN)? / CHUNK) as usize;
        (i < DIR_LEN).then_some(i)
    }

    /// The entry of `pfn`, if it is in a bound range.
    #[inline]
    fn entry(&self, pfn: u64) -> Option<&AtomicU64> {
        let i = Self::dir_index(pfn)?;
        let p = self.dir[i].load(Ordering::Acquire) as *const Chunk;
        if p.is_null() {
            return None;
        }
        // SAFETY: non-null directory values are live chunks (freed only in Drop).
        let c = unsafe { &*p };
        let off = (pfn - DATA_BASE_PFN) % CHUNK;
        (off < c.len.load(Ordering::Acquire)).then(|| &c.entries[off as usize])
    }

    /// The entry value of `pfn` (0 = not assigned, also for pages outside bound ranges).
    #[inline]
    pub fn get(&self, pfn: u64) -> u64 {
        self.entry(pfn).map_or(0, |e| e.load(Ordering::Acquire))
    }

    pub fn is_bound(&self, pfn: u64) -> bool {
        self.entry(pfn).is_some()
    }

    /// Level of the RMP entry covering `pfn` (1 = 4K, 2 = 2M), 1 if unassigned.
    #[inline]
    pub fn level(&self, pfn: u64) -> u8 {
        let e = self.get(pfn);
        if assigned(e) && is_2m(e) { 2 } else { 1 }
    }

    /// Give [pfn, pfn + npages) entries (all shared). `pfn` is CHUNK-aligned.
    pub fn bind(&self, pfn: u64, npages: u64) -> Result<()> {
        debug_assert!(pfn.is_multiple_of(CHUNK));
        let chunks = npages.div_ceil(CHUNK);
        let first = Self::dir_index(pfn)
            .filter(|i| i + chunks as usize <= DIR_LEN)
            .ok_or_else(|| Error::OutOfMemory("the RMP directory is full".into()))?;
        for k in 0..chunks {
            if let Err(e) = self.bind_chunk(first + k as usize, (npages - k * CHUNK).min(CHUNK)) {
                // Leave nothing half bound.
                self.unbind(pfn, k * CHUNK);
                return Err(e);
            }
        }
        Ok(())
    }

    fn bind_chunk(&self, index: usize, len: u64) -> Result<()> {
        let spare = self.spare.lock().pop();
        let c = match spare {
            Some(c) => c,
            None => {
                let c = Box::into_raw(Box::new(Chunk {
                    entries: try_zeroed_atomics(CHUNK as usize, "RMP entries")?,
                    len: AtomicU64::new(0),
                }));
                self.owned.lock().push(c);
                c
            }
        };
        // SAFETY: c is a live chunk we own (fresh or from the spare list).
        unsafe { &*c }.len.store(len, Ordering::Release);
        self.dir[index].store(c as u64, Ordering::Release);
        Ok(())
    }

    /// Drop the entries of [pfn, pfn + npages); the chunks' pages go back to the kernel and the
    /// chunks are kept for reuse (never freed while the RMP lives, so a reader racing this sees
    /// zeroed entries, never freed memory; the VM unbinds under `mmu_lock` held for write).
    pub fn unbind(&self, pfn: u64, npages: u64) {
        let Some(first) = Self::dir_index(pfn) else {
            return;
        };
        for k in 0..npages.div_ceil(CHUNK) as usize {
            let p = self.dir[first + k].swap(0, Ordering::AcqRel) as *mut Chunk;
            if p.is_null() {
                continue;
            }
            // SAFETY: p was a live chunk in the directory; no longer reachable through it.
            let c = unsafe { &*p };
            c.len.store(0, Ordering::Release);
            release_pages(&c.entries);
            self.spare.lock().push(p);
        }
    }

    /// First assigned page of [pfn, pfn + npages), if any.
    pub fn first_assigned(&self, pfn: u64, npages: u64) -> Option<u64> {
        (pfn..pfn + npages).find(|p| assigned(self.get(*p)))
    }

    /// RMPUPDATE: make [pfn, pfn + 1 or 512) private to the guest at `gfn`, or shared again.
    pub fn rmpupdate(
        &self,
        ctx: &mut Ctx,
        pfn: u64,
        gfn: u64,
        private: bool,
        size_2m: bool,
    ) -> RmpStatus {
        ctx.inc(C::rmpupdate);
        ctx.charge(Cost::rmpupdate_ns, 1);
        let st = self.rmpupdate_inner(pfn, gfn, private, size_2m);
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

    fn rmpupdate_inner(&self, pfn: u64, gfn: u64, private: bool, size_2m: bool) -> RmpStatus {
        let n = if size_2m { 512 } else { 1 };
        if (size_2m && (!pfn.is_multiple_of(512) || !gfn.is_multiple_of(512)))
            || !self.is_bound(pfn)
            || !self.is_bound(pfn + n - 1)
        {
            return RmpStatus::FailInput;
        }
        let head_e = self.get(pfn & !511);
        if !size_2m && assigned(head_e) && is_2m(head_e) {
            return RmpStatus::FailSizeMismatch;
        }
        if private && size_2m && (0..512).any(|i| assigned(self.get(pfn + i))) {
            return RmpStatus::FailOverlap;
        }
        if private && !size_2m && assigned(self.get(pfn)) {
            return RmpStatus::FailPermission;
        }
        for i in 0..n {
            let v = if private {
                ASSIGNED | if size_2m { SIZE_2M } else { 0 } | (gfn + i) << GFN_SHIFT
            } else {
                0
            };
            if let Some(e) = self.entry(pfn + i) {
                e.store(v, Ordering::Release);
            }
        }
        RmpStatus::Success
    }

    /// RMPUPDATE to private of one unassigned 4K page as a single compare-and-swap: the vCPU
    /// whose swap wins issues the RMPUPDATE (counted, charged, traced); a vCPU that finds the
    /// page already assigned returns None and issues nothing. Used by guest_memfd's prepare,
    /// which runs once per folio.
    pub fn assign_4k_once(&self, ctx: &mut Ctx, pfn: u64, gfn: u64) -> Option<RmpStatus> {
        let e = self.entry(pfn)?;
        let new = ASSIGNED | gfn << GFN_SHIFT;
        if e.compare_exchange(0, new, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return None;
        }
        ctx.inc(C::rmpupdate);
        ctx.charge(Cost::rmpupdate_ns, 1);
        ctx.trace("rmpupdate", gfn, 1, 1);
        Some(RmpStatus::Success)
    }

    /// The guest's PVALIDATE of an assigned, not yet validated 4K page, once: the vCPU whose
    /// compare-and-swap sets the validated bit issues the PVALIDATE (counted, charged, traced).
    /// None if another vCPU validated it first.
    pub fn validate_4k_once(&self, ctx: &mut Ctx, pfn: u64, gfn: u64) -> Option<RmpStatus> {
        let e = self.entry(pfn)?;
        let old = e.load(Ordering::Acquire);
        if !assigned(old) || is_2m(old) || validated(old) || entry_gfn(old) != gfn {
            return None;
        }
        if e.compare_exchange(old, old | VALIDATED, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return None;
        }
        ctx.inc(C::pvalidate);
        ctx.charge(Cost::pvalidate_ns, 1);
        ctx.trace("pvalidate", gfn, 1, 1);
        Some(RmpStatus::Success)
    }

    /// PSMASH: split an assigned 2M entry into 512 4K entries with the same attributes.
    pub fn psmash(&self, ctx: &mut Ctx, pfn: u64) -> RmpStatus {
        ctx.inc(C::psmash);
        ctx.charge(Cost::psmash_ns, 1);
        let head = pfn & !511;
        let e = self.get(head);
        ctx.trace("psmash", entry_gfn(e), 2, 0);
        if !(assigned(e) && is_2m(e)) {
            ctx.inc(C::rmp_failures);
            return RmpStatus::FailPermission;
        }
        for i in 0..512 {
            if let Some(x) = self.entry(head + i) {
                x.fetch_and(!SIZE_2M, Ordering::AcqRel);
            }
        }
        RmpStatus::Success
    }

    /// The guest's PVALIDATE of the page at `pfn` (4K or 2M) for `gfn`.
    pub fn pvalidate(
        &self,
        ctx: &mut Ctx,
        pfn: u64,
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
        let e = self.get(pfn);
        let st = if !assigned(e) || entry_gfn(e) != gfn {
            RmpStatus::FailPermission
        } else if is_2m(e) != size_2m {
            RmpStatus::FailSizeMismatch
        } else if validated(e) == validate {
            RmpStatus::NoUpdate
        } else {
            for i in 0..if size_2m { 512 } else { 1 } {
                if let Some(x) = self.entry(pfn + i) {
                    if validate {
                        x.fetch_or(VALIDATED, Ordering::AcqRel);
                    } else {
                        x.fetch_and(!VALIDATED, Ordering::AcqRel);
                    }
                }
            }
            RmpStatus::Success
        };
        if st != RmpStatus::Success {
            ctx.inc(C::pvalidate_errors);
        }
        st
    }
}

impl Drop for Rmp {
    fn drop(&mut self) {
        for p in self.owned.lock().drain(..) {
            // SAFETY: every owned chunk came from Box::into_raw and is freed exactly once here.
            drop(unsafe { Box::from_raw(p) });
        }
    }
}
