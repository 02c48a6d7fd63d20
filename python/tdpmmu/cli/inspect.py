"""``inspect GFN``: one guest page as the simulated MMU holds it.

Builds a small traced VM as a VMM would (``tdpmmu.vmspec.launch``), optionally converts the
page and faults it, then prints the page's walk through the direct (shared) root and the mirror
(private) root with every SPTE decoded (``tdpmmu.spte.decode``), the TDX S-EPT entries on its
path (``VM.sept_entries``), its SEV-SNP RMP entry (``VM.rmp_entry``) and the trace events about
it (``VM.trace_events``); ``--json`` prints the same as one envelope.
"""

import argparse
import time
from collections.abc import Mapping
from typing import Any

from tdpmmu import render, spte
from tdpmmu._core import ConfigError
from tdpmmu.cli import common
from tdpmmu.results import Envelope
from tdpmmu.ret import Ret
from tdpmmu.sizes import BACKING_SIZES
from tdpmmu.vm import VM
from tdpmmu.vmspec import VmSpec, launch

__all__ = ["inspect_gfn"]

#: 4 KiB pages one entry at each level covers: 1, 512, 512**2, ...
_ENTRY_PAGES = {level: 512 ** (level - 1) for level in range(1, 6)}


def add_inspect(sub: Any) -> None:
    p = sub.add_parser(
        "inspect",
        help="one gfn: its walk through each root (SPTEs decoded), S-EPT/RMP entry and trace",
        description="Build a small traced VM (set up as a VMM would: a confidential VM's memory "
        "private, a TD finalized), optionally make the page private or shared and fault it, then "
        "print the gfn's walk through the direct (shared) root and the mirror (private) root "
        "with each SPTE decoded, the TDX S-EPT entries on its path, the SEV-SNP RMP entry and "
        "the trace events about it. Nothing is faulted unless --fault is given.",
        epilog=common.EPILOG,
    )
    p.add_argument(
        "gfn",
        type=common.non_negative_int,
        metavar="GFN",
        help="the guest page-frame number (4 KiB page; guest-physical address >> 12), decimal "
        "or 0x hex, below memory / 4096",
    )
    p.add_argument(
        "--memory",
        type=common.size,
        default="64M",
        metavar="SIZE",
        help="guest memory in bytes, with an optional K/M/G/T suffix (powers of 1024); a "
        "multiple of 4K and of the backing page (default: 64M)",
    )
    p.add_argument(
        "--backing",
        choices=tuple(BACKING_SIZES),
        default="4K",
        help=f"host page size behind guest memory: {', '.join(BACKING_SIZES)} (default: 4K)",
    )
    p.add_argument(
        "-v",
        "--vcpus",
        type=common.positive_int,
        default=1,
        help="number of vCPUs (default: 1)",
    )
    common.add_vm_flags(p)
    attr = p.add_mutually_exclusive_group()
    attr.add_argument(
        "--private",
        action="store_true",
        help="make the page private first (KVM_SET_MEMORY_ATTRIBUTES; a confidential VM's "
        "memory already starts private; a default VM refuses)",
    )
    attr.add_argument(
        "--shared",
        action="store_true",
        help="make the page shared first (a conversion request, as the guest's MapGPA / page "
        "state change asks)",
    )
    p.add_argument(
        "--fault",
        action="store_true",
        help="take a guest write fault on the page (private or shared as its memory attribute "
        "says) before inspecting it",
    )
    p.add_argument(
        "--read", action="store_true", help="with --fault: a read fault instead of a write"
    )
    common.add_levels_seed_cost(p, "exit_entry_ns=800")
    common.add_output_flags(p, progress=False)
    p.set_defaults(run=run_inspect)


def run_inspect(args: argparse.Namespace) -> int:
    rec = inspect_gfn(
        args.gfn,
        vm_type=args.vm_type,
        memory=args.memory,
        backing=args.backing,
        vcpus=args.vcpus,
        hooks=args.hooks,
        tdx=dict(args.tdx) or None,
        mirror=args.mirror,
        folio=args.folio,
        private=True if args.private else False if args.shared else None,
        fault=args.fault,
        write=not args.read,
        levels=args.levels,
        seed=args.seed,
        costs=common.costs(args),
    )
    text = rec.to_json()
    common.write_out(args.out, text)
    if args.json:
        print(text)
    else:
        print("\n".join(text_lines(rec)))
    return 0


