"""``tdpmmu report``: modeled all-in costs of confidential-VM operations beside published figures.

Every number here is MODELED: tdpmmu runs small simulated VMs and reads the engine's cost ledger
(``VM.cost_breakdown()``: modeled ns charged to each ``tdpmmu.CostModel`` field) before and after
each measured operation. A row's breakdown is that change, one term per field that moved
(units x the field's ns); the report checks that the terms add up to the change of the modeled
clock (every term is the engine's: ``Component.engine`` would mark a term the report added, and
no row adds one). The published bounds are the end-to-end figures of ``docs/costs.md`` §7
(measurements of real machines, or arithmetic on them), cited by row.

The rows:

``tdx_private_fault``
    A guest touches a private 4 KiB page of a runnable TD: TD exit, KVM's fault handling,
    TDH.MEM.PAGE.AUG, TDH.VP.ENTER, the guest's TDG.MEM.PAGE.ACCEPT, averaged over the 512 pages of
    a fresh 2 MiB range (so one TDH.MEM.SEPT.ADD per 512 pages). It **includes the host page's
    first-touch allocation and zeroing** (``host_page_alloc_ns``): the published 2.54 µs
    accepted 90 GiB of never-touched memory, "incl. page clearing".
``tdx_private_fault_no_alloc``
    The same fault on a page whose host page already exists (the page was converted to shared
    and back, so the S-EPT tables exist and only AUG + ACCEPT remain).
``tdx_dynamic_removal``
    One private 4 KiB page converted to shared while the TD runs: the conversion request the engine
    charges per ``set_memory_attributes`` (the guest's MapGPA exit, ``psc_exit_ns``, and
    guest_memfd's bookkeeping, ``gmem_convert_ns``), BLOCK, TRACK, kick all vCPUs, REMOVE, WBINVD,
    page clear, the SPTE write and the remote TLB flush of the conversion.
``tdx_teardown_per_page``
    ``destroy()`` of a TD with ``TEARDOWN_PAGES`` private pages, divided by that page count, in
    upstream KVM's order (docs/costs.md §5.5, the ``teardown="remove"`` TDX option): guest_memfd
    release removes every private page with the HKID still assigned (BLOCK, TRACK, kick, REMOVE,
    WBINVD, clear per page), then the HKID is released and only the S-EPT *tables* are
    RECLAIMed. Compared with R3, the published removal of all private memory in that order.
``tdx_terminate_per_page``
    The same ``destroy()`` in the KVM_TDX_TERMINATE_VM order (``teardown="terminate_vm"``): the
    HKID is released first and every page, data and S-EPT table alike, is RECLAIMed and
    cleared. Compared with R4, the published teardown in that order.
``tdx_reclaim_per_page``
    TDH.PHYMEM.PAGE.RECLAIM + clear per reclaimed page: the ledger terms of those two fields in
    ``destroy()`` of a TD whose private pages were all converted to shared first, so that only
    its S-EPT tables are left to reclaim after the HKID release. This is what the model charges
    per page in the TD_TEARDOWN state.
``snp_private_fault``
    An SNP guest's first touch of a private 4 KiB page: its page-state-change VMGEXIT asking for
    the page to be private before it PVALIDATEs (``VM.map_gpa_range``: the exit, ``psc_exit_ns``,
    is charged although the page is private already and nothing converts), the NPF exit, fault
    handling, host page allocation, RMPUPDATE (guest_memfd prepare) and the guest's PVALIDATE.
``snp_private_fault_no_alloc``
    The same on a page whose host page already exists (private -> shared -> punch hole), measured
    from the guest's request to make it private again (``VM.map_gpa_range``: ``psc_exit_ns +
    gmem_convert_ns``), then the re-fault.
"""

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tdpmmu import __version__, _core, render
from tdpmmu.costs import CostModel
from tdpmmu.stats import Stats
from tdpmmu.vm import VM

__all__ = [
    "PUBLISHED",
    "TEARDOWN_PAGES",
    "Component",
    "Published",
    "Report",
    "Row",
    "build_report",
    "format_text",
    "ledger_components",
    "to_json",
]

#: Private pages mapped before the teardown measurement (amortizes the one-off HKID release).
TEARDOWN_PAGES = 4096
#: vCPU counts of the published dynamic-removal / teardown configurations (docs/costs.md R3, R4).
PUBLISHED_VCPUS = (4, 32, 64)

