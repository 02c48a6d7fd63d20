//! Page-table memory: 4 KiB tables of 512 `AtomicU64`, addressed by host pfn.
//!
//! The whole address range is reserved up front with an anonymous `MAP_NORESERVE` mapping, so
//! tables never move (walkers hold plain pointers, numpy gets a zero-copy view) and a TiB guest's
//! tables fit without reallocation. The kernel backs pages only when first written. A parallel
//! reservation holds per-table metadata (the `kvm_mmu_page` fields the model needs).

use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use crate::sync::Mutex;

use crate::error::{Error, Result};
use crate::spte::{ENTRIES_PER_TABLE, SHADOW_NONPRESENT_VALUE};

/// Host pfn of table 0 (host physical address 4 GiB).
pub const TABLE_BASE_PFN: u64 = 0x10_0000;
pub const TABLE_BYTES: usize = 4096;
pub const NO_TABLE: u32 = u32::MAX;

pub const SP_MIRROR: u8 = 1 << 0;
pub const SP_NX_DISALLOWED: u8 = 1 << 1;
pub const SP_ROOT: u8 = 1 << 2;
/// Table belongs to the TDX module's S-EPT model, not to KVM.
pub const SP_EXTERNAL: u8 = 1 << 3;
/// On the list of possible NX huge pages (`track_possible_nx_huge_page`).
pub const SP_NX_TRACKED: u8 = 1 << 4;

/// What KVM keeps in `struct kvm_mmu_page` for a table, reduced to what the model uses.
#[repr(C)]
pub struct SpMeta {
    pub gfn: AtomicU64,
    /// Level of the entries in this table (1 = 4K leaves).
    pub level: AtomicU8,
    pub flags: AtomicU8,
    /// Index of the external (S-EPT) table that mirrors this one, or NO_TABLE.
    pub external: AtomicU32,
}

struct Region {
    ptr: *mut u8,
    bytes: usize,
}

impl Region {
    fn reserve(bytes: usize) -> Result<Self> {
        // SAFETY: anonymous private mapping with no fixed address; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::OutOfMemory(format!(
                "cannot reserve {bytes} bytes of address space for page tables"
            )));
        }
        Ok(Self {
            ptr: ptr.cast(),
            bytes,
        })
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: ptr/bytes came from a successful mmap and are unmapped once.
        unsafe {
            libc::munmap(self.ptr.cast(), self.bytes);
        }
    }
}

/// `n` zeroed atomics, allocated fallibly: a failed allocation is `OutOfMemory` naming `what`,
/// never an abort. Zeroed pages stay untouched (lazily backed) until written, so per-page
/// metadata of a TiB guest costs what is used.
pub fn try_zeroed_atomics(n: usize, what: &str) -> Result<Box<[AtomicU64]>> {
    if n == 0 {
        return Ok(Box::new([]));
    }
    let oom = || Error::OutOfMemory(format!("cannot allocate {what} ({n} x 8 bytes)"));
    let layout = std::alloc::Layout::array::<AtomicU64>(n).map_err(|_| oom())?;
    // SAFETY: layout has non-zero size; the result is checked for null.
    let p = unsafe { std::alloc::alloc_zeroed(layout) } as *mut AtomicU64;
    if p.is_null() {
        return Err(oom());
    }
    // SAFETY: p is a fresh, zeroed allocation of n AtomicU64 (all-zero is a valid value) with
    // the global allocator's layout for [AtomicU64; n], which Box<[AtomicU64]> frees the same way.
    Ok(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(p, n)) })
}

pub struct Arena {
    tables: Region,
    meta: Region,
    capacity: usize,
    /// Never-used tables start here (bump allocation).
    next: AtomicUsize,
    /// Tables that may be reused now; popped LIFO.
    reusable: Mutex<Vec<u32>>,
    /// Tables freed during the current operation; reusable after the grace period.
    deferred: Mutex<Vec<u32>>,
    live: AtomicUsize,
    peak: AtomicUsize,
    /// Cheap "is a grace period needed" check for the fault path.
    pending: std::sync::atomic::AtomicBool,
}

// SAFETY: the regions are only accessed through atomics (tables and metadata) or under the
// mutexes; the raw pointers are never reallocated while the arena lives.
unsafe impl Send for Arena {}
// SAFETY: see above.
unsafe impl Sync for Arena {}

