"""guest_memfd: the folios behind private memory (KVM's guest_memfd.c, as far as modeled).

A guest_memfd page is allocated (and zeroed) on its first private fault, freed by a punch
hole; with 2M folios, a conversion whose range cuts through a folio splits it.  What the
vendor does when a folio is prepared or invalidated (SNP's RMPUPDATE) lives in
``vendor/sev.py``.
"""

from __future__ import annotations

from .memslot import Memslots


def partly_converted_2m_folios(slots: Memslots, gfn: int, end: int) -> int:
    """2M guest_memfd folios the edges of ``[gfn, end)`` cut through (one if both do)."""
    splits = 0
    for edge in (gfn, end):
        slot = slots.gfn_to_memslot(min(edge, end - 1))
        if edge % 512 and slot is not None and slot.gmem:
            splits += 1
    if gfn // 512 == (end - 1) // 512 and splits == 2:
        splits = 1
    return splits


def free_folios(slots: Memslots, gfn: int, end: int) -> None:
    """Punch hole: the guest_memfd pages of ``[gfn, end)`` are freed (whole backing pages
    only) and allocated again on their next touch."""
    for slot in slots:
        if slot.gmem and slot.gfn < end and gfn < slot.end:
            first = -(-(max(gfn, slot.gfn) - slot.gfn) // slot.backing_pages)
            last = (min(end, slot.end) - slot.gfn) // slot.backing_pages
            slot.gmem_touched -= set(range(first, last))
