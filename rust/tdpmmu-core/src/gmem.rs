//! guest_memfd (virt/kvm/guest_memfd.c): the private pages behind a memslot. Handing a page
//! out (`kvm_gmem_get_pfn`, with the vendor's prepare) and freeing a range (punch hole or
//! release, with the vendor's invalidate) live here; the per-slot pfn base and first-touch
//! bitmap are part of the memslot.

use crate::memslot::{Memslot, Memslots};
use crate::stats::Ctx;
use crate::vendor::Vendor;

/// `kvm_gmem_get_pfn` + `kvm_arch_gmem_prepare`: the pfn behind `gfn` in `slot`'s
/// guest_memfd, and whether the host had to allocate it (first touch).
#[inline]
pub fn get_pfn(vendor: &dyn Vendor, ctx: &mut Ctx, slot: &Memslot, gfn: u64) -> (u64, bool) {
    let first = slot.touch_gmem(gfn);
    let pfn = slot.gmem_pfn(gfn);
    vendor.gmem_prepare(ctx, pfn, gfn);
    (pfn, first)
}

/// guest_memfd frees the pages of [gfn, end) in every slot: `kvm_arch_gmem_invalidate` for
/// the vendor, then the pages count as never touched.
pub fn invalidate(vendor: &dyn Vendor, ctx: &mut Ctx, memslots: &Memslots, gfn: u64, end: u64) {
    for slot in memslots.overlapping(gfn, end).filter(|s| s.gmem) {
        let a = gfn.max(slot.gfn);
        let b = end.min(slot.end());
        vendor.gmem_invalidate(ctx, slot.gmem_pfn(a), b - a);
        slot.untouch_gmem(a, b);
    }
}

/// The VM's guest_memfd ranges as (gfn, pfn, npages), for teardown audits.
pub fn ranges(memslots: &Memslots) -> Vec<(u64, u64, u64)> {
    memslots
        .slots
        .iter()
        .filter(|s| s.gmem)
        .map(|s| (s.gfn, s.gmem_pfn, s.npages))
        .collect()
}
