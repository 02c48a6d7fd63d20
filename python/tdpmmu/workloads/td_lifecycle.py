"""A trust domain's whole life (``td_lifecycle``, tdpmmu's own workload ``td-lifecycle``).

No KVM selftest covers it end to end; it strings together what a VMM and a TDX guest do:

1. **Build initial image**: ``KVM_TDX_INIT_MEM_REGION`` adds the image (``-i``, at gfn 0, in
   slot 0 where memstress keeps the guest's code) page by page with ``TDH.MEM.PAGE.ADD``
   while the TD is not yet runnable (``VM.populate(..., private=True)``).
2. **Finalize**: ``KVM_TDX_FINALIZE_VM`` (``TDH.MR.FINALIZE``; the model charges nothing for
   it, the phase is there so its counters and time are visible).
3. **Run (lazy accept)**: every vCPU writes each page of its slice of the memstress region
   once; each first touch of a private page is an EPT violation that KVM resolves with
   ``TDH.MEM.PAGE.AUG`` (4K, or 2M with the ``huge_pages`` TDX option), after which the
   guest's ``TDG.MEM.PAGE.ACCEPT`` makes it usable. Virtual time by default (every vCPU
   simulated in modeled-time order).
4. **Convert to shared**: each vCPU's guest hands ``-c`` percent of its slice back to the
   host (TDG.VP.VMCALL<MapGPA> -> ``KVM_HC_MAP_GPA_RANGE`` exit -> the VMM sets the memory
   attributes shared and punches the guest_memfd hole): the private pages leave the S-EPT
   (BLOCK, TRACK, kick, REMOVE, ...); then the guest writes them as shared memory.
5. **Convert to private**: the same ranges go back (MapGPA to private, attributes private),
   and the guest's next write of each page faults, AUGs and ACCEPTs it again.
6. **Destroy**: the VM is torn down in the order the ``teardown`` TDX option selects
   (``"remove"``: each page BLOCKed, TRACKed and REMOVEd with the HKID assigned;
   ``"terminate_vm"``: KVM_TDX_TERMINATE_VM releases the HKID first and each page is
   RECLAIMed).

Phases 1, 2, 4, 5 and 6 are host-side (or, for 4 and 5, vCPU work the ledger sums) and are
timed by the VM's modeled ledger; phase 3 reports the slowest vCPU's modeled time. Each phase's
SEAMCALLs (``TDH.*`` counters, and the guest's ``TDG.*`` calls apart) go to ``detail``.
"""

import argparse
import re
import time
from collections.abc import Mapping
from typing import Any, Unpack

import numpy as np
import numpy.typing as npt

from tdpmmu import coerce
from tdpmmu._core import ConfigError, InvariantError
from tdpmmu.spte import is_shadow_present
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
from tdpmmu.workloads.common import PAGE_SIZE, backing_source
from tdpmmu.workloads.memstress import DEFAULT_GUEST_SEED, Layout, build, run_pass

__all__ = [
    "PHASES",
    "TEARDOWNS",
    "add_common_arguments",
    "build_unlaunched",
    "phase_metric",
    "td_lifecycle",
]

#: The phases of ``td_lifecycle``, in order, as its output lines label them.
PHASES = (
    "Build initial image",
    "Finalize",
    "Run (lazy accept)",
    "Convert to shared",
    "Convert to private",
    "Destroy",
)

#: The ``teardown`` TDX option's values (``-t``): upstream's order, KVM_TDX_TERMINATE_VM's.
TEARDOWNS = ("remove", "terminate_vm")

#: Slot 0 (the guest's code and page tables, and the initial image) is at least this large.
_SLOT0_BYTES = 2 << 20

_PAGES_2M = 512


def phase_metric(label: str) -> str:
    """The snake_case metric stem of a phase label (``"Run (lazy accept)"`` ->
    ``"run_lazy_accept"``).

    Args:
        label: a phase label, e.g. one of ``PHASES``.

    Returns:
        str: lower case, runs of other characters replaced by one underscore. Never raises.
    """
    return re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")


