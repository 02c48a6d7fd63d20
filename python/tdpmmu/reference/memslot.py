"""Memslots: guest-physical ranges, the host memory behind them, and size parsing.

The model places host memory itself: the first memslot's pages start at host pfn
``DATA_BASE_PFN``, each later slot 1 GiB aligned after the previous one, and a slot with
guest_memfd gets a second host range of its own (the private pages) right after.  A slot
may be read-only (KVM_MEM_READONLY), may move (KVM_MR_MOVE: the same host pages at another
gfn), logs dirty pages while asked (``DirtyLog``) and keeps the write-tracking counts of its
pages.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator

from .attrs import PrivateRanges
from .errors import ConfigError
from .spte import PAGE_SHIFT, PG_LEVEL_1G, PG_LEVEL_2M, PG_LEVEL_4K
from .vendor.rmp import Rmp

#: host pfn given to the first memslot; later slots follow, 1 GiB aligned.
DATA_BASE_PFN = 1 << 32
_DATA_PFN_ALIGN = 262144  # 1 GiB in 4 KiB pages

_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGTP]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(value: int | str, what: str = "size") -> int:
    """Bytes from an int or a string like ``"64MiB"``, ``"16G"``, ``"2M"``, ``"4K"``.

    Units are binary (K = 1024) whether or not written with ``i``.
    """
    if isinstance(value, bool):
        raise ConfigError(f"{what} must be bytes or a size string, not a bool")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            return int(m.group(1)) * _SIZE_UNITS[m.group(2).upper()]
    raise ConfigError(f"{what}: cannot parse {value!r} (bytes, or e.g. '4K', '2MiB', '16GiB')")


BACKING_LEVEL = {4096: PG_LEVEL_4K, 2 << 20: PG_LEVEL_2M, 1 << 30: PG_LEVEL_1G}


def backing_bytes(value: int | str, what: str = "backing") -> int:
    size = parse_size(value, what)
    if size not in BACKING_LEVEL:
        raise ConfigError(
            f"{what} must be 4K, 2M or 1G (4096, 2097152 or 1073741824 bytes), got {value!r}"
        )
    return size


@dataclasses.dataclass
class DirtyLog:
    """A memslot's dirty log (``KVM_MEM_LOG_DIRTY_PAGES``): one bit per 4 KiB page.

    ``bits`` holds the bitmap as 64-bit words in KVM's layout: bit ``i`` of word ``w`` is page
    ``64 * w + i`` of the slot.
    """

    bits: list[int]
    #: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: GET does not clear or re-protect; CLEAR does.
    manual_protect: bool
    #: KVM_DIRTY_LOG_INITIALLY_SET: the bitmap starts all set and nothing is write-protected
    #: up front (huge pages are split or protected as CLEAR reaches them).
    initially_set: bool
    #: KVM's ``eager_page_split``: huge pages are split when protection reaches them.
    eager_split: bool
    #: the host logs with PML (Intel): 4K leaves are armed by clearing D instead of W, and
    #: the CPU logs the first write to each (huge leaves are still write-protected).
    pml: bool = False

    @classmethod
    def new(
        cls,
        npages: int,
        manual_protect: bool,
        initially_set: bool,
        eager_split: bool,
        pml: bool = False,
    ) -> DirtyLog:
        """The bitmap of a slot of ``npages`` pages: all clear, or all set with
        ``initially_set`` (the bits past the slot's last page stay clear)."""
        words = [0] * dirty_bitmap_words(npages)
        if initially_set:
            for w in range(len(words)):
                left = npages - 64 * w
                words[w] = (1 << 64) - 1 if left >= 64 else (1 << left) - 1
        return cls(words, manual_protect, initially_set, eager_split, pml)

    def mark(self, index: int) -> None:
        """``mark_page_dirty_in_slot`` for the page at ``index`` within the slot."""
        self.bits[index // 64] |= 1 << (index % 64)

    def is_set(self, index: int) -> bool:
        """Whether page ``index`` of the slot is marked dirty."""
        return bool(self.bits[index // 64] >> (index % 64) & 1)

    def first_clear(self, lo: int, hi: int) -> int | None:
        """The first page of ``[lo, hi)`` (slot-relative) not marked dirty, or None."""
        index = lo
        while index < hi:
            w, bit = divmod(index, 64)
            n = min(64 - bit, hi - index)
            window = ((1 << n) - 1) << bit
            missing = ~self.bits[w] & window
            if missing:
                return 64 * w + (missing & -missing).bit_length() - 1
            index += n
        return None


def dirty_bitmap_words(npages: int) -> int:
    """64-bit words of the dirty bitmap of ``npages`` pages."""
    return -(-npages // 64)


def dirty_bitmap_bytes(npages: int) -> int:
    """Bytes of the dirty bitmap of ``npages`` pages (what the VM's budget is charged)."""
    return dirty_bitmap_words(npages) * 8


@dataclasses.dataclass
class Memslot:
    """One KVM memslot with the model's host placement."""

    id: int
    gfn: int
    npages: int
    backing: int  # bytes: 4096, 2 MiB or 1 GiB
    gmem: bool
    host_pfn: int
    gmem_pfn: int = 0  # first guest_memfd pfn (a separate host range), 0 without guest_memfd
    rmp: Rmp | None = None  # SEV-SNP: the RMP entries of the guest_memfd pages
    touched: set[int] = dataclasses.field(default_factory=set)  # backing pages allocated
    gmem_touched: set[int] = dataclasses.field(default_factory=set)  # guest_memfd pages
    dirty: DirtyLog | None = None  # the dirty log while the slot logs dirty pages
    #: KVM_MEM_READONLY: SPTEs are never writable; guest writes exit to userspace (MMIO).
    readonly: bool = False
    #: page write tracking (``kvm_page_track``): the tracker count of each tracked page, by
    #: offset in the slot (KVM keeps one count per page, allocated by the first
    #: ``kvm_write_track_add_gfn``: None before; a page whose count fell to 0 is dropped).
    write_track: dict[int, int] | None = None
    #: host-side protection of the slot's shared mapping (``mprotect`` without PROT_WRITE):
    #: the ranges of backing pages (by index in the slot) mapped read-only on the host; None
    #: before the first read-only ``mprotect`` (the engine allocates its bitmap then).
    host_ro: PrivateRanges | None = None

    @property
    def backing_pages(self) -> int:
        """4 KiB pages per backing page: 1, 512 or 262144."""
        return self.backing >> PAGE_SHIFT

    @property
    def max_level(self) -> int:
        """The largest leaf level the backing allows: 1 (4K), 2 (2M) or 3 (1G)."""
        return BACKING_LEVEL[self.backing]

    @property
    def end(self) -> int:
        """The first gfn after the slot (``gfn + npages``)."""
        return self.gfn + self.npages

    def contains(self, gfn: int) -> bool:
        """Whether ``gfn`` lies in ``[self.gfn, self.end)``."""
        return self.gfn <= gfn < self.end

    def pfn(self, gfn: int) -> int:
        """Host pfn of the shared (host-mapped) page behind ``gfn``."""
        return self.host_pfn + (gfn - self.gfn)

    def private_pfn(self, gfn: int) -> int:
        """Host pfn of the guest_memfd page behind ``gfn``."""
        return self.gmem_pfn + (gfn - self.gfn)

    def mark_dirty(self, gfn: int) -> None:
        """Mark ``gfn`` dirty if the slot logs dirty pages."""
        if self.dirty is not None:
            self.dirty.mark(gfn - self.gfn)

    def pml_log(self, gfn: int) -> bool:
        """A guest write set the Dirty bit of ``gfn``'s 4K leaf: with PML the CPU logs the
        page (it is marked dirty).  Whether this slot logs with PML."""
        if self.dirty is None or not self.dirty.pml:
            return False
        self.dirty.mark(gfn - self.gfn)
        return True

    def write_tracked(self, gfn: int) -> bool:
        """``kvm_gfn_is_write_tracked``: whether ``gfn`` has a write tracker."""
        return self.write_track is not None and gfn - self.gfn in self.write_track

    def any_write_tracked(self, start: int, end: int) -> bool:
        """Whether a page of ``[start, end)`` inside the slot is write-tracked (KVM disallows
        a huge page over it: ``disallow_lpage`` in the slot's ``lpage_info``)."""
        if not self.write_track:
            return False
        lo, hi = start - self.gfn, end - self.gfn
        return any(lo <= off < hi for off in self.write_track)

    def page_span(self, gfn: int, end: int) -> tuple[int, int]:
        """The backing pages wholly inside ``[gfn, end)`` and the slot, as ``[first, last)``
        indices in the slot (empty if none)."""
        bp = self.backing_pages
        first = -(-(max(gfn, self.gfn) - self.gfn) // bp)
        last = (max(min(end, self.end), self.gfn) - self.gfn) // bp
        return first, max(first, last)

    def untouch(self, gfn: int, end: int) -> None:
        """``MADV_DONTNEED``: the host frees the shared pages of ``[gfn, end)`` (whole backing
        pages only), so the next touch of each allocates and zeroes it again."""
        first, last = self.page_span(gfn, end)
        self.touched = {p for p in self.touched if not first <= p < last}

    def host_readonly(self, gfn: int) -> bool:
        """Whether the backing page holding ``gfn`` is mapped read-only on the host
        (``mprotect`` without PROT_WRITE)."""
        if self.host_ro is None:
            return False
        return self.host_ro.is_private((gfn - self.gfn) // self.backing_pages)

    def set_host_writable(self, gfn: int, end: int, writable: bool) -> None:
        """``mprotect`` of the shared mapping of the whole backing pages in ``[gfn, end)``:
        read-only (``writable`` False) or writable again."""
        if self.host_ro is None:
            if writable:
                return
            self.host_ro = PrivateRanges()
        first, last = self.page_span(gfn, end)
        if first < last:
            self.host_ro.set(first, last, not writable)

    def as_tuple(self) -> tuple[int, int, int, int, bool, int]:
        """``(id, gfn, npages, backing bytes, gmem, host_pfn)``, as ``VM.memslots()`` lists it."""
        return (self.id, self.gfn, self.npages, self.backing, self.gmem, self.host_pfn)


class Memslots:
    """The VM's memslots (one address space) and their generation."""

    def __init__(self) -> None:
        self.by_id: dict[int, Memslot] = {}
        self.generation = 0
        self._next_slot_id = 0
        self._next_data_pfn = DATA_BASE_PFN

    def __getitem__(self, slot_id: int) -> Memslot:
        return self.by_id[slot_id]

    def __contains__(self, slot_id: object) -> bool:
        return slot_id in self.by_id

    def __iter__(self) -> Iterator[Memslot]:
        """The memslots in creation order."""
        return iter(self.by_id.values())

    def by_gfn(self) -> list[Memslot]:
        """The memslots sorted by gfn."""
        return sorted(self.by_id.values(), key=lambda s: s.gfn)

    def add(
        self, gfn: int, npages: int, backing: int, gmem: bool, rmp: bool, readonly: bool = False
    ) -> int:
        """A new slot with its host pages (and guest_memfd pages, with an RMP if ``rmp``);
        ``readonly``: KVM_MEM_READONLY."""
        slot_id = self._next_slot_id
        self._next_slot_id += 1
        span = -(-npages // _DATA_PFN_ALIGN) * _DATA_PFN_ALIGN
        slot = Memslot(slot_id, gfn, npages, backing, gmem, self._next_data_pfn)
        slot.readonly = readonly
        self._next_data_pfn += span
        if gmem:
            # guest_memfd pages are a host allocation of their own, right after.
            slot.gmem_pfn = self._next_data_pfn
            self._next_data_pfn += span
            if rmp:
                slot.rmp = Rmp(npages)
        self.by_id[slot_id] = slot
        self.generation += 2  # two address spaces on x86
        return slot_id

    def delete(self, slot_id: int) -> None:
        """The host pages (and the RMP entries) go with the slot."""
        del self.by_id[slot_id]
        self.generation += 2

    def move(self, slot_id: int, new_gfn: int) -> None:
        """KVM_MR_MOVE: the slot (host pages, flags, dirty log, trackers) starts at
        ``new_gfn``."""
        self.by_id[slot_id].gfn = new_gfn
        self.generation += 2

    def gfn_to_memslot(self, gfn: int) -> Memslot | None:
        """KVM's ``gfn_to_memslot``: the slot holding ``gfn``, or None."""
        for slot in self.by_id.values():
            if slot.contains(gfn):
                return slot
        return None

    def rmp_for_pfn(self, pfn: int) -> tuple[Rmp, int] | None:
        """The hardware's view: the RMP entry of a host pfn (guest_memfd pages only)."""
        for slot in self.by_id.values():
            if slot.rmp is not None and slot.gmem_pfn <= pfn < slot.gmem_pfn + slot.npages:
                return slot.rmp, pfn - slot.gmem_pfn
        return None