_COSTS_MD = "docs/costs.md"


@dataclasses.dataclass(frozen=True, slots=True)
class Published:
    """A published figure in µs (a range when ``low_us != high_us``) and where it comes from."""

    low_us: float
    high_us: float
    source: str
    conditions: str

    def text(self) -> str:
        """The figure as printed: ``"2.54"`` or a range ``"15-16"`` (µs).

        Returns:
            str: the low end, or ``low-high`` when the published figure is a range.
        """
        if self.low_us == self.high_us:
            return f"{self.low_us:g}"
        return f"{self.low_us:g}-{self.high_us:g}"


_ALL_IN = Published(
    2.54,
    2.54,
    f"{_COSTS_MD} §7.1 R1: TDX private 4 KiB fault all-in (TD exit, KVM fault, mirror SPTE, "
    "TDH.MEM.PAGE.AUG, TDH.VP.ENTER, TDG.MEM.PAGE.ACCEPT, incl. page clearing) ≈ 2.54 µs (D: "
    "90 GiB accepted in ~60 s by 1 vCPU in 4 KiB steps; Kirill A. Shutemov, LKML, Oct 2024)",
    "1 vCPU, 90 GiB TD, 4 KiB pages, first touch",
)
_REMOVAL = {
    4: (15.0, 16.0, "4 vCPU, 18 GB TD"),
    32: (18.0, 20.0, "32 vCPU, 107 GB TD"),
    64: (53.0, 57.0, "64 vCPU, 400 GB TD"),
}
_REMOVAL_SOURCE = (
    f"{_COSTS_MD} §7.1 R3: TDX dynamic removal per 4 KiB page ≈ 15-16 / 18-20 / 53-57 µs at "
    "4 / 32 / 64 vCPUs (D: 'Dynamic Page Removal' of all private memory took 72 / 517 / 5539 s; "
    "Sean Christopherson and Adrian Hunter, [PATCH v5] KVM: TDX: Add sub-ioctl "
    "KVM_TDX_TERMINATE_VM, kvm list, 2025-07-18)"
)
_TEARDOWN = {
    4: (5.1, 5.5, "4 vCPU, 18 GB TD"),
    32: (4.8, 5.1, "32 vCPU, 107 GB TD"),
    64: (4.5, 4.8, "64 vCPU, 400 GB TD"),
}
_TEARDOWN_SOURCE = (
    f"{_COSTS_MD} §7.1 R4: TDX teardown reclaim per 4 KiB page ≈ 5.1-5.5 / 4.8-5.1 / 4.5-4.8 µs "
    "at 4 / 32 / 64 vCPUs (D: reclaim in TD_TEARDOWN state, HKID released first, took 24 / 134 / "
    "467 s; same patch, 2025-07-18)"
)
_SNP = Published(
    6.1,
    6.1,
    f"{_COSTS_MD} §7.1 R6: SNP private page all-in ≈ 6.1 µs per 4 KiB-equivalent (D: a 128 GB "
    "SNP guest boots in 227 s with eager acceptance vs 22 s lazy; includes PSC VMGEXITs, host "
    "RMPUPDATE, NPF faults, gmem allocation, PVALIDATE; Ashish Kalra, LKML, 2025-02-20)",
    "128 GB SNP guest, vCPUs and page sizes not stated",
)


def _nearest(
    table: Mapping[int, tuple[float, float, str]], source: str, vcpus: int
) -> tuple[int, Published]:
    """The published configuration nearest to ``vcpus`` on a log scale (they span 4..64)."""
    cfg = min(table, key=lambda v: abs(math.log(v) - math.log(vcpus)))
    low, high, conditions = table[cfg]
    return cfg, Published(low, high, source, conditions)


#: The published figures of docs/costs.md §7.1 the rows compare with, keyed by row.
PUBLISHED: dict[str, Published] = {
    "tdx_private_fault": _ALL_IN,
    "snp_private_fault": _SNP,
    **{f"tdx_dynamic_removal@{v}": _nearest(_REMOVAL, _REMOVAL_SOURCE, v)[1] for v in (4, 32, 64)},
    **{f"tdx_teardown@{v}": _nearest(_TEARDOWN, _TEARDOWN_SOURCE, v)[1] for v in (4, 32, 64)},
}