def build_unlaunched(
    sim: SimArgs,
    *,
    vcpus: int,
    bytes_per_vcpu: str | int,
    backing: str | int,
    image_bytes: str | int,
    vm_types: tuple[str, ...],
    workload: str,
    folio: str | int | None = None,
    tdx: Mapping[str, object] | None = None,
) -> tuple[VM, VmSpec, Layout, int]:
    """Create a confidential VM with memstress's test region, *not yet launched*.

    ``memstress.build`` launches the VM (a TD is finalized inside it); a lifecycle workload
    must add the initial image first and time the launch itself, so this does what it does
    up to the launch: slot 0 from gfn 0 holds the image (at least 2 MiB, rounded up to the
    backing page), the region of ``vcpus x bytes_per_vcpu`` sits at the top of
    guest-physical space in one guest_memfd memslot, aligned to the larger of the backing
    page and the folio (so 2M folios line up with 2M guest pages), and all guest memory is
    set private as a VMM sets up a confidential guest.

    Args:
        sim: the simulator's keyword arguments (``SimArgs``).
        vcpus: vCPUs, >= 1.
        bytes_per_vcpu: bytes per vCPU slice, a positive multiple of 4096 (size strings
            accepted); ``vcpus x bytes_per_vcpu`` must be a multiple of the backing page.
        backing: host page size or a selftest ``-s`` name (``BACKING_SOURCES``).
        image_bytes: initial image, a positive multiple of 4096 (size strings accepted).
        vm_types: the VM type labels the caller runs on (``VmSpec.label``).
        workload: the caller's name, for error messages.
        folio: guest_memfd folio (``"4K"``/``"2M"``) overriding ``sim["folio"]``; None keeps
            it.
        tdx: TDX options merged over ``sim["tdx"]`` (None: none).

    Returns:
        tuple[VM, VmSpec, Layout, int]: the VM, its spec, the region's layout and the image's
        size in 4 KiB pages.

    Raises:
        ConfigError: a bad value, naming it; ``vm_type`` when the VM type is not one of
            ``vm_types``; the region does not fit below ``max_gfn``.
        TypeError: a value of the wrong type.
        OutOfMemory: the page tables could not be committed.
    """
    image = coerce.size(image_bytes, "image_bytes")
    args: SimArgs = {**sim}
    if tdx is not None:
        args["tdx"] = {**(args.get("tdx") or {}), **tdx}
    if folio is not None:
        args["folio"] = folio
    label = VmSpec.create(**spec_args(args), memory=_SLOT0_BYTES).label
    if label not in vm_types:
        raise ConfigError(
            f"vm_type: {workload} runs on {' or '.join(vm_types)}, not {label}"
            + (" (it needs a TD and the TDX module)" if "tdx" in vm_types else "")
            + (" (it needs SEV-SNP's RMP and PVALIDATE)" if "snp" in vm_types else "")
        )
    vm, spec, layout = build(
        args,
        vcpus=vcpus,
        bytes_per_vcpu=bytes_per_vcpu,
        backing=backing,
        slot0_bytes=image,
        launch_vm=False,
    )
    return vm, spec, layout, image // PAGE_SIZE


def _delta(after: Stats, before: Stats, prefix: str) -> dict[str, int]:
    return {
        k: int(after[k] - before[k])
        for k in after
        if k.startswith(prefix) and after[k] != before[k]
    }


def _present(vm: VM, gfn: int, npages: int, private: bool) -> npt.NDArray[np.bool_]:
    """Whether each page of [gfn, gfn + npages) has a present leaf in that tree."""
    return np.fromiter(
        (is_shadow_present(vm.spte(g, private)) for g in range(gfn, gfn + npages)),
        dtype=np.bool_,
        count=npages,
    )


#: S-EPT leaf states as small codes (0: no leaf covers the page; ``_TABLE``: not a leaf).
_STATE_CODES = {"MAPPED": 1, "PENDING": 2, "BLOCKED": 3, "TABLE": 255, "BLOCKED_TABLE": 255}
_STATE_NAMES = {0: "none", 1: "MAPPED", 2: "PENDING", 3: "BLOCKED"}
_TABLE = 255


def _sept_leaves(vm: VM, gfn: int, npages: int) -> tuple[npt.NDArray[np.uint8], int]:
    """The S-EPT leaf state covering each page of [gfn, gfn + npages) (``_STATE_CODES``) and
    the 4 KiB pages all S-EPT leaves of the TD cover."""
    state = np.zeros(npages, dtype=np.uint8)
    entries = vm.sept_entries()
    gfns = np.array([e[0] for e in entries], dtype=np.int64)
    levels = np.array([e[1] for e in entries], dtype=np.int64)
    names = np.array([e[2] for e in entries], dtype=np.str_)
    codes = np.full(len(entries), 3, dtype=np.uint8)  # any other leaf state: "BLOCKED"
    for st, code in _STATE_CODES.items():
        codes[names == st] = code
    leaf = codes != _TABLE
    spans = np.where(leaf, _PAGES_2M ** (levels - 1), 0)
    small = leaf & (levels == 1) & (gfns >= gfn) & (gfns < gfn + npages)
    state[gfns[small] - gfn] = codes[small]
    for i in np.flatnonzero(leaf & (levels > 1)):
        lo, hi = max(int(gfns[i]), gfn), min(int(gfns[i] + spans[i]), gfn + npages)
        if lo < hi:
            state[lo - gfn : hi - gfn] = codes[i]
    return state, int(spans.sum())


