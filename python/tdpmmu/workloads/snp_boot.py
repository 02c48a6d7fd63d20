"""An SEV-SNP guest's boot and memory acceptance (``snp_boot``, tdpmmu's own ``snp-boot``).

1. **Launch (image)**: the VMM loads the launch image (``-i``, gfn 0) into guest_memfd as
   private memory before the guest runs: guest_memfd prepares each page or 2M folio with an
   RMPUPDATE and KVM maps it (``VM.populate(..., private=True)``; the model does not mark
   these pages validated, as SNP_LAUNCH_UPDATE's firmware would: see ``detail``).
2. **Accept memory** (``eager`` only, an SNP guest kernel with ``accept_memory=eager``): the
   boot vCPU PVALIDATEs all of the test region before anything runs: each PVALIDATE of a page
   (or, with 2M pages, of a 2M page) that is not yet mapped exits with a #NPF; guest_memfd
   prepares it (RMPUPDATE, 4K or 2M), KVM maps it and the guest's PVALIDATE then succeeds.
   One vCPU does all of it, so the phase is timed by the VM's modeled ledger.
3. **First touch**: every vCPU writes each page of its slice once (memstress, virtual time by
   default). Lazily accepted memory (the default) is accepted here, on first touch: #NPF,
   RMPUPDATE, map, PVALIDATE per 4K page or 2M page; eagerly accepted memory only hits (or,
   with 2M RMP entries over 4K NPT leaves, takes NPFs that need no RMP work).

Before it PVALIDATEs, the guest asks the host to make the memory private, even though it is
private already: Linux accepts memory (``snp_accept_memory``) with page-state-change (PSC)
requests, and KVM forwards each to the VMM as a KVM_HC_MAP_GPA_RANGE exit
(``VM.map_gpa_range``: ``psc_exit_ns`` each, nothing else since nothing changes). The model
follows the kernel's batching (``psc_requests``): memory is accepted one 4 MiB block at a time
(the page allocator's MAX_PAGE_ORDER block: taken on demand when lazy, as boot frees it to the
allocator when eager; blocks aligned in guest-physical space, clipped to the region), each block
with ``set_pages_state``: PSC requests of up to 253 entries (``VMGEXIT_PSC_MAX_ENTRY``), a 2 MiB
entry where the address is 2 MiB-aligned with 2 MiB left, else 4 KiB ones; KVM makes one exit
per run of contiguous entries of one size. Eager acceptance charges them in its phase; lazily,
each block is accepted by the vCPU whose slice it starts in, and each vCPU's requests lengthen
its own pass (``First touch`` is the slowest vCPU's pass plus its requests). ``psc_exits``
counts the exits (``conversions``), ``psc_requests`` the guest's VMGEXITs. Not modeled: the
firmware's and the boot stub's acceptance of memory outside the region.
"""

import argparse
import time
from typing import Any, Unpack

import numpy as np

from tdpmmu import coerce
from tdpmmu._core import ConfigError, InvariantError
from tdpmmu.ret import Ret
from tdpmmu.stats import Stats
from tdpmmu.vm import VM
from tdpmmu.vmspec import VmSpec
from tdpmmu.workloads.base import (
    Checks,
    Clock,
    SimArgs,
    Workload,
    WorkloadResult,
    finish,
    register,
    sim_options,
    spec_args,
)
from tdpmmu.workloads.memstress import DEFAULT_GUEST_SEED, run_pass
from tdpmmu.workloads.td_lifecycle import add_common_arguments, build_unlaunched, phase_metric

__all__ = [
    "ACCEPT_BLOCK_PAGES",
    "COUNTERS",
    "PAGE_SIZES",
    "PSC_MAX_ENTRIES",
    "psc_requests",
    "snp_boot",
]

#: ``page_size`` values (``-p``): the guest_memfd folio, hence the largest RMP entry.
PAGE_SIZES = ("4K", "2M")