@dataclasses.dataclass(frozen=True, slots=True)
class Component:
    """One term of a modeled total: ``ns`` charged to the CostModel field ``field`` (per page).

    ``ns`` is read from the engine's cost ledger; ``ns_each`` is the field's value, so ``count``
    is the number of units charged. ``engine`` is False for a term a report adds itself (one the
    engine does not charge); every row's terms are the engine's today.
    """

    field: str
    ns: float
    ns_each: float
    engine: bool = True

    @property
    def count(self) -> float:
        """Units charged (per page): ``ns / ns_each``."""
        return self.ns / self.ns_each if self.ns_each else 0.0


@dataclasses.dataclass(frozen=True, slots=True)
class Row:
    """One line of the report: a modeled all-in cost per page beside its published figure.

    ``components`` are the cost-ledger terms (CostModel field x units, per page) that make up
    ``modeled_ns``; a term the engine did not charge would be marked ``engine=False`` (none is:
    the SNP first touch's page-state-change request is measured, ``VM.map_gpa_range``).
    """

    key: str
    label: str
    components: tuple[Component, ...]
    #: What the engine's modeled clock moved by for this row (per page), before report terms.
    engine_ns: float
    published: Published
    note: str

    @property
    def modeled_ns(self) -> float:
        """Modeled nanoseconds per page: the sum of the row's components."""
        return sum(c.ns for c in self.components)

    @property
    def ratio(self) -> tuple[float, float]:
        """modeled / published, against the high and the low end of the published range."""
        us = self.modeled_ns / 1000.0
        return us / self.published.high_us, us / self.published.low_us

    def ratio_text(self) -> str:
        """``modeled / published`` as printed: one ratio, or a range against a published range.

        Returns:
            str: e.g. ``"5.00"`` or ``"1.25-1.33"``.
        """
        lo, hi = self.ratio
        return f"{lo:.2f}" if math.isclose(lo, hi) else f"{lo:.2f}-{hi:.2f}"

    def breakdown(self) -> str:
        """The row's terms in µs with their CostModel field, e.g.
        ``"2.000 (fault_handling_ns) + 7.500 (host_page_alloc_ns)"``.

        Returns:
            str: the nonzero terms joined by ``+``; a fractional unit count is shown as
            ``x count`` and a term the report added itself as ``[added by report]``.
        """
        terms = []
        for c in self.components:
            if c.ns == 0:
                continue
            count = "" if math.isclose(c.count, 1.0) else f" x {c.count:.6g}"
            mark = "" if c.engine else " [added by report]"
            us = c.ns / 1000
            amount = f"{us:.3f}" if us >= 0.0005 else "<0.001"
            terms.append(f"{amount} ({c.field}{count}){mark}")
        return " + ".join(terms)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: key, label, modeled and engine ns, every component, the published
        figure with its source and conditions, the two ratios and the note.

        Returns:
            dict[str, Any]: plain types only.
        """
        lo, hi = self.ratio
        return {
            "key": self.key,
            "label": self.label,
            "modeled_ns": self.modeled_ns,
            "engine_ns": self.engine_ns,
            "components": [
                {
                    "field": c.field,
                    "count": c.count,
                    "ns_each": c.ns_each,
                    "ns": c.ns,
                    "engine": c.engine,
                }
                for c in self.components
            ],
            "published": dataclasses.asdict(self.published),
            "ratio_to_published_high": lo,
            "ratio_to_published_low": hi,
            "note": self.note,
        }


@dataclasses.dataclass(frozen=True, slots=True)
class Report:
    """The whole report (``python -m tdpmmu report``): the rows measured with one cost model
    and vCPU count, and dynamic removal at each published vCPU count."""

    vcpus: int
    costs: CostModel
    rows: tuple[Row, ...]
    #: Dynamic removal at each published vCPU count, for the vCPU scaling comparison.
    removal_by_vcpus: tuple[Row, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict marked ``simulated``/``modeled``, with the version, the vCPU count,
        the cost fields that differ from the defaults and every row.

        Returns:
            dict[str, Any]: plain types only.
        """
        default = CostModel()
        overrides = {k: v for k, v in self.costs.to_dict().items() if v != getattr(default, k)}
        return {
            "tool": "tdpmmu",
            "version": __version__,
            "simulated": True,
            "modeled": True,
            "report": "confidential_costs",
            "vcpus": self.vcpus,
            "teardown_pages": TEARDOWN_PAGES,
            "cost_overrides": overrides,
            "rows": [r.to_dict() for r in self.rows],
            "removal_by_vcpus": [r.to_dict() for r in self.removal_by_vcpus],
        }