def _entry(level: int, value: int, index: int) -> dict[str, Any]:
    d = dict(spte.decode(value))
    leaf = bool(d["present"]) and (level == 1 or bool(d["large"]))
    return {
        "level": level,
        "index": index,
        "spte": value,
        "leaf": leaf,
        "decoded": {k: v for k, v in d.items() if k != "value"},
    }


def _walk(vm: VM, gfn: int, private: bool) -> list[dict[str, Any]]:
    # A direct root of a VM with a shared bit is walked at gfn | shared_bit (its alias).
    at = gfn if private or not vm.shared_bit else gfn | vm.shared_bit
    return [
        _entry(level, value, (at >> (9 * (level - 1))) & 511)
        for level, value in vm.walk(gfn, private=private)
    ]


def _covers(first: int, level: int, gfn: int) -> bool:
    return level >= 1 and first <= gfn < first + _ENTRY_PAGES.get(level, 0)


def inspect_gfn(
    gfn: int,
    *,
    vm_type: str = "default",
    memory: str | int = "64M",
    backing: str | int = "4K",
    vcpus: int = 1,
    hooks: object = None,
    tdx: Mapping[str, object] | None = None,
    mirror: bool = False,
    folio: str | int | None = None,
    private: bool | None = None,
    fault: bool = False,
    write: bool = True,
    levels: int = 4,
    seed: int = 0,
    costs: Any = None,
) -> Envelope:
    """Everything the simulated MMU holds about one guest page, on a new traced VM.

    The VM is built (``VmSpec.create(..., trace=True)``) and launched as a VMM would
    (``tdpmmu.vmspec.launch``: a confidential VM's memory private, a TD finalized). Then
    ``private`` sets the page's memory attribute, ``fault`` takes a guest fault on it, and the
    page's state is read: the walk through the direct root and (on a VM with one) the mirror
    root, each SPTE decoded; the S-EPT entries whose range covers the page (a TD's, or
    sw_protected+mirror's software tree); the RMP entry (SNP); the trace events whose entry
    covers the page.

    Args:
        gfn: the 4 KiB guest page, ``0 <= gfn < memory / 4096``.
        vm_type, memory, backing, vcpus, hooks, tdx, mirror, folio, levels, seed, costs:
            ``tdpmmu.VmSpec.create``'s (default VM: 64 MiB, 4K backing, 1 vCPU).
        private: True: make the page private first; False: shared (a conversion); None
            (default): leave it as launched.
        fault: take a guest fault on the page (on vCPU 0, of the kind its attribute says).
        write: the fault is a write (default True) or a read.

    Returns:
        tdpmmu.results.Envelope: workload ``"inspect"``; ``config`` holds the VM and the
        inspection's arguments, ``result`` the fault (if any), ``walks`` (root name ->
        entries with level, index, spte, leaf and decoded fields), ``sept``, ``rmp`` and
        ``trace`` (plus ``vm_wide_events``, the count of TD-wide events not about one page).

    Raises:
        ConfigError: a bad argument (naming it), ``gfn`` beyond the guest's memory, or what
            the engine refuses (e.g. ``private`` on a default VM).
    """
    start = time.perf_counter()
    spec = VmSpec.create(
        vm_type=vm_type,
        memory=memory,
        vcpus=vcpus,
        levels=levels,
        backing=backing,
        hooks=hooks,
        costs=costs,
        seed=seed,
        trace=True,
        tdx=tdx,
        mirror=mirror,
        folio=folio,
    )
    pages = spec.memory // 4096
    if not isinstance(gfn, int) or not 0 <= gfn < pages:
        raise ConfigError(f"gfn: {gfn} is outside guest memory (0..{pages - 1})")
    vm = spec.build()
    launch(vm)
    if private is not None:
        if private and vm.vm_type == "default":
            raise ConfigError("private: a default VM has no private memory (vm_type)")
        vm.set_memory_attributes(gfn, 1, private=private)
    result: dict[str, Any] = {"gfn": gfn, "gpa": gfn << 12}
    if fault:
        f = vm.fault(gfn, write=write)
        result["fault"] = {
            "ret": Ret(f.ret).name,
            "level": f.level,
            "private": f.private,
            "retries": f.retries,
            "modeled_ns": f.modeled_ns,
            "spte": f.spte,
        }
    has_mirror = vm.vm_type == "tdx" or vm.mirror
    walks = {"direct": _walk(vm, gfn, private=False)}
    if has_mirror:
        walks["mirror"] = _walk(vm, gfn, private=True)
    result["walks"] = walks
    result["roots"] = [dict(r) for r in vm.roots()]
    if has_mirror:
        result["sept"] = [
            {"gfn": g, "level": level, "state": state, "pfn": pfn}
            for g, level, state, pfn in vm.sept_entries()
            if _covers(g, level, gfn)
        ]
    if vm.vm_type == "snp":
        try:
            result["rmp"] = dict(vm.rmp_entry(gfn))
        except ConfigError as e:
            result["rmp"] = {"error": str(e)}
    events = vm.trace_events()
    result["trace"] = [e._asdict() for e in events if _covers(e.gfn, e.level, gfn)]
    result["vm_wide_events"] = sum(1 for e in events if e.level == 0)
    result["check"] = _check(vm)
    return Envelope.of_vm(
        "inspect",
        vm,
        config={
            "vm": spec.to_dict(),
            "workload": {"gfn": gfn, "private": private, "fault": fault, "write": write},
        },
        seed=spec.seed,
        wall_s=time.perf_counter() - start,
        result=result,
    )