class _Checker:
    """The workload's own checks, recorded in ``results`` (a ``Checks``), never raised."""

    def __init__(self, vm: VM, layout: Layout, module: bool) -> None:
        self.vm, self.layout, self.module = vm, layout, module
        self.results = Checks()

    def fail(self, name: str, why: str) -> None:
        self.results.add(name, False, why)

    def ok(self, name: str, what: str) -> None:
        self.results.add(name, True, what)

    def vm_check(self, when: str) -> None:
        name = f"VM.check() holds {when}"
        try:
            self.vm.check()
        except InvariantError as e:
            self.fail(name, str(e))
            return
        self.ok(name, "")

    def attributes(self, name: str, shared: list[tuple[int, int]]) -> int:
        """Every page of the region is mapped in exactly the tree its attribute says: the
        mirror (and the S-EPT, accepted) when private, the direct root when shared. Returns
        the 4 KiB pages the S-EPT's leaves cover (0 without the TDX module)."""
        lay = self.layout
        want_shared = np.zeros(lay.npages, dtype=np.bool_)
        for g, n in shared:
            want_shared[g - lay.base_gfn : g - lay.base_gfn + n] = True
        nshared = int(want_shared.sum())
        what = f"{lay.npages - nshared} private pages mapped, {nshared} shared"
        sept_pages = 0
        if self.module:
            # The S-EPT is the TDX module's truth; VM.check() (run after this) verifies the
            # mirror root agrees with it entry for entry.
            state, sept_pages = _sept_leaves(self.vm, lay.base_gfn, lay.npages)
            want = np.where(want_shared, 0, _STATE_CODES["MAPPED"]).astype(np.uint8)
            bad = np.flatnonzero(state != want)
            if bad.size:
                i = int(bad[0])
                self.fail(
                    name,
                    f"gfn {lay.base_gfn + i:#x} ({'shared' if want_shared[i] else 'private'}) "
                    f"has S-EPT state {_STATE_NAMES[int(state[i])]}",
                )
                return sept_pages
            # Leaves of every root minus the mirror's (= the S-EPT's) are the direct root's:
            # they must map exactly the shared pages, each of which must be mapped.
            s = self.vm.stats
            leaves = int(s["pages_4k"]) + 512 * int(s["pages_2m"]) + (1 << 18) * int(s["pages_1g"])
            direct = leaves - sept_pages
            what += "; S-EPT: every private page MAPPED (accepted), no leaf for shared ones"
        else:
            priv = _present(self.vm, lay.base_gfn, lay.npages, True)
            bad = np.flatnonzero(priv == want_shared)
            if bad.size:
                g = lay.base_gfn + int(bad[0])
                self.fail(
                    name, f"gfn {g:#x}: mirror leaf {'present' if priv[bad[0]] else 'absent'}"
                )
                return sept_pages
            direct = int(_present(self.vm, lay.base_gfn, lay.npages, False).sum())
        for g, n in shared:
            missing = np.flatnonzero(~_present(self.vm, g, n, False))
            if missing.size:
                self.fail(name, f"shared gfn {g + int(missing[0]):#x} is not mapped")
                return sept_pages
        if direct != nshared:
            self.fail(name, f"the direct root maps {direct} pages, {nshared} are shared")
            return sept_pages
        self.ok(name, what)
        return sept_pages