# ----- the cost ledger ----------------------------------------------------------------------------


def ledger_components(
    before: Mapping[str, float],
    after: Mapping[str, float],
    modeled_ns: float,
    costs: CostModel,
    what: str,
    per: float = 1.0,
) -> tuple[Component, ...]:
    """The terms of one measurement: the change of the cost ledger from ``before`` to ``after``
    (two ``VM.cost_breakdown()`` results), one ``Component`` per field that moved, in field order,
    divided by ``per`` (pages).

    Args:
        before: ``vm.cost_breakdown()`` before the measured operation.
        after: ``vm.cost_breakdown()`` after it.
        modeled_ns: the ``stats["modeled_ns"]`` delta over the same operation, in ns.
        costs: the VM's cost model (each field's ns per unit).
        what: the row's name, for error messages.
        per: pages the operation covered (the terms are per page); default 1.

    Returns:
        tuple[Component, ...]: one term per field whose ledger moved.

    Raises:
        RuntimeError: the ledger does not explain the change of the modeled clock, has fields
            the cost model does not know, went backwards, or holds a fractional number of
            units of a field.
    """
    fields = costs.field_names()
    # The wait kinds follow the fields; operations outside virtual-time runs charge none.
    waits = tuple(_core.WAIT_FIELDS)
    if tuple(before) != fields + waits or tuple(after) != fields + waits:
        raise RuntimeError(
            f"{what}: the engine's cost ledger has fields {tuple(after)}, the cost model "
            f"{fields}; the extension and the Python package are out of step"
        )
    if any(after[w] != before[w] for w in waits):
        raise RuntimeError(f"{what}: a wait was charged outside a virtual-time run")
    delta = {f: after[f] - before[f] for f in fields}
    total = math.fsum(delta.values())
    if not math.isclose(total, modeled_ns, rel_tol=1e-12, abs_tol=1e-6):
        raise RuntimeError(
            f"{what}: the engine's clock moved by {modeled_ns} ns but its cost ledger by {total} ns"
        )
    out = []
    for f, ns in delta.items():
        if ns == 0.0:
            continue
        if ns < 0:
            raise RuntimeError(f"{what}: the cost ledger of {f} went backwards by {-ns} ns")
        each = float(getattr(costs, f))
        units = ns / each if each else math.inf
        if not math.isfinite(units) or not math.isclose(
            units, round(units), rel_tol=1e-9, abs_tol=1e-6
        ):
            raise RuntimeError(
                f"{what}: the ledger charged {ns} ns to {f}, not a whole number of units of "
                f"{each} ns"
            )
        out.append(Component(f, ns / per, each))
    return tuple(out)


_Snapshot = tuple[dict[str, float], Stats]


def _snapshot(vm: VM) -> _Snapshot:
    return vm.cost_breakdown(), vm.stats


def _measure(
    vm: VM, before: _Snapshot, what: str, per: float = 1.0
) -> tuple[tuple[Component, ...], float]:
    """Ledger terms and modeled-clock change since ``before``, both per ``per`` pages."""
    ledger, stats = before
    modeled = float((vm.stats - stats)["modeled_ns"])
    comps = ledger_components(ledger, vm.cost_breakdown(), modeled, vm.costs, what, per)
    return comps, modeled / per


# ----- measurements -------------------------------------------------------------------------------


def _td(costs: CostModel, vcpus: int) -> VM:
    vm = VM("tdx", memory="1GiB", vcpus=vcpus, costs=costs)
    vm.finalize()
    return vm


def tdx_private_fault(costs: CostModel, vcpus: int) -> Row:
    vm = _td(costs, vcpus)
    vm.fault(0)  # the first 2M range builds the L3/L2 tables
    before = _snapshot(vm)
    faults = [vm.fault(g) for g in range(512, 1024)]  # a fresh 2M range: one SEPT.ADD
    comps, engine_ns = _measure(vm, before, "tdx_private_fault", per=512)
    assert math.isclose(sum(f.modeled_ns for f in faults) / 512, engine_ns)
    return Row(
        "tdx_private_fault",
        "TDX private 4K fault, all-in, first touch",
        comps,
        engine_ns,
        _ALL_IN,
        "mean of the 512 faults of a fresh 2 MiB range (TDH.MEM.SEPT.ADD amortized); includes "
        "the host page's first-touch allocation + zeroing, as the published figure does",
    )