#: Counters reported per phase and as metrics (metric name -> ``stats`` counter).
COUNTERS = {
    "rmpupdates": "rmpupdate",
    "pvalidates": "pvalidate",
    "pvalidate_errors": "pvalidate_errors",
    "psc_exits": "conversions",
    "rmp_faults": "rmp_faults",
    "psmashes": "psmash",
    "npfs": "pf_taken",
}

_LAUNCH, _ACCEPT, _TOUCH = "Launch (image)", "Accept memory", "First touch"
_PAGES_2M = 512

#: Entries in one PSC request: what fits in the GHCB's shared buffer after the header
#: (Linux's ``VMGEXIT_PSC_MAX_ENTRY``).
PSC_MAX_ENTRIES = 253

#: Pages Linux accepts at once: one MAX_PAGE_ORDER (order 10, 4 MiB) block of the page
#: allocator, lazily when an allocation needs it, eagerly as boot frees memory to it.
ACCEPT_BLOCK_PAGES = 1024


def psc_requests(gfn: int, npages: int) -> list[list[tuple[int, int]]]:
    """The PSC requests a Linux SNP guest makes to accept ``[gfn, gfn + npages)``.

    Models ``set_pages_state`` for one accepted block: entries in address order, a 2 MiB entry
    where the page is 2 MiB-aligned and 512 pages remain, a 4 KiB entry otherwise, up to
    ``PSC_MAX_ENTRIES`` per request (one VMGEXIT); KVM (``snp_begin_psc``) turns each run of
    contiguous entries of one size into one KVM_HC_MAP_GPA_RANGE exit.

    Args:
        gfn: first 4 KiB guest page, >= 0.
        npages: pages, >= 0.

    Returns:
        list[list[tuple[int, int]]]: one list per request, of its exits as ``(gfn, npages)``.
        Never raises.
    """
    requests: list[list[tuple[int, int]]] = []
    g, end = gfn, gfn + npages
    while g < end:
        runs: list[tuple[int, int, int]] = []  # (gfn, npages, entry size)
        for _ in range(PSC_MAX_ENTRIES):
            if g >= end:
                break
            size = _PAGES_2M if g % _PAGES_2M == 0 and end - g >= _PAGES_2M else 1
            if runs and runs[-1][2] == size:
                runs[-1] = (runs[-1][0], runs[-1][1] + size, size)
            else:
                runs.append((g, size, size))
            g += size
        requests.append([(start, n) for start, n, _ in runs])
    return requests