def _check(vm: VM) -> str:
    try:
        vm.check()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return "ok"


_FLAGS = (
    ("readable", "R"),
    ("writable", "W"),
    ("executable", "X"),
    ("accessed", "A"),
    ("dirty", "D"),
    ("large", "PS"),
    ("host_writable", "HW"),
    ("mmu_writable", "MW"),
    ("suppress_ve", "SVE"),
)


def _spte_text(e: Mapping[str, Any]) -> str:
    d = e["decoded"]
    if d["frozen"]:
        return "frozen"
    if d["mmio"]:
        return f"MMIO gfn {d['pfn']:#x} generation {d['mmio_generation']}"
    if not d["present"]:
        return "not present"
    kind = "leaf" if e["leaf"] else "table"
    flags = " ".join(short for name, short in _FLAGS if d[name])
    return f"{kind} pfn {d['pfn']:#x} memtype {d['memtype']} {flags}"


def text_lines(env: Envelope) -> list[str]:
    """``inspect_gfn``'s envelope as text lines (each within ``render.WIDTH`` columns).

    Args:
        env: what ``inspect_gfn`` returned.

    Returns:
        list[str]: the lines. Never raises for such an envelope.
    """
    r, vm = env.result, env.config["vm"]
    label = vm.get("label", vm["vm_type"])
    out = [
        common.header("inspect", f"{label}/{vm['hooks']}", env.wall_s),
        f"gfn {r['gfn']:#x} (gpa {r['gpa']:#x})",
    ]
    f = r.get("fault")
    if f is not None:
        out.append(
            f"fault: {f['ret']} at level {f['level']}, "
            f"{'private' if f['private'] else 'shared'}, {f['retries']} retries, "
            f"{f['modeled_ns']:,.0f} ns modeled"
        )
    names = {"direct": "direct (shared) root", "mirror": "mirror (private) root"}
    for root, entries in r["walks"].items():
        out += ["", f"{names[root]}:"]
        if not entries:
            out.append("  no root yet (nothing faulted)")
            continue
        out += render.table(
            [
                render.Column("level", key=True),
                render.Column("index"),
                render.Column("SPTE", right=False),
                render.Column("decoded", right=False),
            ],
            [
                [str(e["level"]), str(e["index"]), f"{e['spte']:#018x}", _spte_text(e)]
                for e in entries
            ],
        )
    if "sept" in r:
        tree = "S-EPT" if vm["vm_type"] == "tdx" else "external tree"
        out += ["", f"{tree} entries on the path ({len(r['sept'])}):"]
        out += [
            f"  level {s['level']} gfn {s['gfn']:#x}: {s['state']} pfn {s['pfn']:#x}"
            for s in r["sept"]
        ] or ["  none"]
    if "rmp" in r:
        rmp = r["rmp"]
        out += ["", "RMP entry:"]
        if "error" in rmp:
            out += render.wrap(f"  none: {rmp['error']}")
        else:
            out.append(
                f"  assigned {'yes' if rmp['assigned'] else 'no'}, validated "
                f"{'yes' if rmp['validated'] else 'no'}, size {rmp['size']}, gpa {rmp['gpa']:#x}"
            )
    out += ["", f"trace events about the page ({len(r['trace'])}):"]
    out += [
        f"  {e['op']} gfn {e['gfn']:#x} level {e['level']} detail {e['detail']:#x}"
        for e in r["trace"]
    ] or ["  none"]
    if r["vm_wide_events"]:
        out.append(f"  (+ {r['vm_wide_events']} VM-wide events, not about one page)")
    out += ["", f"VM.check(): {r['check']}"]
    return out
