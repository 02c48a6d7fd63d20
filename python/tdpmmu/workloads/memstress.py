"""KVM's memstress harness (``lib/memstress.c``): the test region's layout and one guest pass.

The selftests' region sits at the **top of guest-physical space**: ``pages = vcpus x
bytes_per_vcpu / 4096`` at ``max_gfn - pages`` (one page below the last one, as memstress
does), aligned down to the backing page, split into ``slots`` equal memslots (ids counting up
after slot 0, which holds the guest's code and page tables). Each vCPU gets its own slice
(partitioned) or, with ``overlap``, walks the whole region. A TD's "top" is below the shared
bit (``VM.max_gfn``).

Each guest pass visits its pages in order or, with ``random_access``, as ``rand % pages`` from a
Park-Miller generator seeded with ``seed + vcpu``, writing with probability ``write_percent``
(``rand % 100 < write_percent``), the rest 8-byte reads. ``run_pass`` runs one or more passes
on every vCPU in virtual time (one simulated host thread, modeled-time order) or on real
threads (``clock="host"``).

The generator runs on across passes, as memstress's does (each vCPU seeds it once, before its
endless loop): the passes of one call continue one stream, and a later call continues it when
given ``rng_skip``, the draws each vCPU made before it (``draws_per_pass`` per pass). One
difference from memstress: a pass with ``write_percent`` 100 draws no write coin (memstress
draws one per access and always writes), so such a pass draws nothing in order and one draw
per page with ``random_access``.
"""

import dataclasses
import time
from typing import Any

from tdpmmu import coerce
from tdpmmu._core import ConfigError
from tdpmmu.sizes import format_size
from tdpmmu.vm import VM
from tdpmmu.vmspec import VmSpec, launch
from tdpmmu.vtime import VirtualOptions
from tdpmmu.workloads.base import SimArgs, spec_args
from tdpmmu.workloads.common import PAGE_SIZE, backing_source, virtual_summary

__all__ = ["DEFAULT_GUEST_SEED", "Layout", "PassResult", "build", "draws_per_pass", "run_pass"]

#: glibc's first ``random()`` value with its default state: the selftests' global seed
#: ("Random seed: 0x6b8b4567") unless a test sets one (``dirty_log_perf_test``: 1).
DEFAULT_GUEST_SEED = 0x6B8B4567

#: The guest generator's period in draws (2**31 - 2: 48271 is a primitive root of 2**31 - 1).
_RNG_PERIOD = (1 << 31) - 2

#: Slot 0 (code and page tables) is this large, or one backing page if larger.
_SLOT0_BYTES = 2 << 20


@dataclasses.dataclass(frozen=True, slots=True)
class Layout:
    """Where memstress puts the test region and how it divides it."""

    vcpus: int
    #: Bytes each vCPU walks (its slice, or with ``overlap`` the whole region).
    bytes_per_vcpu: int
    overlap: bool
    #: Host page size behind the region, bytes.
    backing: int
    #: First gfn of the region and its size in 4 KiB pages.
    base_gfn: int
    npages: int
    #: The region's memslot ids, in gfn order.
    slot_ids: tuple[int, ...]

    @property
    def pages_per_vcpu(self) -> int:
        """4 KiB pages each vCPU visits per pass (its slice, or all of them with overlap)."""
        return self.npages if self.overlap else self.npages // self.vcpus

    @property
    def region(self) -> tuple[int, int]:
        """Guest-physical [start, end) of the region, bytes ("guest physical test memory")."""
        return self.base_gfn * PAGE_SIZE, (self.base_gfn + self.npages) * PAGE_SIZE

    def slice(self, vcpu: int) -> tuple[int, int]:
        """(first gfn, pages) vCPU ``vcpu`` visits."""
        if self.overlap:
            return self.base_gfn, self.npages
        n = self.npages // self.vcpus
        return self.base_gfn + vcpu * n, n

    def slots(self) -> list[tuple[int, int, int]]:
        """(slot id, first gfn, pages) of each memslot of the region."""
        n = self.npages // len(self.slot_ids)
        return [(s, self.base_gfn + i * n, n) for i, s in enumerate(self.slot_ids)]

    def harness_lines(self) -> list[str]:
        """The harness's own lines ("Testing guest mode", "guest physical test memory")."""
        start, end = self.region
        return [
            "Testing guest mode: PA-bits:ANY, VA-bits:48,  4K pages",
            f"guest physical test memory: [{start:#x}, {end:#x})",
        ]