def _accept_blocks(gfn: int, npages: int) -> list[tuple[int, int]]:
    """``[gfn, gfn + npages)`` cut at ``ACCEPT_BLOCK_PAGES`` boundaries: ``(gfn, npages)``."""
    out, g, end = [], gfn, gfn + npages
    while g < end:
        nxt = min(end, (g // ACCEPT_BLOCK_PAGES + 1) * ACCEPT_BLOCK_PAGES)
        out.append((g, nxt - g))
        g = nxt
    return out


def _accept_psc(vm: VM, blocks: list[tuple[int, int]]) -> int:
    """The guest's PSC requests to accept ``blocks`` (already private): returns the VMGEXITs."""
    n = 0
    for g, count in blocks:
        for request in psc_requests(g, count):
            n += 1
            for start, run in request:
                vm.map_gpa_range(start, run, private=True)
    return n


def _deltas(after: Stats, before: Stats) -> dict[str, int]:
    return {name: int(after[c] - before[c]) for name, c in COUNTERS.items()}


def _rmp_census(vm: VM, gfn: int, npages: int) -> dict[str, int]:
    """RMP entries over [gfn, gfn + npages): 2M entries (counted at their first page), 4K
    entries, and pages assigned to their own gpa, and of those the validated ones."""
    out = {"entries_2m": 0, "entries_4k": 0, "assigned": 0, "validated": 0}
    for g in range(gfn, gfn + npages):
        e = vm.rmp_entry(g)
        if e["assigned"] and e["gpa"] == g * coerce.PAGE_SIZE:
            out["assigned"] += 1
            out["validated"] += bool(e["validated"])
            if e["size"] == "2M":
                out["entries_2m"] += g % _PAGES_2M == 0
            else:
                out["entries_4k"] += 1
    return out


def snp_boot(
    vcpus: int = 1,
    bytes_per_vcpu: str | int = "1G",
    backing: str | int | None = None,
    image_bytes: str | int = "2M",
    eager: bool = False,
    page_size: str = "4K",
    **sim: Unpack[SimArgs],
) -> WorkloadResult:
    """An SNP guest boots and accepts its memory, lazily or eagerly (module docstring).

    Output lines (modeled seconds), after memstress's two harness lines: ``"%-30s: %.9fs"``
    for ``"Launch (image)"``, ``"Accept memory"`` (``eager`` only) and ``"First touch"``.

    Args:
        vcpus: vCPUs, each with its own slice, >= 1 (``-v``, default 1).
        bytes_per_vcpu: private memory each vCPU touches, bytes or a size string, a positive
            multiple of 4096 (``-b``, default ``"1G"``); ``vcpus x bytes_per_vcpu`` must be a
            multiple of the backing page.
        backing: host page size or a selftest ``-s`` name; None (default): ``"anonymous"``
            (4K) for 4K pages, ``"anonymous_hugetlb_2mb"`` for 2M pages (so 2M RMP entries
            are mapped by 2M NPT leaves; with 4K backing they are mapped by 4K leaves).
        image_bytes: the launch image, bytes or a size string, a positive multiple of 4096
            (``-i``, default ``"2M"``).
        eager: the boot vCPU validates all memory up front (``-e``; default False: lazily on
            first touch).
        page_size: ``"4K"`` or ``"2M"`` (``-p``, default ``"4K"``): the guest_memfd folio, so
            the RMP entries and PVALIDATEs are 4K or 2M (2M for 2M-aligned whole folios).
        **sim: the simulator's keyword arguments (``SimArgs``); ``vm_type`` must be
            ``"snp"``; ``hooks`` ``"gmem"`` (default) or ``"private"``; ``folio``, if given,
            must agree with ``page_size``.

    Returns:
        WorkloadResult: ``lines``; ``metrics``: ``<phase>_time_s`` and
        ``wall_<phase>_time_s`` per phase, ``rmpupdates``, ``pvalidates``,
        ``pvalidate_errors``, ``psc_exits``, ``rmp_faults``, ``psmashes``, ``npfs`` (over the
        whole run, and ``<phase>_<name>`` per phase), ``psc_requests`` (the guest's PSC
        VMGEXITs; ``<phase>_psc_requests`` for the phase that accepts), ``rmp_entries_2m``,
        ``rmp_entries_4k`` (over the test region), ``region_pages``, ``image_pages``;
        ``detail``: ``psc_requests`` per phase, ``accept_blocks`` (4 MiB blocks), ``checks``
        (``Checks`` records: every region page assigned to its gpa and validated, the image
        assigned, no PVALIDATE failure, ``VM.check()``; a failed check is recorded, not
        raised: the result's ``ok`` is False), per-phase counters, the region's and the
        image's RMP census, the run's summary.

    Raises:
        ConfigError: a bad value, naming it (``vcpus``, ``bytes_per_vcpu``, ``backing``,
            ``image_bytes``, ``page_size``, ``folio``, or a simulator argument); ``vm_type``
            for any VM type but snp.
        TypeError: a value of the wrong type (``eager`` not a bool, ...).
        VmBugged: an RMP instruction failed where KVM would BUG.
        OutOfMemory: page-table memory ran out.
    """
    run_start = time.perf_counter()
    options = sim_options(sim)
    coerce.flag(eager, "eager")
    if page_size not in PAGE_SIZES:
        raise ConfigError(f"page_size: must be one of {', '.join(PAGE_SIZES)}, got {page_size!r}")
    probe = VmSpec.create(**spec_args(sim))
    if probe.label != "snp":
        raise ConfigError(
            f"vm_type: snp_boot runs on snp, not {probe.label} (it needs SEV-SNP's RMP and "
            "the guest's PVALIDATE)"
        )
    folio_bytes = coerce.folio(page_size)
    if probe.folio is not None and probe.folio != folio_bytes:
        raise ConfigError(
            f"folio: {coerce.size_name(probe.folio)} contradicts page_size {page_size!r} "
            "(snp_boot sets the folio from page_size)"
        )
    if backing is None:
        backing = "anonymous_hugetlb_2mb" if page_size == "2M" else "anonymous"
    vm, spec, layout, image_pages = build_unlaunched(
        sim,
        vcpus=vcpus,
        bytes_per_vcpu=bytes_per_vcpu,
        backing=backing,
        image_bytes=image_bytes,
        vm_types=("snp",),
        workload="snp_boot",
        folio=page_size,
    )
    phases = (_LAUNCH, _ACCEPT, _TOUCH) if eager else (_LAUNCH, _TOUCH)
    clock = Clock(vm, sim.get("progress"), len(phases))
    counts: dict[str, dict[str, int]] = {}
    checks = Checks()
    start_stats = vm.stats

    # 1. The launch image, private from the start.
    before = vm.stats
    with clock.phase(_LAUNCH):
        vm.populate(0, image_pages, private=True)
    counts[_LAUNCH] = _deltas(vm.stats, before)

    # 2. Eager acceptance: the boot vCPU PVALIDATEs every page (or 2M page) of the region.
    blocks = _accept_blocks(layout.base_gfn, layout.npages)
    psc_vmgexits: dict[str, int] = {}
    if eager:
        step = _PAGES_2M if page_size == "2M" else 1
        gfns = np.arange(layout.base_gfn, layout.base_gfn + layout.npages, step, dtype=np.uint64)
        before = vm.stats
        with clock.phase(_ACCEPT):
            # Each block's PSC requests, then its PVALIDATEs (the order changes no cost).
            psc_vmgexits[_ACCEPT] = _accept_psc(vm, blocks)
            rets = vm.fault_batch(gfns, private=True, vcpu=0)
        counts[_ACCEPT] = _deltas(vm.stats, before)
        unmapped = int(np.count_nonzero(~np.isin(rets, (int(Ret.FIXED), int(Ret.SPURIOUS)))))
        checks.add(
            "every eager PVALIDATE's #NPF maps its page",
            not unmapped,
            f"{unmapped} of {gfns.size} PVALIDATE exits did not map their page"
            if unmapped
            else f"{gfns.size} PVALIDATEs",
        )

    # 3. Every vCPU touches its slice; lazily, each block is accepted (its PSC requests) by
    # the vCPU whose slice it starts in, and those requests lengthen that vCPU's pass.
    before = vm.stats
    psc_ns = [0.0] * layout.vcpus
    if not eager:
        psc_vmgexits[_TOUCH] = 0
        for g, count in blocks:
            vcpu = min((g - layout.base_gfn) // layout.pages_per_vcpu, layout.vcpus - 1)
            start_ns = clock.modeled_ns()
            psc_vmgexits[_TOUCH] += _accept_psc(vm, [(g, count)])
            psc_ns[vcpu] += clock.modeled_ns() - start_ns
    res = run_pass(vm, layout, options, seed=DEFAULT_GUEST_SEED, private=True)
    touch_s = max(
        res.modeled_s,
        max((v["modeled_ns"] + p) / 1e9 for v, p in zip(res.per_vcpu, psc_ns, strict=True)),
    )
    clock.record(_TOUCH, touch_s, res.wall_s)
    counts[_TOUCH] = _deltas(vm.stats, before)

    # Checks: the region all assigned to its gpa and validated; no PVALIDATE failed.
    region = _rmp_census(vm, layout.base_gfn, layout.npages)
    image = _rmp_census(vm, 0, image_pages)
    checks.add(
        "every region page is assigned to its gpa in the RMP",
        region["assigned"] == layout.npages,
        f"{region['assigned']} of {layout.npages} pages assigned",
    )
    checks.add(
        "every region page is validated",
        region["validated"] == layout.npages,
        f"{region['validated']} of {layout.npages} pages validated",
    )
    checks.add(
        "every image page is assigned in the RMP",
        image["assigned"] == image_pages,
        f"{image['assigned']} of {image_pages} image pages assigned "
        f"({image['validated']} validated)",
    )
    total = _deltas(vm.stats, start_stats)
    checks.add(
        "no PVALIDATE failed",
        not total["pvalidate_errors"],
        f"{total['pvalidate_errors']} PVALIDATE failures" if total["pvalidate_errors"] else "",
    )
    try:
        vm.check()
        checks.add("VM.check() holds after the run", True)
    except InvariantError as e:
        checks.add("VM.check() holds after the run", False, str(e))

    lines = layout.harness_lines() + [f"{label:<30}: {s:.9f}s" for label, s, _ in clock.phases]
    metrics: dict[str, float] = {}
    for label, modeled_s, wall_s in clock.phases:
        stem = phase_metric(label)
        metrics[f"{stem}_time_s"] = modeled_s
        metrics[f"wall_{stem}_time_s"] = wall_s
        for name, n in counts[label].items():
            metrics[f"{stem}_{name}"] = n
        if label in psc_vmgexits:
            metrics[f"{stem}_psc_requests"] = psc_vmgexits[label]
    metrics.update(total)
    metrics["psc_requests"] = sum(psc_vmgexits.values())
    metrics["rmp_entries_2m"] = region["entries_2m"]
    metrics["rmp_entries_4k"] = region["entries_4k"]
    metrics["region_pages"] = layout.npages
    metrics["image_pages"] = image_pages
    start, end = layout.region
    detail: dict[str, Any] = {
        "checks": checks.to_list(),
        "phase_counters": counts,
        "psc_requests": psc_vmgexits,
        "accept_blocks": len(blocks),
        "rmp_region": region,
        "rmp_image": image,
        "region": [start, end],
        "run": {"per_vcpu": [dict(d) for d in res.per_vcpu], "virtual": res.virtual},
    }
    return finish(
        "snp_boot",
        vm,
        spec,
        params={
            "vcpus": layout.vcpus,
            "bytes_per_vcpu": layout.bytes_per_vcpu,
            "backing": layout.backing,
            "image_bytes": image_pages * coerce.PAGE_SIZE,
            "eager": eager,
            "page_size": page_size,
        },
        options=options,
        lines=lines,
        metrics=metrics,
        clock=clock,
        run_start=run_start,
        detail=detail,
    )


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(
        parser, "default: anonymous for 4K pages, anonymous_hugetlb_2mb for 2M pages"
    )
    parser.add_argument(
        "-e",
        "--eager",
        action="store_true",
        help="the guest validates all memory at boot (accept_memory=eager); default: lazily, "
        "on first touch",
    )
    parser.add_argument(
        "-p",
        "--page-size",
        choices=PAGE_SIZES,
        default="4K",
        help="guest_memfd folio, so RMP entries and PVALIDATEs of 4K or 2M (default: 4K)",
    )


def _from_args(ns: argparse.Namespace) -> dict[str, Any]:
    return {
        "vcpus": ns.vcpus,
        "bytes_per_vcpu": ns.bytes_per_vcpu,
        "backing": ns.backing,
        "image_bytes": ns.image_bytes,
        "eager": ns.eager,
        "page_size": ns.page_size,
    }


register(
    Workload(
        name="snp_boot",
        command="snp-boot",
        selftest="tdpmmu",
        summary="an SEV-SNP guest boots: launch image, then memory accepted lazily on first "
        "touch or eagerly at boot (RMPUPDATE + PVALIDATE per 4K or 2M page)",
        run=snp_boot,
        vm_types=("snp",),
        add_arguments=_add_arguments,
        from_args=_from_args,
    )
)
