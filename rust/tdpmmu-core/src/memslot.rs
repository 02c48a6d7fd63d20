//! Memslots: guest-physical ranges backed by host pages of one size.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::arena::try_zeroed_atomics;
use crate::error::{Result, bad_arg};
use crate::spte::pages_per_level;

/// Host pfn of the first guest data page (host physical address 16 TiB).
pub const DATA_BASE_PFN: u64 = 1 << 32;
/// Data pfns are handed out per slot in 1 GiB steps so every slot is 1G-aligned on the host.
pub const DATA_PFN_ALIGN: u64 = 1 << 18;

#[derive(Debug)]
pub struct Memslot {
    pub id: u32,
    pub gfn: u64,
    pub npages: u64,
    /// Backing page level: 1 = 4K, 2 = 2M, 3 = 1G.
    pub level: u8,
    pub host_pfn: u64,
    pub gmem: bool,
    /// Host pfn of the slot's first guest_memfd page (private memory); 0 without guest_memfd.
    pub gmem_pfn: u64,
    /// One bit per backing page: set once the host page was allocated (first touch).
    touched: Box<[AtomicU64]>,
    /// The same for the guest_memfd pages of a gmem slot.
    gmem_touched: Option<Box<[AtomicU64]>>,
    /// KVM_MEM_LOG_DIRTY_PAGES: the dirty bitmap (one bit per 4 KiB page) while logging.
    pub dirty: Option<DirtyLog>,
    /// KVM_MEM_READONLY: guest writes exit to userspace (emulated as MMIO).
    pub readonly: bool,
    /// Write tracking (`kvm_page_track`): one count per 4 KiB page, allocated on first use.
    pub write_track: Option<Box<[std::sync::atomic::AtomicU32]>>,
    /// Host-side protection of the slot's shared mapping (`mprotect` without PROT_WRITE):
    /// one bit per backing page, set while read-only; allocated on the first mprotect.
    host_ro: Option<Box<[AtomicU64]>>,
}

/// A memslot's dirty log (`KVM_MEM_LOG_DIRTY_PAGES`).
#[derive(Debug)]
pub struct DirtyLog {
    /// One bit per 4 KiB page: set when a writable SPTE was installed (or made writable).
    pub bits: Box<[AtomicU64]>,
    /// KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: GET does not clear or re-protect; CLEAR does.
    pub manual_protect: bool,
    /// KVM_DIRTY_LOG_INITIALLY_SET: the bitmap starts all set and nothing is write-protected
    /// up front (huge pages are split or protected as CLEAR reaches them).
    pub initially_set: bool,
    /// KVM's `eager_page_split`: huge pages are split when protection reaches them.
    pub eager_split: bool,
    /// The host logs with PML (Intel): 4K leaves are armed by clearing D instead of W, and
    /// the CPU logs the first write to each (huge pages are still write-protected).
    pub pml: bool,
}

impl DirtyLog {
    pub fn new(
        npages: u64,
        manual_protect: bool,
        initially_set: bool,
        eager_split: bool,
        pml: bool,
    ) -> Result<Self> {
        let words = npages.div_ceil(64) as usize;
        let bits = try_zeroed_atomics(words, "the dirty bitmap")?;
        if initially_set {
            for (i, w) in bits.iter().enumerate() {
                let left = npages - i as u64 * 64;
                w.store(
                    if left >= 64 { !0 } else { (1 << left) - 1 },
                    Ordering::Relaxed,
                );
            }
        }
        Ok(Self {
            bits,
            manual_protect,
            initially_set,
            eager_split,
            pml,
        })
    }

    /// `mark_page_dirty_in_slot` for the page at `index` within the slot.
    #[inline(always)]
    pub fn mark(&self, index: u64) {
        let w = &self.bits[(index / 64) as usize];
        let bit = 1u64 << (index % 64);
        if w.load(Ordering::Relaxed) & bit == 0 {
            w.fetch_or(bit, Ordering::Relaxed);
        }
    }