def td_lifecycle(
    vcpus: int = 1,
    bytes_per_vcpu: str | int = "1G",
    backing: str | int | None = None,
    image_bytes: str | int = "2M",
    convert_percent: int = 10,
    teardown: str | None = None,
    **sim: Unpack[SimArgs],
) -> WorkloadResult:
    """A TD from build to destroy: initial image, finalize, lazy accept, conversions, teardown.

    The module docstring describes the six phases. Output lines (modeled seconds): one
    ``"%-30s: %.9fs"`` line per phase of ``PHASES``, after memstress's "Testing guest mode"
    and "guest physical test memory" lines.

    Args:
        vcpus: vCPUs, each with its own slice of the region, >= 1 (``-v``, default 1).
        bytes_per_vcpu: private memory each vCPU touches, bytes or a size string, a positive
            multiple of 4096 (``-b``, default ``"1G"``); ``vcpus x bytes_per_vcpu`` must be a
            multiple of the backing page.
        backing: host page size or a selftest ``-s`` name (``BACKING_SOURCES``); None
            (default): ``"anonymous"`` (4K), or ``"anonymous_hugetlb_2mb"`` when the
            ``huge_pages`` TDX option is set (2M private pages need 2M backing).
        image_bytes: the initial image added with TDH.MEM.PAGE.ADD before finalize, bytes or
            a size string, a positive multiple of 4096 (``-i``, default ``"2M"``).
        convert_percent: share of each vCPU's slice (its first pages) converted private ->
            shared and back, 0..100 (``-c``, default 10; 0 leaves the two phases empty).
        teardown: ``"remove"`` or ``"terminate_vm"`` (``-t``): the ``teardown`` TDX option;
            None (default): ``sim["tdx"]``'s, else ``"remove"`` (upstream).
        **sim: the simulator's keyword arguments (``SimArgs``): ``vm_type`` must be
            ``"tdx"``; ``hooks`` any TDX design (``"mirror"``, ``"private"``, a
            ``HookDesign`` or a hook object, which runs on host threads); ``tdx`` options
            (``huge_pages`` makes lazy accept map 2M and sets the folio to 2M unless
            ``folio`` is given).

    Returns:
        WorkloadResult: ``lines``; ``metrics``: ``<phase>_time_s`` and ``wall_<phase>_time_s``
        per phase (``phase_metric``), ``<phase>_seamcalls`` (host SEAMCALLs of the phase),
        ``image_pages``, ``region_pages``, ``converted_pages``, ``accepts`` (TDG.MEM.PAGE.ACCEPT
        over the run); ``detail``: ``checks`` (``Checks`` records: a page not accepted after
        the run, trees that disagree with the attributes after a conversion, ``VM.check()``,
        something left behind by the teardown — the ``private`` design leaves the S-EPT
        tables, since teardown zaps fire no hook under it; a failed check is recorded, not
        raised: the result's ``ok`` is False), ``seamcalls`` and ``tdcalls`` (per phase, by
        leaf name), ``teardown``, the region and, in virtual time, the run's summary.

    Raises:
        ConfigError: a bad value, naming it (``vcpus``, ``bytes_per_vcpu``, ``backing``,
            ``image_bytes``, ``convert_percent``, ``teardown``, or a simulator argument);
            ``vm_type`` for any VM type but tdx.
        TypeError: a value of the wrong type.
        VmBugged: a SEAMCALL failed (KVM_BUG_ON).
        OutOfMemory: page-table memory ran out.
    """
    run_start = time.perf_counter()
    options = sim_options(sim)
    pct = coerce.count(convert_percent, "convert_percent", 0, 100)
    tdx_extra: dict[str, object] = {}
    if teardown is not None:
        if teardown not in TEARDOWNS:
            raise ConfigError(f"teardown: must be one of {', '.join(TEARDOWNS)}, got {teardown!r}")
        given = (sim.get("tdx") or {}).get("teardown")
        if given is not None and given != teardown:
            raise ConfigError(f"teardown: {teardown!r} contradicts tdx['teardown'] = {given!r}")
        tdx_extra["teardown"] = teardown
    # Whether 2M private pages are asked for decides the default folio and backing.
    probe = VmSpec.create(**spec_args(sim))
    if probe.label != "tdx":
        raise ConfigError(
            f"vm_type: td_lifecycle runs on tdx, not {probe.label} (it needs a TD and the "
            "TDX module: TDH.MEM.PAGE.ADD, finalize, AUG/ACCEPT, teardown)"
        )
    huge = bool(probe.tdx.get("huge_pages", False))
    if backing is None:
        backing = "anonymous_hugetlb_2mb" if huge else "anonymous"
    folio = "2M" if huge and probe.folio is None else None
    vm, spec, layout, image_pages = build_unlaunched(
        sim,
        vcpus=vcpus,
        bytes_per_vcpu=bytes_per_vcpu,
        backing=backing,
        image_bytes=image_bytes,
        vm_types=("tdx",),
        workload="td_lifecycle",
        folio=folio,
        tdx=tdx_extra or None,
    )
    order = str(spec.tdx.get("teardown", TEARDOWNS[0]))
    module = spec.hook_object is None
    checks = _Checker(vm, layout, module)
    clock = Clock(vm, sim.get("progress"), len(PHASES))
    seamcalls: dict[str, dict[str, int]] = {}
    tdcalls: dict[str, dict[str, int]] = {}

    def account(label: str, before: Stats) -> None:
        after = vm.stats
        seamcalls[label] = _delta(after, before, "TDH.")
        tdcalls[label] = _delta(after, before, "TDG.")

    # 1. The initial image: PAGE.ADD while the TD is not runnable.
    before = vm.stats
    with clock.phase(PHASES[0]):
        vm.populate(0, image_pages, private=True)
    account(PHASES[0], before)
    if module:
        added = seamcalls[PHASES[0]].get("TDH.MEM.PAGE.ADD", 0)
        name = "every image page is added with TDH.MEM.PAGE.ADD"
        if added != image_pages:
            checks.fail(name, f"{added} TDH.MEM.PAGE.ADD for {image_pages} image pages")
        else:
            checks.ok(name, f"{image_pages} pages added")

    # 2. Finalize.
    before = vm.stats
    with clock.phase(PHASES[1]):
        vm.finalize()
    account(PHASES[1], before)

    # 3. The vCPUs touch their slices: AUG + ACCEPT on every first touch.
    before = vm.stats
    res = run_pass(vm, layout, options, seed=DEFAULT_GUEST_SEED, private=True)
    clock.record(PHASES[2], res.modeled_s, res.wall_s)
    account(PHASES[2], before)
    checks.attributes("after the run, every page is private, mapped and accepted", [])
    checks.vm_check("after the run")

    # 4./5. Conversions: the first convert_percent of each vCPU's slice.
    per_slice = layout.npages // layout.vcpus
    conv = per_slice * pct // 100
    ranges = [(layout.base_gfn + v * per_slice, conv) for v in range(layout.vcpus)] if conv else []

    def touch(private: bool) -> None:
        for g, n in ranges:
            vm.run_memstress(1, n, g, False, False, 100, DEFAULT_GUEST_SEED, private)

    before = vm.stats
    with clock.phase(PHASES[3]):
        for g, n in ranges:
            vm.set_memory_attributes(g, n, private=False)
            vm.punch_hole(g, n)
        touch(False)
    account(PHASES[3], before)
    checks.attributes("after converting to shared, the mappings agree with the attributes", ranges)
    checks.vm_check("after converting to shared")

    before = vm.stats
    with clock.phase(PHASES[4]):
        for g, n in ranges:
            vm.set_memory_attributes(g, n, private=True)
        touch(True)
    account(PHASES[4], before)
    mapped = checks.attributes(
        "after converting back to private, the mappings agree with the attributes", []
    )
    checks.vm_check("after converting back to private")

    # 6. Destroy, in the teardown order asked for.
    tables = int(vm.stats["sept_tables"])
    before = vm.stats
    with clock.phase(PHASES[5]):
        vm.destroy()
    account(PHASES[5], before)
    after = vm.stats
    left = {
        k: int(after[k])
        for k in ("sept_tables", "external_spt_leaked", "page_table_bytes", "pages_4k", "pages_2m")
        if after[k]
    }
    name = "destroy reclaims every table, leaf and S-EPT page"
    why = [f"the teardown ({order}) left {left}"] if left else []
    if module:
        cleared = int(after["page_clear"] - before["page_clear"])
        if cleared != mapped + tables:
            why.append(
                f"{cleared} pages cleared for {mapped} private pages and {tables} S-EPT tables"
            )
    if why:
        checks.fail(name, "; ".join(why))
    else:
        checks.ok(
            name,
            f"teardown {order}: no tables, leaves or S-EPT left"
            + (f"; {mapped} private pages and {tables} S-EPT tables cleared" if module else ""),
        )
    checks.vm_check("after destroy")

    lines = layout.harness_lines() + [f"{label:<30}: {s:.9f}s" for label, s, _ in clock.phases]
    metrics: dict[str, float] = {}
    for label, modeled_s, wall_s in clock.phases:
        stem = phase_metric(label)
        metrics[f"{stem}_time_s"] = modeled_s
        metrics[f"wall_{stem}_time_s"] = wall_s
        metrics[f"{stem}_seamcalls"] = sum(seamcalls[label].values())
    metrics["image_pages"] = image_pages
    metrics["region_pages"] = layout.npages
    metrics["converted_pages"] = conv * len(ranges)
    metrics["accepts"] = sum(d.get("TDG.MEM.PAGE.ACCEPT", 0) for d in tdcalls.values())
    start, end = layout.region
    detail: dict[str, Any] = {
        "checks": checks.results.to_list(),
        "seamcalls": seamcalls,
        "tdcalls": tdcalls,
        "teardown": order,
        "huge_pages": huge,
        "region": [start, end],
        "converted_ranges": [list(r) for r in ranges],
        "run": {"per_vcpu": [dict(d) for d in res.per_vcpu], "virtual": res.virtual},
    }
    return finish(
        "td_lifecycle",
        vm,
        spec,
        params={
            "vcpus": layout.vcpus,
            "bytes_per_vcpu": layout.bytes_per_vcpu,
            "backing": layout.backing,
            "image_bytes": image_pages * PAGE_SIZE,
            "convert_percent": pct,
            "teardown": order,
        },
        options=options,
        lines=lines,
        metrics=metrics,
        clock=clock,
        run_start=run_start,
        detail=detail,
    )