def tdx_private_fault_no_alloc(costs: CostModel, vcpus: int) -> Row:
    vm = _td(costs, vcpus)
    vm.fault(0)
    vm.set_memory_attributes(0, 1, private=False)
    vm.set_memory_attributes(0, 1, private=True)
    before = _snapshot(vm)
    f = vm.fault(0)
    comps, engine_ns = _measure(vm, before, "tdx_private_fault_no_alloc")
    assert math.isclose(f.modeled_ns, engine_ns)
    return Row(
        "tdx_private_fault_no_alloc",
        "TDX private 4K fault, host page already allocated",
        comps,
        engine_ns,
        _ALL_IN,
        "re-fault after a private->shared->private round trip: exit/entry, fault handling, "
        "AUG, ACCEPT only",
    )


def tdx_dynamic_removal(costs: CostModel, vcpus: int) -> Row:
    vm = _td(costs, vcpus)
    vm.fault(0)
    before = _snapshot(vm)
    vm.set_memory_attributes(0, 1, private=False)
    assert (vm.stats - before[1])["conversions"] == 1
    comps, engine_ns = _measure(vm, before, "tdx_dynamic_removal")
    cfg, published = _nearest(_REMOVAL, _REMOVAL_SOURCE, vcpus)
    return Row(
        f"tdx_dynamic_removal@{vcpus}",
        f"TDX dynamic removal of one private 4K page ({vcpus} vCPUs)",
        comps,
        engine_ns,
        published,
        f"KVM_SET_MEMORY_ATTRIBUTES(shared) of one page of a running TD, including the "
        f"conversion request (MapGPA exit + guest_memfd bookkeeping) that the published "
        f"teardown-time removal does not have; published figure for the nearest published "
        f"configuration ({cfg} vCPUs); kick cost = kick_base_ns + kick_per_vcpu_ns x vCPUs; the "
        f"TD's size is not modeled",
    )


def _td_destroy_row(
    costs: CostModel, vcpus: int, teardown: str
) -> tuple[tuple[Component, ...], float]:
    """The per-page ledger of ``destroy()`` of a TD with ``TEARDOWN_PAGES`` private pages,
    torn down in the order the ``teardown`` TDX option selects."""
    vm = VM("tdx", memory="1GiB", vcpus=vcpus, costs=costs, tdx={"teardown": teardown})
    vm.finalize()
    vm.fault_batch(np.arange(TEARDOWN_PAGES, dtype=np.uint64))
    before = _snapshot(vm)
    vm.destroy()
    return _measure(vm, before, f"tdx_teardown[{teardown}]", per=TEARDOWN_PAGES)


def tdx_teardown_per_page(costs: CostModel, vcpus: int) -> Row:
    comps, engine_ns = _td_destroy_row(costs, vcpus, "remove")
    cfg, published = _nearest(_REMOVAL, _REMOVAL_SOURCE, vcpus)
    return Row(
        f"tdx_teardown_per_page@{vcpus}",
        f"TDX destroy() per private 4K page, upstream order ({vcpus} vCPUs)",
        comps,
        engine_ns,
        published,
        f"destroy() of a TD with {TEARDOWN_PAGES} private pages / {TEARDOWN_PAGES}: upstream "
        "order (guest_memfd release removes each page with the HKID assigned, then HKID "
        "release, then RECLAIM of the S-EPT tables), the order of the published removal of all "
        f"private memory; no vCPU runs (nothing is kicked but the kick's cost is charged as "
        f"KVM sends it); nearest published configuration: {cfg} vCPUs",
    )


def tdx_terminate_per_page(costs: CostModel, vcpus: int) -> Row:
    comps, engine_ns = _td_destroy_row(costs, vcpus, "terminate_vm")
    cfg, published = _nearest(_TEARDOWN, _TEARDOWN_SOURCE, vcpus)
    return Row(
        f"tdx_terminate_per_page@{vcpus}",
        f"TDX destroy() per private 4K page, KVM_TDX_TERMINATE_VM ({vcpus} vCPUs)",
        comps,
        engine_ns,
        published,
        f"destroy() of a TD with {TEARDOWN_PAGES} private pages / {TEARDOWN_PAGES} with "
        'tdx={"teardown": "terminate_vm"}: the HKID is released first, then every data page and '
        f"S-EPT table is RECLAIMed and cleared; nearest published configuration: {cfg} vCPUs",
    )