    /// Bytes of the bitmap of `npages` pages.
    pub fn bytes(npages: u64) -> u64 {
        npages.div_ceil(64) * 8
    }

    #[inline(always)]
    pub fn is_set(&self, index: u64) -> bool {
        self.bits[(index / 64) as usize].load(Ordering::Relaxed) & (1 << (index % 64)) != 0
    }
}

impl Memslot {
    /// A slot with its first-touch bitmaps (allocated fallibly and lazily backed, so a huge
    /// slot costs what it touches, and a failure is `OutOfMemory`, not an abort).
    pub fn new(
        id: u32,
        gfn: u64,
        npages: u64,
        level: u8,
        host_pfn: u64,
        gmem_pfn: Option<u64>,
    ) -> Result<Self> {
        let backing_pages = npages / pages_per_level(level);
        let words = backing_pages.div_ceil(64) as usize;
        Ok(Self {
            id,
            gfn,
            npages,
            level,
            host_pfn,
            gmem: gmem_pfn.is_some(),
            gmem_pfn: gmem_pfn.unwrap_or(0),
            gmem_touched: match gmem_pfn {
                Some(_) => Some(try_zeroed_atomics(
                    words,
                    "the guest_memfd first-touch bitmap",
                )?),
                None => None,
            },
            touched: try_zeroed_atomics(words, "the memslot first-touch bitmap")?,
            dirty: None,
            readonly: false,
            write_track: None,
            host_ro: None,
        })
    }

    /// Whether a write to `gfn` is tracked (`kvm_gfn_is_write_tracked`).
    #[inline(always)]
    pub fn write_tracked(&self, gfn: u64) -> bool {
        self.write_track
            .as_ref()
            .is_some_and(|t| t[(gfn - self.gfn) as usize].load(Ordering::Relaxed) > 0)
    }

    /// Whether any page of [start, end) ∩ slot is write-tracked (huge pages are disallowed
    /// over a tracked page).
    pub fn any_write_tracked(&self, start: u64, end: u64) -> bool {
        let Some(t) = &self.write_track else {
            return false;
        };
        let (lo, hi) = (start.max(self.gfn), end.min(self.end()));
        (lo..hi).any(|g| t[(g - self.gfn) as usize].load(Ordering::Relaxed) > 0)
    }

    /// A guest write set the Dirty bit of `gfn`'s 4K leaf: with PML the CPU logs it. True if
    /// this slot logs with PML (the page is now marked).
    #[inline]
    pub fn pml_log(&self, gfn: u64) -> bool {
        match &self.dirty {
            Some(d) if d.pml => {
                d.mark(gfn - self.gfn);
                true
            }
            _ => false,
        }
    }

    /// Mark `gfn` dirty if the slot logs dirty pages.
    #[inline(always)]
    pub fn mark_dirty(&self, gfn: u64) {
        if let Some(d) = &self.dirty {
            d.mark(gfn - self.gfn);
        }
    }

    #[inline(always)]
    pub fn end(&self) -> u64 {
        self.gfn + self.npages
    }

    #[inline(always)]
    pub fn contains(&self, gfn: u64) -> bool {
        gfn >= self.gfn && gfn < self.end()
    }

    #[inline(always)]
    pub fn pfn(&self, gfn: u64) -> u64 {
        self.host_pfn + (gfn - self.gfn)
    }

    #[inline(always)]
    pub fn gmem_pfn(&self, gfn: u64) -> u64 {
        self.gmem_pfn + (gfn - self.gfn)
    }

    pub fn backing_bytes(&self) -> u64 {
        pages_per_level(self.level) * 4096
    }

    /// Mark the backing page holding `gfn` as allocated; true if this is its first touch.
    #[inline(always)]
    pub fn touch(&self, gfn: u64) -> bool {
        Self::touch_in(
            &self.touched,
            (gfn - self.gfn) >> (9 * (self.level as u32 - 1)),
        )
    }