# ----- command line ---------------------------------------------------------------------------


def _size_arg(text: str) -> str:
    try:
        coerce.size(text, "size")
    except (ConfigError, TypeError) as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("size: ")) from None
    return text


def _vcpus_arg(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 1 <= value <= 4096:
        raise argparse.ArgumentTypeError(f"must be in 1..4096, got {value}")
    return value


def _percent_arg(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"must be in 0..100, got {value}")
    return value


def _backing_arg(text: str) -> str:
    try:
        backing_source(text)
    except (ConfigError, TypeError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def add_common_arguments(parser: argparse.ArgumentParser, default_backing: str) -> None:
    """Add the memstress-style flags both lifecycle workloads share to ``parser``:
    ``-v/--vcpus`` (1), ``-b/--bytes-per-vcpu`` (1G), ``-s/--backing`` and
    ``-i/--image-bytes`` (2M).

    Args:
        parser: the workload's subparser.
        default_backing: what ``-s``'s help says its default is.

    Returns:
        None. Never raises.
    """
    parser.add_argument(
        "-v", "--vcpus", type=_vcpus_arg, default=1, help="number of vCPUs (default: 1)"
    )
    parser.add_argument(
        "-b",
        "--bytes-per-vcpu",
        type=_size_arg,
        default="1G",
        help="private memory per vCPU, e.g. 64M, 1G (powers of 1024; default: 1G)",
    )
    parser.add_argument(
        "-s",
        "--backing",
        type=_backing_arg,
        default=None,
        help="backing source: anonymous, anonymous_thp, anonymous_hugetlb, "
        f"anonymous_hugetlb_2mb, anonymous_hugetlb_1gb, or 4K/2M/1G ({default_backing})",
    )
    parser.add_argument(
        "-i",
        "--image-bytes",
        type=_size_arg,
        default="2M",
        help="initial (launch) image, at gfn 0 (default: 2M)",
    )


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(
        parser, "default: anonymous, or anonymous_hugetlb_2mb with --tdx huge_pages=true"
    )
    parser.add_argument(
        "-c",
        "--convert-percent",
        type=_percent_arg,
        default=10,
        help="share of each vCPU's memory converted private->shared->private, 0..100 (default: 10)",
    )
    parser.add_argument(
        "-t",
        "--teardown",
        choices=TEARDOWNS,
        default=None,
        help="teardown order: remove (upstream: BLOCK/TRACK/REMOVE each page with the HKID "
        "assigned) or terminate_vm (KVM_TDX_TERMINATE_VM: HKID released first, pages "
        "RECLAIMed); default: the tdx option's, else remove",
    )


def _from_args(ns: argparse.Namespace) -> dict[str, Any]:
    return {
        "vcpus": ns.vcpus,
        "bytes_per_vcpu": ns.bytes_per_vcpu,
        "backing": ns.backing,
        "image_bytes": ns.image_bytes,
        "convert_percent": ns.convert_percent,
        "teardown": ns.teardown,
    }


register(
    Workload(
        name="td_lifecycle",
        command="td-lifecycle",
        selftest="tdpmmu",
        summary="a TD's life: initial image (PAGE.ADD), finalize, lazy accept (AUG + ACCEPT), "
        "private<->shared conversions, destroy in either teardown order",
        run=td_lifecycle,
        vm_types=("tdx",),
        add_arguments=_add_arguments,
        from_args=_from_args,
    )
)