#: The ledger fields of reclaiming one page after the HKID release.
_RECLAIM_FIELDS = ("tdh_phymem_page_reclaim_ns", "page_clear_ns")


def tdx_reclaim_per_page(costs: CostModel, vcpus: int) -> Row:
    vm = _td(costs, vcpus)
    vm.fault_batch(np.arange(TEARDOWN_PAGES, dtype=np.uint64))
    # Remove the data pages while the TD runs, so destroy() has only S-EPT tables to reclaim.
    vm.set_memory_attributes(0, TEARDOWN_PAGES, private=False)
    before = _snapshot(vm)
    vm.destroy()
    reclaims = float((vm.stats - before[1])["TDH.PHYMEM.PAGE.RECLAIM"])
    if reclaims <= 0:
        raise RuntimeError("tdx_reclaim_per_page: destroy() reclaimed no page")
    comps, _ = _measure(vm, before, "tdx_reclaim", per=reclaims)
    kept = tuple(c for c in comps if c.field in _RECLAIM_FIELDS)
    _, published = _nearest(_TEARDOWN, _TEARDOWN_SOURCE, vcpus)
    return Row(
        f"tdx_reclaim_per_page@{vcpus}",
        "TDX RECLAIM + clear per page after HKID release",
        kept,
        sum(c.ns for c in kept),
        published,
        f"destroy() of a TD whose {TEARDOWN_PAGES} private pages were converted to shared first: "
        f"its ledger terms for {' and '.join(_RECLAIM_FIELDS)} per reclaimed page "
        f"({int(reclaims)} S-EPT table pages, each TDH.PHYMEM.PAGE.RECLAIM + clear); what the "
        "model charges per page in TD_TEARDOWN state",
    )


def tdx_teardown_rows(costs: CostModel, vcpus: int) -> tuple[Row, Row, Row]:
    """The teardown rows (upstream order, KVM_TDX_TERMINATE_VM) and the RECLAIM + clear row."""
    return (
        tdx_teardown_per_page(costs, vcpus),
        tdx_terminate_per_page(costs, vcpus),
        tdx_reclaim_per_page(costs, vcpus),
    )


_HOST_ALLOC_FIELDS = ("host_page_alloc_ns", "host_zero_4k_ns")


def snp_private_fault(costs: CostModel, vcpus: int) -> Row:
    vm = VM("snp", memory="1GiB", vcpus=vcpus, costs=costs)
    before = _snapshot(vm)
    vm.map_gpa_range(7, 1, private=True)  # the guest's PSC before PVALIDATE: nothing converts
    vm.fault(7)
    assert (vm.stats - before[1])["conversions"] == 1
    comps, engine_ns = _measure(vm, before, "snp_private_fault")
    return Row(
        "snp_private_fault",
        "SNP private 4K fault, all-in, first touch",
        comps,
        engine_ns,
        _SNP,
        "the guest's PSC VMGEXIT (its exit to the VMM, psc_exit_ns; the page is private "
        "already, so nothing converts), then NPF exit, fault handling, host page allocation (the "
        "published figure includes gmem allocation), RMPUPDATE by guest_memfd prepare, the "
        "guest's PVALIDATE",
    )


def snp_private_fault_no_alloc(costs: CostModel, vcpus: int) -> Row:
    vm = VM("snp", memory="1GiB", vcpus=vcpus, costs=costs)
    vm.fault(7)
    vm.set_memory_attributes(7, 1, private=False)
    vm.punch_hole(7, 1)
    before = _snapshot(vm)
    vm.map_gpa_range(7, 1, private=True)  # the guest's PSC, which converts the page back
    vm.fault(7)
    assert (vm.stats - before[1])["conversions"] == 1
    comps, engine_ns = _measure(vm, before, "snp_private_fault_no_alloc")
    # punch_hole freed the guest_memfd page, so the re-fault allocates it again; this row is
    # the same work without that allocation (its ledger terms are left out, and said so).
    alloc = tuple(c for c in comps if c.field in _HOST_ALLOC_FIELDS)
    kept = tuple(c for c in comps if c.field not in _HOST_ALLOC_FIELDS)
    return Row(
        "snp_private_fault_no_alloc",
        "SNP private 4K fault, host page already allocated",
        kept,
        engine_ns - sum(c.ns for c in alloc),
        _SNP,
        "private->shared->punch hole round trip, then the guest's request to make the page "
        "private again (PSC exit + guest_memfd bookkeeping, charged by the engine) and the "
        "re-fault: exit, fault handling, RMPUPDATE, PVALIDATE; the re-allocation of the "
        "punched guest_memfd page is left out",
    )