    /// First touch of the guest_memfd page behind `gfn` (a separate host allocation).
    #[inline(always)]
    pub fn touch_gmem(&self, gfn: u64) -> bool {
        match &self.gmem_touched {
            Some(t) => Self::touch_in(t, (gfn - self.gfn) >> (9 * (self.level as u32 - 1))),
            None => false,
        }
    }

    /// guest_memfd freed the pages of [gfn, end) (punch hole): the next touch allocates again.
    pub fn untouch_gmem(&self, gfn: u64, end: u64) {
        if let Some(t) = &self.gmem_touched {
            self.clear_pages(t, gfn, end);
        }
    }

    /// The host freed the shared pages of [gfn, end) (MADV_DONTNEED): the next touch
    /// allocates (and zeroes) again. Only whole backing pages inside the range are freed.
    pub fn untouch(&self, gfn: u64, end: u64) {
        self.clear_pages(&self.touched, gfn, end);
    }

    /// Whether the backing page holding `gfn` is mapped read-only on the host (mprotect).
    #[inline(always)]
    pub fn host_readonly(&self, gfn: u64) -> bool {
        match &self.host_ro {
            Some(b) => {
                let page = (gfn - self.gfn) >> (9 * (self.level as u32 - 1));
                b[(page / 64) as usize].load(Ordering::Relaxed) & (1 << (page % 64)) != 0
            }
            None => false,
        }
    }

