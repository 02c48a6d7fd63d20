"""Trace events (``VM(trace=True)``); names follow KVM's mmutrace.h tracepoints."""

from typing import NamedTuple

__all__ = ["Event"]


class Event(NamedTuple):
    """One traced event of a ``VM(trace=True)``, as ``VM.trace_events()`` lists them.

    Fields:
        op: what happened. An external hook by KVM's name (``"link_external_spt"``,
            ``"set_external_spte"``, ``"remove_external_spte"``, ``"free_external_spt"``; with
            ``tdx={"interface": "two_hook"}`` links and removals appear as
            ``"set_external_spte"``); a TDX SEAMCALL or TDCALL by leaf (``"TDH.MEM.SEPT.ADD"``,
            ``"TDH.MEM.PAGE.AUG"``, ``"TDH.MEM.PAGE.ADD"``, ``"TDH.MR.EXTEND"``,
            ``"TDH.MEM.RANGE.BLOCK"``, ``"TDH.MEM.TRACK"``, ``"TDH.MEM.PAGE.REMOVE"``,
            ``"TDH.PHYMEM.PAGE.WBINVD"``, ``"TDH.PHYMEM.PAGE.RECLAIM"``,
            ``"TDH.MEM.SEPT.REMOVE"``, ``"TDH.VP.FLUSH"``, ``"TDH.MNG.VPFLUSHDONE"``,
            ``"TDH.PHYMEM.CACHE.WB"``, ``"TDH.MNG.KEY.FREEID"``, ``"TDG.MEM.PAGE.ACCEPT"``);
            KVM kicking every vCPU out of the TD (``"kick"``) and clearing a page that left it
            (``"clear"``); an SEV-SNP instruction (``"rmpupdate"``, ``"psmash"``,
            ``"pvalidate"``). The software mirror (sw_protected, ``mirror=True``) issues no
            SEAMCALLs, so only its hooks appear.
        gfn: the guest page-frame number (4 KiB page) the event is about; 0 for TD-wide
            SEAMCALLs and kicks.
        level: the level of the entry or page: 1 = 4 KiB, 2 = 2 MiB, ...; for
            ``free_external_spt`` the freed table's own level; 0 for TD-wide events.
        detail: a detail word: for ``link_external_spt`` the new table's index (its pfn
            minus ``TABLE_BASE_PFN``), for ``set_external_spte`` / ``remove_external_spte``
            the new / old SPTE, for ``free_external_spt`` 0; a SEAMCALL's completion status
            (0 = TDX_SUCCESS); the vCPU count of a kick; the page's pfn of a clear; 1 (to
            private) or 0 (to shared) for ``rmpupdate``; 0 for ``psmash``; 1 (validate) or 0
            (rescind) for ``pvalidate``.
    """

    op: str  # hook, SEAMCALL or KVM step name, e.g. "TDH.MEM.PAGE.AUG"
    gfn: int
    level: int
    detail: int  # detail word: a SEAMCALL status, a hook's SPTE, ...