def build_report(vcpus: int = 4, costs: CostModel | Mapping[str, float] | None = None) -> Report:
    """Run the small VMs and collect every row (cheap: a few thousand simulated faults).

    Args:
        vcpus: vCPUs of the measured TDs (kick and TLB-flush costs scale with it), >= 1.
        costs: a ``CostModel``, a mapping of field -> ns over the defaults, or None.

    Returns:
        Report: every row, measured with the engine's cost ledger.

    Raises:
        ValueError: ``vcpus`` is not an int >= 1.
        ConfigError: a cost field is unknown or its value negative or not finite.
    """
    if isinstance(vcpus, bool) or not isinstance(vcpus, int) or vcpus < 1:
        raise ValueError(f"vcpus: must be an int >= 1, got {vcpus!r}")
    if costs is None:
        model = CostModel()
    elif isinstance(costs, CostModel):
        model = costs
    else:
        model = CostModel().replace(**costs)
    teardown, terminate, reclaim = tdx_teardown_rows(model, vcpus)
    rows = (
        tdx_private_fault(model, vcpus),
        tdx_private_fault_no_alloc(model, vcpus),
        tdx_dynamic_removal(model, vcpus),
        teardown,
        terminate,
        reclaim,
        snp_private_fault(model, vcpus),
        snp_private_fault_no_alloc(model, vcpus),
    )
    removal = tuple(tdx_dynamic_removal(model, v) for v in PUBLISHED_VCPUS)
    return Report(vcpus, model, rows, removal)


# ----- output -------------------------------------------------------------------------------------

HEADER = (
    "SIMULATED by tdpmmu {version}: MODELED costs (the engine's cost ledger: tdpmmu.CostModel "
    "fields x units charged while small simulated VMs ran), beside published end-to-end figures "
    "(docs/costs.md §7). Modeled time is a property of the cost model, not a measurement of any "
    "machine."
)


def _table(rows: Sequence[Row]) -> list[str]:
    columns = (
        render.Column("item", right=False, key=True),
        render.Column(("modeled", "µs")),
        render.Column(("published", "µs")),
        render.Column(("modeled /", "published")),
    )
    cells = [
        (r.label, f"{r.modeled_ns / 1000:.3f}", r.published.text(), r.ratio_text()) for r in rows
    ]
    return render.table(columns, cells)


def format_text(report: Report) -> str:
    """The report as text within 100 columns: the header (SIMULATED, MODELED), the table of
    rows beside their published figures, the removal-vs-vCPUs table, and each row's terms with
    its source.

    Args:
        report: what ``build_report`` returned.

    Returns:
        str: the lines joined by newlines.
    """
    default = CostModel()
    overrides = [
        f"{k}={v:g}" for k, v in report.costs.to_dict().items() if v != getattr(default, k)
    ]
    out = [
        *render.wrap(HEADER.format(version=__version__), subsequent=""),
        *render.wrap(
            f"vCPUs: {report.vcpus}; teardown pages: {TEARDOWN_PAGES}; cost overrides: "
            f"{', '.join(overrides) if overrides else 'none'}"
        ),
        "",
        *_table(report.rows),
        "",
        "Dynamic removal vs vCPU count (the published configurations):",
        *_table(report.removal_by_vcpus),
        "",
        "What each modeled total is made of (µs per page, from the cost ledger: CostModel field x "
        "units):",
    ]
    for r in report.rows:
        out += [
            f"* {r.label} = {r.modeled_ns / 1000:.3f}",
            *render.wrap(f"= {r.breakdown()}", indent="    ", subsequent="      "),
            *render.wrap(
                f"published: {r.published.text()} µs ({r.published.conditions})",
                indent="    ",
                subsequent="      ",
            ),
            # The citation starts its own line so "docs/costs.md §x Rn" is never split.
            *render.wrap(f"source: {r.published.source}", indent="    ", subsequent="      "),
            *render.wrap(f"note: {r.note}", indent="    ", subsequent="      "),
        ]
    return "\n".join(out)


def to_json(report: Report) -> str:
    """``report.to_dict()`` as JSON.

    Args:
        report: what ``build_report`` returned.

    Returns:
        str: one JSON object.
    """
    return json.dumps(report.to_dict())