    /// mprotect of the shared mapping of the whole backing pages in [gfn, end): read-only
    /// (`writable` false) or writable again. The bitmap is allocated on first use (fallibly).
    pub fn set_host_writable(&mut self, gfn: u64, end: u64, writable: bool) -> Result<()> {
        if self.host_ro.is_none() {
            if writable {
                return Ok(());
            }
            let words = (self.npages / pages_per_level(self.level)).div_ceil(64) as usize;
            self.host_ro = Some(try_zeroed_atomics(words, "the host read-only bitmap")?);
        }
        let bits = self.host_ro.as_ref().expect("allocated above");
        if writable {
            self.clear_pages(bits, gfn, end);
        } else {
            let (first, last) = self.page_span(gfn, end);
            for page in first..last {
                bits[(page / 64) as usize].fetch_or(1u64 << (page % 64), Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// The backing pages wholly inside [gfn, end) ∩ slot, as [first, last) page indices.
    fn page_span(&self, gfn: u64, end: u64) -> (u64, u64) {
        let shift = 9 * (self.level as u32 - 1);
        let first = (gfn.max(self.gfn) - self.gfn).div_ceil(1 << shift);
        let last = (end.min(self.end()).max(self.gfn) - self.gfn) >> shift;
        (first, last.max(first))
    }

    fn clear_pages(&self, bits: &[AtomicU64], gfn: u64, end: u64) {
        let (first, last) = self.page_span(gfn, end);
        for page in first..last {
            bits[(page / 64) as usize].fetch_and(!(1u64 << (page % 64)), Ordering::Relaxed);
        }
    }

    #[inline(always)]
    fn touch_in(bits: &[AtomicU64], page: u64) -> bool {
        let bit = 1u64 << (page % 64);
        let w = &bits[(page / 64) as usize];
        // Plain load first: after warm-up nearly every fault hits an already-touched page.
        if w.load(Ordering::Relaxed) & bit != 0 {
            return false;
        }
        w.fetch_or(bit, Ordering::Relaxed) & bit == 0
    }
}

/// Backing page size in bytes → level.
pub fn backing_level(bytes: u64, arg: &str) -> Result<u8> {
    match bytes {
        4096 => Ok(1),
        0x20_0000 => Ok(2),
        0x4000_0000 => Ok(3),
        _ => Err(bad_arg(
            arg,
            format!(
                "backing page size must be 4096 (4K), 2097152 (2M) or 1073741824 (1G), got {bytes}"
            ),
        )),
    }
}

/// The memslot list, sorted by gfn (KVM keeps an interval tree; sorted + binary search is
/// the same answer).
#[derive(Debug, Default)]
pub struct Memslots {
    pub slots: Vec<Memslot>,
    pub generation: u64,
    pub next_id: u32,
    pub next_data_pfn: u64,
}

impl Memslots {
    pub fn new() -> Self {
        Self {
            slots: Vec::new(),
            generation: 0,
            next_id: 0,
            next_data_pfn: DATA_BASE_PFN,
        }
    }

    #[inline(always)]
    pub fn find(&self, gfn: u64) -> Option<&Memslot> {
        let i = self.slots.partition_point(|s| s.end() <= gfn);
        self.slots.get(i).filter(|s| s.contains(gfn))
    }

    pub fn by_id(&self, id: u32) -> Option<&Memslot> {
        self.slots.iter().find(|s| s.id == id)
    }

    pub fn by_id_mut(&mut self, id: u32) -> Option<&mut Memslot> {
        self.slots.iter_mut().find(|s| s.id == id)
    }

    /// Validate an addition; does not change anything.
    pub fn check_add(&self, gfn: u64, npages: u64, level: u8, max_gfn: u64) -> Result<()> {
        let align = pages_per_level(level);
        if npages == 0 {
            return Err(bad_arg("npages", "must be > 0"));
        }
        if !gfn.is_multiple_of(align) {
            return Err(bad_arg(
                "gfn",
                format!("must be a multiple of the backing page ({align} pages), got {gfn:#x}"),
            ));
        }
        if !npages.is_multiple_of(align) {
            return Err(bad_arg(
                "npages",
                format!("must be a multiple of the backing page ({align} pages), got {npages}"),
            ));
        }
        if gfn.checked_add(npages).is_none_or(|e| e > max_gfn) {
            return Err(bad_arg(
                "npages",
                format!(
                    "slot [{gfn:#x}, {gfn:#x}+{npages:#x}) must end at or below the guest's gfn limit {max_gfn:#x}"
                ),
            ));
        }
        if let Some(s) = self
            .slots
            .iter()
            .find(|s| gfn < s.end() && s.gfn < gfn + npages)
        {
            return Err(bad_arg(
                "gfn",
                format!(
                    "range [{gfn:#x}, {:#x}) overlaps memslot {} [{:#x}, {:#x})",
                    gfn + npages,
                    s.id,
                    s.gfn,
                    s.end()
                ),
            ));
        }
        Ok(())
    }

    /// Add a slot (already validated by `check_add`); returns its id. guest_memfd pages are a
    /// separate host allocation from the shared mapping. Nothing changes on failure.
    pub fn add(&mut self, gfn: u64, npages: u64, level: u8, gmem: bool) -> Result<u32> {
        let span = npages.div_ceil(DATA_PFN_ALIGN) * DATA_PFN_ALIGN;
        let host_pfn = self.next_data_pfn;
        let gmem_pfn = gmem.then_some(host_pfn + span);
        let id = self.next_id;
        let slot = Memslot::new(id, gfn, npages, level, host_pfn, gmem_pfn)?;
        self.next_id += 1;
        self.next_data_pfn += if gmem { 2 * span } else { span };
        let pos = self.slots.partition_point(|s| s.gfn < gfn);
        self.slots.insert(pos, slot);
        self.generation += 2;
        Ok(id)
    }

    /// Keep the slots sorted by gfn after one moved.
    pub fn resort(&mut self) {
        self.slots.sort_by_key(|s| s.gfn);
        self.generation += 2;
    }

    /// Every slot overlapping [gfn, end).
    pub fn overlapping(&self, gfn: u64, end: u64) -> impl Iterator<Item = &Memslot> {
        // Slots are sorted by gfn and disjoint: start at the first one ending after `gfn`
        // (a binary search; thousands of slots are common) and stop at the first past `end`.
        let first = self.slots.partition_point(|s| s.end() <= gfn);
        self.slots[first..].iter().take_while(move |s| s.gfn < end)
    }

    pub fn remove(&mut self, id: u32) -> Option<Memslot> {
        let pos = self.slots.iter().position(|s| s.id == id)?;
        self.generation += 2;
        Some(self.slots.remove(pos))
    }
}