impl Arena {
    pub fn new(capacity: usize) -> Result<Self> {
        let capacity = capacity.max(16);
        let tables = Region::reserve(capacity * TABLE_BYTES)?;
        let meta = Region::reserve(capacity * std::mem::size_of::<SpMeta>())?;
        Ok(Self {
            tables,
            meta,
            capacity,
            next: AtomicUsize::new(0),
            reusable: Mutex::new(Vec::with_capacity(1024)),
            deferred: Mutex::new(Vec::with_capacity(1024)),
            live: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            pending: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Tables ever handed out (the numpy view covers this prefix).
    pub fn high_water(&self) -> usize {
        self.next.load(Ordering::Acquire).min(self.capacity)
    }

    pub fn live(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }

    #[inline(always)]
    pub fn pfn(idx: u32) -> u64 {
        TABLE_BASE_PFN + idx as u64
    }

    /// Table index of a host pfn, if it lies in this arena's handed-out range.
    #[inline(always)]
    pub fn idx_of_pfn(&self, pfn: u64) -> Option<u32> {
        let i = pfn.checked_sub(TABLE_BASE_PFN)?;
        (i < self.high_water() as u64).then_some(i as u32)
    }

    #[inline(always)]
    pub fn entry(&self, idx: u32, i: usize) -> &AtomicU64 {
        debug_assert!((idx as usize) < self.capacity && i < ENTRIES_PER_TABLE);
        // SAFETY: idx < capacity (tables are only named by indices the arena handed out) and
        // i < 512, so the pointer is inside the reservation; AtomicU64 has u64's layout.
        unsafe { &*(self.tables.ptr as *const AtomicU64).add(idx as usize * ENTRIES_PER_TABLE + i) }
    }

    #[inline(always)]
    pub fn meta(&self, idx: u32) -> &SpMeta {
        debug_assert!((idx as usize) < self.capacity);
        // SAFETY: as for `entry`; zero-filled memory is a valid SpMeta (all atomics).
        unsafe { &*(self.meta.ptr as *const SpMeta).add(idx as usize) }
    }

    /// Base pointer for the read-only numpy view.
    pub fn base_ptr(&self) -> *const u64 {
        self.tables.ptr as *const u64
    }

    /// Allocate a table with every entry = SHADOW_NONPRESENT_VALUE (KVM's cache `init_value`).
    pub fn alloc(&self, level: u8, gfn: u64, flags: u8) -> Result<u32> {
        let idx = match self.reusable.lock().pop() {
            Some(i) => i,
            None => {
                let i = self.next.fetch_add(1, Ordering::AcqRel);
                if i >= self.capacity {
                    self.next.fetch_sub(1, Ordering::AcqRel);
                    return Err(Error::OutOfMemory(format!(
                        "page-table arena exhausted ({} tables of 4 KiB)",
                        self.capacity
                    )));
                }
                i as u32
            }
        };
        for i in 0..ENTRIES_PER_TABLE {
            self.entry(idx, i)
                .store(SHADOW_NONPRESENT_VALUE, Ordering::Relaxed);
        }
        let m = self.meta(idx);
        m.gfn.store(gfn, Ordering::Relaxed);
        m.level.store(level, Ordering::Relaxed);
        m.flags.store(flags, Ordering::Relaxed);
        m.external.store(NO_TABLE, Ordering::Relaxed);
        let live = self.live.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak.fetch_max(live, Ordering::Relaxed);
        Ok(idx)
    }

    /// Return a table no walker can have seen (it was never published).
    pub fn free_now(&self, idx: u32) {
        self.live.fetch_sub(1, Ordering::Relaxed);
        self.reusable.lock().push(idx);
    }

    /// Free a table that walkers may still hold; reusable after the grace period.
    pub fn free_deferred(&self, idx: u32) {
        self.live.fetch_sub(1, Ordering::Relaxed);
        self.deferred.lock().push(idx);
        self.pending.store(true, Ordering::Release);
    }

    #[inline(always)]
    pub fn has_deferred(&self) -> bool {
        self.pending.load(Ordering::Acquire)
    }

    /// End of a grace period: deferred tables become reusable, in the order they were freed.
    pub fn quiesce(&self) {
        let mut d = self.deferred.lock();
        self.pending.store(false, Ordering::Release);
        if d.is_empty() {
            return;
        }
        self.reusable.lock().extend(d.drain(..));
    }

    pub fn free_list_snapshot(&self) -> (Vec<u32>, Vec<u32>) {
        (self.reusable.lock().clone(), self.deferred.lock().clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_tables_are_nonpresent_with_sve() {
        let a = Arena::new(64).unwrap();
        let t = a.alloc(1, 0, 0).unwrap();
        for i in 0..512 {
            assert_eq!(
                a.entry(t, i).load(Ordering::Relaxed),
                SHADOW_NONPRESENT_VALUE
            );
        }
        // A reused table is re-initialised too.
        a.entry(t, 7).store(42, Ordering::Relaxed);
        a.free_now(t);
        let t2 = a.alloc(1, 0, 0).unwrap();
        assert_eq!(t, t2);
        assert_eq!(
            a.entry(t2, 7).load(Ordering::Relaxed),
            SHADOW_NONPRESENT_VALUE
        );
    }

    #[test]
    fn grace_period_and_lifo_order() {
        let a = Arena::new(64).unwrap();
        let t0 = a.alloc(1, 0, 0).unwrap();
        let t1 = a.alloc(1, 0, 0).unwrap();
        a.free_deferred(t0);
        a.free_deferred(t1);
        // Not reusable before the grace period ends.
        let t2 = a.alloc(1, 0, 0).unwrap();
        assert_eq!(t2, 2);
        a.quiesce();
        assert_eq!(a.alloc(1, 0, 0).unwrap(), t1);
        assert_eq!(a.alloc(1, 0, 0).unwrap(), t0);
        assert_eq!(a.live(), 3);
    }

    #[test]
    fn exhaustion_is_an_error() {
        let a = Arena::new(16).unwrap();
        for _ in 0..16 {
            a.alloc(1, 0, 0).unwrap();
        }
        assert!(matches!(a.alloc(1, 0, 0), Err(Error::OutOfMemory(_))));
    }
}