def build(
    sim: SimArgs,
    *,
    vcpus: int,
    bytes_per_vcpu: str | int,
    backing: str | int = "4K",
    slots: int = 1,
    overlap: bool = False,
    offset: str | int | None = None,
    private: bool = True,
    slot0_bytes: int = 0,
    launch_vm: bool = True,
    image_pages: int = 0,
) -> tuple[VM, VmSpec, Layout]:
    """Create and launch a VM with memstress's test region (``memstress_create_vm``).

    Args:
        sim: the simulator's keyword arguments (``SimArgs``).
        vcpus: vCPUs, >= 1 (at most 4096).
        bytes_per_vcpu: bytes per vCPU, a positive multiple of 4096 (``-b``); ``vcpus x
            bytes_per_vcpu`` must be a multiple of the backing page and of ``slots`` pages.
        backing: host page size or a selftest ``-s`` name (``BACKING_SOURCES``).
        slots: memslots the region is split into, >= 1 (``-x``).
        overlap: every vCPU walks the whole region (``-o``).
        offset: guest-physical address of the region (``-p``), bytes or a size string; None:
            the top of guest-physical space.
        private: on a confidential VM, the region is private memory (guest_memfd memslots,
            attributes private) as a confidential guest's memory starts; False: shared.
        slot0_bytes: slot 0 (from gfn 0: code, page tables, an initial image) is at least
            this many bytes (default 0: 2 MiB), rounded up to the backing page.
        launch_vm: launch the VM (``vmspec.launch``: a TD is finalized); False leaves that to
            the caller (e.g. to add an initial image first); guest memory is then already
            set private on a confidential VM.
        image_pages: 4 KiB pages of an initial image at gfn 0 in slot 0, added by the launch
            (a TD: TDH.MEM.PAGE.ADD before finalize), >= 0 (default 0); slot 0 grows to hold
            it. Only with ``launch_vm``.

    Returns:
        tuple[VM, VmSpec, Layout]: the VM (launched unless ``launch_vm`` is False), its spec
        and the layout. The region is aligned to the backing page and the guest_memfd folio.

    Raises:
        ConfigError: a bad value, naming the argument; the region does not fit.
        TypeError: a value of the wrong type.
    """
    nvcpus = coerce.count(vcpus, "vcpus")
    per_vcpu = coerce.size(bytes_per_vcpu, "bytes_per_vcpu")
    backing_bytes, _ = backing_source(backing)
    nslots = coerce.count(slots, "slots")
    flag = coerce.flag(overlap, "overlap")
    total = nvcpus * per_vcpu
    npages = total // PAGE_SIZE
    step = backing_bytes // PAGE_SIZE
    if total % backing_bytes:
        raise ConfigError(
            f"bytes_per_vcpu: vcpus x bytes_per_vcpu = {total} bytes must be a multiple of the "
            f"backing page ({format_size(backing_bytes)})"
        )
    if npages % nslots or (npages // nslots) % step:
        raise ConfigError(
            f"slots: the region's {npages} pages must split into {nslots} memslots of whole "
            f"backing pages ({format_size(backing_bytes)})"
        )
    image = coerce.count(image_pages, "image_pages", 0)
    if image and not launch_vm:
        raise ConfigError("image_pages: the launch adds the image; use it with launch_vm=True")
    slot0_bytes = max(slot0_bytes, image * PAGE_SIZE)
    slot0 = -(-max(_SLOT0_BYTES, slot0_bytes) // backing_bytes) * backing_bytes
    spec = VmSpec.create(**spec_args(sim), memory=slot0, vcpus=nvcpus, backing=backing_bytes)
    # 2M folios line up with 2M guest pages only if the region is aligned to them too.
    step = max(backing_bytes, spec.folio or PAGE_SIZE) // PAGE_SIZE
    vm = spec.build()
    if offset is None:
        # memstress: the last pages below the top of guest-physical space, one page spare.
        base = (vm.max_gfn - npages - 1) // step * step
    else:
        base = coerce.size(offset, "offset", positive=False) // PAGE_SIZE // step * step
    if base < slot0 // PAGE_SIZE or base + npages > vm.max_gfn:
        raise ConfigError(
            f"bytes_per_vcpu: a {format_size(total)} region at gfn {base:#x} does not fit "
            f"between slot 0 and max_gfn {vm.max_gfn:#x}"
        )
    gmem = private and spec.confidential
    per_slot = npages // nslots
    ids = tuple(
        vm.add_memslot(base + i * per_slot, per_slot, backing_bytes, gmem=gmem)
        for i in range(nslots)
    )
    if gmem:
        vm.set_memory_attributes(base, npages, private=True)
    if launch_vm:
        launch(vm, image_gfn=0, image_pages=image)
    elif spec.confidential:
        vm.set_memory_attributes(0, slot0 // PAGE_SIZE, private=True)
    return vm, spec, Layout(nvcpus, per_vcpu, flag, backing_bytes, base, npages, ids)


@dataclasses.dataclass(frozen=True, slots=True)
class PassResult:
    """One ``run_pass``: the slowest vCPU's modeled time, host time and per-vCPU records."""

    #: Modeled seconds from the start to the last vCPU's end (the selftest's clock).
    modeled_s: float
    #: Host wall seconds of the run (the native call that runs every vCPU).
    wall_s: float
    #: Per vCPU: ``modeled_ns``, ``faults``, ``pages`` (accesses), ``wall_s``.
    per_vcpu: tuple[dict[str, float], ...]
    #: Virtual-time runs: ``workloads.common.virtual_summary`` (else empty).
    virtual: dict[str, Any]


def draws_per_pass(pages_per_vcpu: int, *, random_access: bool, write_percent: int) -> int:
    """Draws each vCPU's generator makes in one pass (the engine's rule, here and only here).

    Per access: one draw for the page with ``random_access`` (``rand % pages``), then one for
    the write coin (``rand % 100 < write_percent``) unless ``write_percent`` is 100, when
    every access writes without a draw (memstress draws that coin too; see the module
    docstring). A pass makes ``pages_per_vcpu`` accesses, so ``passes`` passes of one call
    draw ``passes`` times this, and the next call continues the stream with ``rng_skip`` equal
    to the draws made so far.

    Args:
        pages_per_vcpu: accesses per vCPU per pass (``Layout.pages_per_vcpu``), >= 1.
        random_access: random page order (``-a``).
        write_percent: share of writes, 0..100 (``-w``).

    Returns:
        int: draws per vCPU per pass (0, ``pages_per_vcpu`` or twice it).

    Raises:
        ConfigError: ``pages_per_vcpu`` < 1 or ``write_percent`` outside 0..100.
        TypeError: a value of the wrong type.
    """
    pages = coerce.count(pages_per_vcpu, "pages_per_vcpu")
    wp = coerce.count(write_percent, "write_percent", 0, 100)
    per_access = int(coerce.flag(random_access, "random_access")) + int(wp < 100)
    return pages * per_access


def run_pass(
    vm: VM,
    layout: Layout,
    options: VirtualOptions,
    *,
    write_percent: int = 100,
    random_access: bool = False,
    seed: int = DEFAULT_GUEST_SEED,
    passes: int = 1,
    private: bool | None = None,
    rng_skip: int = 0,
) -> PassResult:
    """Run ``passes`` memstress passes on every vCPU at once (one "iteration").

    Args:
        vm: the VM ``build`` made.
        layout: its layout.
        options: the clock and virtual-time options (``SimArgs`` via ``sim_options``).
        write_percent: 0..100, the share of writes (``-w``).
        random_access: ``rand % pages`` order instead of sequential (``-a``).
        seed: the guest seed; vCPU ``i`` draws from ``seed + i``.
        passes: passes per vCPU, >= 1; each continues the previous one's random stream (the
            host clock runs one engine call per pass, each skipping the draws before it).
        private: the fault's kind (None: by the memory attributes).
        rng_skip: draws each vCPU's generator made before this call, >= 0 (default 0: start
            from the seed); a caller continuing a stream adds ``draws_per_pass`` per pass run.

    Returns:
        PassResult: times and per-vCPU records.

    Raises:
        ConfigError: a bad value, naming it.
        VmBugged: a KVM_BUG_ON during the pass.
    """
    coerce.count(passes, "passes")
    skip = coerce.count(rng_skip, "rng_skip", 0, (1 << 64) - 1)
    args = (
        layout.vcpus,
        layout.pages_per_vcpu,
        layout.base_gfn,
        layout.overlap,
        random_access,
        write_percent,
        seed,
        private,
    )
    start = time.perf_counter()
    if options.clock == "virtual":
        rec = vm.run_virtual(*args, rng_skip=skip, passes=passes, **options.run_kwargs())
        wall_s = time.perf_counter() - start
        per = tuple(
            {
                "modeled_ns": float(v["modeled_ns"]),
                "faults": float(v["faults"]),
                "pages": float(v["accesses"]),
                "wall_s": float(rec["wall_s"]),
            }
            for v in rec["vcpus"]
        )
        return PassResult(rec["elapsed_ns"] / 1e9, wall_s, per, virtual_summary(rec))
    modeled = 0.0
    recs: list[dict[str, float]] = []
    per_pass = draws_per_pass(
        layout.pages_per_vcpu, random_access=random_access, write_percent=write_percent
    )
    for k in range(passes):
        # The generator's period is 2**31 - 2 draws, so the skip is exact modulo it.
        out = vm.run_memstress(*args, rng_skip=(skip + k * per_pass) % _RNG_PERIOD)
        modeled += max(float(d["modeled_ns"]) for d in out) / 1e9
        recs = [
            {
                "modeled_ns": float(d["modeled_ns"]),
                "faults": float(d["faults"]),
                "pages": float(d["pages"]),
                "wall_s": float(d["wall_s"]),
            }
            for d in out
        ]
    return PassResult(modeled, time.perf_counter() - start, tuple(recs), {})
