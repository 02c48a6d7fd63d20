"""The confidential-VM lifecycle workloads: ``td_lifecycle`` and ``snp_boot``."""

import argparse

import pytest

import tdpmmu
from tdpmmu.hooks import HookDesign
from tdpmmu.workloads import WORKLOADS, WorkloadResult
from tdpmmu.workloads.memstress import run_pass
from tdpmmu.workloads.snp_boot import PSC_MAX_ENTRIES, _rmp_census, psc_requests, snp_boot
from tdpmmu.workloads.td_lifecycle import (
    PHASES,
    _Checker,
    build_unlaunched,
    td_lifecycle,
)

SMALL = {"vcpus": 2, "bytes_per_vcpu": "4M"}


def td(**kw: object) -> WorkloadResult:
    return td_lifecycle(**{**SMALL, **kw}, vm_type="tdx")  # type: ignore[arg-type]


def snp(**kw: object) -> WorkloadResult:
    return snp_boot(**{**SMALL, **kw}, vm_type="snp")  # type: ignore[arg-type]


def all_ok(r: WorkloadResult) -> None:
    checks = r.detail["checks"]
    assert checks
    assert r.ok and all(c["ok"] for c in checks), checks


def failed(r: WorkloadResult) -> list[str]:
    return [c["name"] for c in r.detail["checks"] if not c["ok"]]


# ----- td_lifecycle ---------------------------------------------------------------------------


def test_td_phases_lines_and_counts() -> None:
    r = td(image_bytes="1M", convert_percent=25)
    all_ok(r)
    assert [p[0] for p in r.phases] == list(PHASES)
    labels = [line.split(":")[0] for line in r.lines[2:]]
    assert labels == [f"{p:<30}" for p in PHASES]
    for line, (_, modeled_s, _) in zip(r.lines[2:], r.phases, strict=True):
        assert line.endswith(f": {modeled_s:.9f}s")
    sc = r.detail["seamcalls"]
    # The image: one PAGE.ADD per page, before finalize; no AUG before the TD runs.
    assert sc["Build initial image"]["TDH.MEM.PAGE.ADD"] == 256
    assert "TDH.MEM.PAGE.AUG" not in sc["Build initial image"]
    # Lazy accept: one AUG and one ACCEPT per region page (4K), no PAGE.ADD once finalized.
    region = 2 * 1024
    assert sc["Run (lazy accept)"]["TDH.MEM.PAGE.AUG"] == region
    assert r.detail["tdcalls"]["Run (lazy accept)"]["TDG.MEM.PAGE.ACCEPT"] == region
    assert "TDH.MEM.PAGE.ADD" not in sc["Run (lazy accept)"]
    # 25% of each slice leaves the S-EPT and comes back through AUG + ACCEPT.
    conv = 2 * 256
    assert r.metrics["converted_pages"] == conv
    assert sc["Convert to shared"]["TDH.MEM.PAGE.REMOVE"] == conv
    assert sc["Convert to private"]["TDH.MEM.PAGE.AUG"] == conv
    assert r.metrics["accepts"] == region + conv
    assert r.metrics["convert_to_shared_seamcalls"] == sum(sc["Convert to shared"].values())
    # The VMM's setting the region private, then one MapGPA per vCPU slice and direction.
    assert r.stats["conversions"] == 1 + 4
    assert r.metrics["run_lazy_accept_time_s"] > 0 and r.metrics["destroy_time_s"] > 0


def test_td_teardown_orders() -> None:
    remove = td(teardown="remove")
    term = td(teardown="terminate_vm")
    all_ok(remove)
    all_ok(term)
    assert remove.detail["teardown"] == "remove" and term.detail["teardown"] == "terminate_vm"
    # Everything before the teardown is identical.
    for label in PHASES[:-1]:
        assert remove.detail["seamcalls"][label] == term.detail["seamcalls"][label]
    d_rm, d_tv = remove.detail["seamcalls"]["Destroy"], term.detail["seamcalls"]["Destroy"]
    pages = 2 * 1024 + 512  # region + image
    assert d_rm["TDH.MEM.PAGE.REMOVE"] == pages
    assert d_rm["TDH.MEM.TRACK"] == pages
    assert "TDH.MEM.PAGE.REMOVE" not in d_tv and "TDH.MEM.TRACK" not in d_tv
    tables = d_rm["TDH.PHYMEM.PAGE.RECLAIM"]
    assert d_tv["TDH.PHYMEM.PAGE.RECLAIM"] == pages + tables
    # The ledger's direction: no BLOCK/TRACK/kick per page makes terminate_vm cheaper.
    assert term.metrics["destroy_time_s"] < remove.metrics["destroy_time_s"]


def test_td_teardown_from_tdx_option_and_contradiction() -> None:
    r = td_lifecycle(**SMALL, vm_type="tdx", tdx={"teardown": "terminate_vm"})  # type: ignore[arg-type]
    assert r.detail["teardown"] == "terminate_vm"
    with pytest.raises(tdpmmu.ConfigError, match="teardown"):
        td_lifecycle(**SMALL, vm_type="tdx", tdx={"teardown": "remove"}, teardown="terminate_vm")  # type: ignore[arg-type]


def test_td_huge_pages_accept_2m() -> None:
    r = td(tdx={"huge_pages": True}, convert_percent=10)
    all_ok(r)
    sc = r.detail["seamcalls"]
    region = 2 * 1024
    assert sc["Run (lazy accept)"]["TDH.MEM.PAGE.AUG"] == region // 512
    assert r.detail["tdcalls"]["Run (lazy accept)"]["TDG.MEM.PAGE.ACCEPT"] == region // 512
    # A conversion of part of a 2M page demotes it first.
    assert sc["Convert to shared"]["TDH.MEM.PAGE.DEMOTE"] == 2
    assert r.spec.folio == 2 << 20 and r.params["backing"] == 2 << 20
    assert (
        td(tdx={"huge_pages": True}).metrics["run_lazy_accept_time_s"]
        < td().metrics["run_lazy_accept_time_s"]
    )


@pytest.mark.parametrize(
    "hooks",
    [
        "mirror",
        HookDesign("mirror", track="batched"),
        HookDesign("mirror", sept_free="sept_remove"),
        HookDesign("mirror", interface="two_hook"),
        HookDesign("mirror", version="6.16"),
    ],
    ids=str,
)
def test_td_every_mirror_design(hooks: object) -> None:
    r = td(hooks=hooks, convert_percent=10)
    all_ok(r)
    if isinstance(hooks, HookDesign) and hooks.sept_free == "sept_remove":
        assert r.detail["seamcalls"]["Destroy"]["TDH.MEM.SEPT.REMOVE"] > 0
    if isinstance(hooks, HookDesign) and hooks.track == "batched":
        sc = r.detail["seamcalls"]["Convert to shared"]
        assert sc["TDH.MEM.TRACK"] == 2 < sc["TDH.MEM.PAGE.REMOVE"]


def test_td_private_design_leaks_sept_at_teardown() -> None:
    # Teardown zaps are not private faults: the private design fires no hook, so the S-EPT
    # tables are never freed. The workload's destroy check reports exactly that, and the run
    # still returns every figure.
    r = td(hooks="private")
    assert not r.ok
    assert failed(r) == [
        "destroy reclaims every table, leaf and S-EPT page",
        "VM.check() holds after destroy",
    ]
    (destroy,) = [c for c in r.detail["checks"] if c["name"] == failed(r)[0]]
    assert "sept_tables" in destroy["detail"]
    assert r.stats["sept_tables"] > 0 and r.metrics["destroy_time_s"] > 0
    assert [c["ok"] for c in r.detail["checks"]][:-2] == [True] * (len(r.detail["checks"]) - 2)


class _Hooks:
    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    def _n(self, name: str) -> int:
        self.calls[name] = self.calls.get(name, 0) + 1
        return 0

    def link_external_spt(self, gfn: int, level: int, value: int) -> int:
        return self._n("link")

    def set_external_spte(self, gfn: int, level: int, value: int) -> int:
        return self._n("set")

    def remove_external_spte(self, gfn: int, level: int, value: int) -> int:
        return self._n("remove")

    def free_external_spt(self, gfn: int, level: int, value: int) -> int:
        return self._n("free")


def test_td_hook_object() -> None:
    h = _Hooks()
    r = td_lifecycle(
        vcpus=1, bytes_per_vcpu="1M", image_bytes="1M", vm_type="tdx", hooks=h, clock="host"
    )
    all_ok(r)
    assert r.options.clock == "host"
    assert h.calls["set"] == 256 + 256 + 25  # image, run, back to private
    assert h.calls["remove"] == h.calls["set"]  # every leaf removed (25 by the conversion)
    assert h.calls["free"] == h.calls["link"]


def test_td_measure_and_no_conversion() -> None:
    r = td(tdx={"measure": True}, convert_percent=0, image_bytes="64K")
    all_ok(r)
    assert r.detail["seamcalls"]["Build initial image"]["TDH.MR.EXTEND"] == 16 * 16
    assert r.metrics["converted_pages"] == 0
    assert r.detail["seamcalls"]["Convert to shared"] == {}
    assert r.metrics["convert_to_shared_time_s"] == 0.0


def test_td_checker_catches_disagreement() -> None:
    vm, _, layout, _ = build_unlaunched(
        {"vm_type": "tdx"},
        vcpus=1,
        bytes_per_vcpu="1M",
        backing="4K",
        image_bytes="4K",
        vm_types=("tdx",),
        workload="test",
    )
    vm.finalize()
    run_pass(
        vm, layout, tdpmmu.workloads.virtual_options(clock="virtual", hooks=None), private=True
    )
    checker = _Checker(vm, layout, module=True)
    checker.attributes("ok", [])
    g = layout.base_gfn + 7
    vm.set_memory_attributes(g, 1, private=False)  # shared, never touched: nothing maps it
    checker.attributes("as private", [])
    checker.attributes("shared, unmapped", [(g, 1)])
    vm.fault(g, private=False)
    checker.attributes("shared, mapped", [(g, 1)])
    recs = checker.results.to_list()
    assert [(c["name"], c["ok"]) for c in recs] == [
        ("ok", True),
        ("as private", False),
        ("shared, unmapped", False),
        ("shared, mapped", True),
    ]
    assert "S-EPT state none" in recs[1]["detail"]
    assert recs[2]["detail"] == f"shared gfn {g:#x} is not mapped"
    assert checker.results.failed() == ["as private", "shared, unmapped"]


@pytest.mark.parametrize(
    ("kw", "name"),
    [
        ({"vm_type": "snp"}, "vm_type"),
        ({"vm_type": "default"}, "vm_type"),
        ({"vm_type": "sw_protected", "mirror": True}, "vm_type"),
        ({"vm_type": "tdx", "convert_percent": 101}, "convert_percent"),
        ({"vm_type": "tdx", "convert_percent": -1}, "convert_percent"),
        ({"vm_type": "tdx", "teardown": "zap"}, "teardown"),
        ({"vm_type": "tdx", "image_bytes": "6K"}, "image_bytes"),
        ({"vm_type": "tdx", "bytes_per_vcpu": "1M", "backing": "2M"}, "bytes_per_vcpu"),
        ({"vm_type": "tdx", "backing": "3M"}, "backing"),
        ({"vm_type": "tdx", "vcpus": 0}, "vcpus"),
    ],
)
def test_td_bad_values(kw: dict[str, object], name: str) -> None:
    args = {"vcpus": 1, "bytes_per_vcpu": "1M", **kw}
    with pytest.raises(tdpmmu.ConfigError, match=f"^{name}"):
        td_lifecycle(**args)  # type: ignore[arg-type]


# ----- snp_boot -------------------------------------------------------------------------------


def test_snp_lazy_4k_vs_2m() -> None:
    r4, r2 = snp(page_size="4K"), snp(page_size="2M")
    all_ok(r4)
    all_ok(r2)
    region = 2 * 1024
    assert r4.metrics["first_touch_rmpupdates"] == region
    assert r4.metrics["first_touch_pvalidates"] == region
    assert r2.metrics["first_touch_rmpupdates"] == region // 512
    assert r2.metrics["first_touch_pvalidates"] == region // 512
    assert r4.metrics["rmp_entries_4k"] == region and r4.metrics["rmp_entries_2m"] == 0
    assert r2.metrics["rmp_entries_2m"] == region // 512 and r2.metrics["rmp_entries_4k"] == 0
    assert r2.stats["pages_2m"] == region // 512 + 1  # region + the 2M image
    assert r2.metrics["first_touch_time_s"] < r4.metrics["first_touch_time_s"]
    assert [line.split(":")[0].strip() for line in r4.lines[2:]] == [
        "Launch (image)",
        "First touch",
    ]


@pytest.mark.parametrize("page_size", ["4K", "2M"])
def test_snp_eager_vs_lazy(page_size: str) -> None:
    lazy, eager = snp(page_size=page_size), snp(page_size=page_size, eager=True)
    all_ok(lazy)
    all_ok(eager)
    assert [p[0] for p in eager.phases] == ["Launch (image)", "Accept memory", "First touch"]
    assert "accept_memory_time_s" not in lazy.metrics
    for name in ("rmpupdates", "pvalidates", "npfs"):
        # The same work, in another phase: at boot instead of on first touch.
        assert eager.metrics[name] == lazy.metrics[name]
        assert eager.metrics[f"accept_memory_{name}"] == lazy.metrics[f"first_touch_{name}"] > 0
        assert eager.metrics[f"first_touch_{name}"] == 0
    # Eager acceptance on one vCPU takes longer than two vCPUs' lazy first touch, and leaves
    # first touch as plain guest accesses.
    assert eager.metrics["accept_memory_time_s"] > lazy.metrics["first_touch_time_s"]
    assert eager.metrics["first_touch_time_s"] < lazy.metrics["first_touch_time_s"]


def test_psc_requests_batch_as_linux() -> None:
    # A 2M-aligned 4 MiB block: two 2M entries, one request, one exit (KVM joins the run).
    assert psc_requests(0x800, 1024) == [[(0x800, 1024)]]
    # No 2M alignment: 4K entries, at most PSC_MAX_ENTRIES (253) per request.
    assert PSC_MAX_ENTRIES == 253
    reqs = psc_requests(1, 600)
    assert [sum(n for _, n in r) for r in reqs] == [253, 253, 94]
    assert reqs[1] == [(254, 253)]
    # A 4K entry then a 2M one: one request, two exits (runs of one entry size).
    assert psc_requests(0x1FF, 513) == [[(0x1FF, 1), (0x200, 512)]]
    # A 2M entry only with 512 pages left; the 4K tail after it shares its request.
    assert psc_requests(0x200, 1023) == [[(0x200, 512), (0x400, 252)], [(0x4FC, 253)], [(0x5F9, 6)]]
    assert psc_requests(5, 0) == []


@pytest.mark.parametrize("eager", [False, True])
def test_snp_accepting_pays_psc_exits(eager: bool) -> None:
    """Eager and lazy acceptance both make the guest's PSC requests, in 4 MiB blocks, each an
    exit charged psc_exit_ns although the memory is private already (no conversion)."""
    # Two vCPUs x 4 MiB, 4K pages: the region starts one page below a 4 MiB boundary, so the
    # blocks are 1 page (1 request, 1 exit), 1024 pages (two 2M entries: 1 request, 1 exit)
    # and 1023 pages (a 2M entry + 511 4K entries: 3 requests of 253 entries at most, 4 exits).
    r = snp(eager=eager)
    all_ok(r)
    assert r.detail["region"][0] // 4096 % 1024 == 1023
    phase = "accept_memory" if eager else "first_touch"
    assert r.metrics["psc_requests"] == r.metrics[f"{phase}_psc_requests"] == 5
    assert r.metrics["psc_exits"] == r.metrics[f"{phase}_psc_exits"] == 6
    assert r.metrics["launch_image_psc_exits"] == 0
    # 2M pages (2M-aligned region over hugetlb): blocks of 512, 1024, 512 pages, one exit each.
    r2 = snp(eager=eager, page_size="2M")
    assert r2.metrics["psc_requests"] == r2.metrics["psc_exits"] == 3
    # One vCPU: its requests lengthen the phase by exactly their exits' cost.
    one = {"vcpus": 1, "bytes_per_vcpu": "4M", "eager": eager, "vm_type": "snp"}
    with_psc = snp_boot(**one)  # type: ignore[arg-type]
    without = snp_boot(**one, costs={"psc_exit_ns": 0.0})  # type: ignore[arg-type]
    exits = with_psc.metrics["psc_exits"]
    assert exits == 5  # 1 page, then 1023: 4 requests, 5 exits
    key = f"{phase}_time_s"
    delta = with_psc.metrics[key] - without.metrics[key]
    assert delta == pytest.approx(exits * tdpmmu.CostModel().psc_exit_ns / 1e9, rel=1e-9)
    # Nothing converts (the memory is private already): guest_memfd's bookkeeping is charged
    # once, for the VMM's setup (build makes the region private), never for the requests.
    costs = tdpmmu.CostModel()
    assert with_psc.cost_breakdown["gmem_convert_ns"] == costs.gmem_convert_ns
    assert with_psc.stats["conversions"] == exits + 1
    assert with_psc.metrics["rmpupdates"] == without.metrics["rmpupdates"] > 0


def test_snp_2m_rmp_over_4k_backing() -> None:
    r = snp(page_size="2M", backing="4K", eager=True)
    all_ok(r)
    region = 2 * 1024
    # The eager PVALIDATE of each 2M page maps one 4K leaf; the other pages fault on first
    # touch without RMP work.
    assert r.metrics["accept_memory_npfs"] == region // 512
    assert r.metrics["accept_memory_rmpupdates"] == region // 512
    assert r.metrics["first_touch_npfs"] == region - region // 512
    assert r.metrics["first_touch_rmpupdates"] == 0
    assert r.metrics["rmp_entries_2m"] == region // 512


def test_snp_private_design() -> None:
    r = snp(hooks="private")
    all_ok(r)
    assert r.metrics["rmp_faults"] == 0 and r.metrics["pvalidate_errors"] == 0


def test_snp_census_sees_unassigned_pages() -> None:
    vm, _, layout, _ = build_unlaunched(
        {"vm_type": "snp"},
        vcpus=1,
        bytes_per_vcpu="1M",
        backing="4K",
        image_bytes="4K",
        vm_types=("snp",),
        workload="test",
    )
    vm.fault(layout.base_gfn, private=True)
    c = _rmp_census(vm, layout.base_gfn, layout.npages)
    assert c == {"entries_2m": 0, "entries_4k": 1, "assigned": 1, "validated": 1}


@pytest.mark.parametrize(
    ("kw", "name"),
    [
        ({"vm_type": "tdx"}, "vm_type"),
        ({"vm_type": "default"}, "vm_type"),
        ({"vm_type": "sw_protected"}, "vm_type"),
        ({"vm_type": "snp", "page_size": "1G"}, "page_size"),
        ({"vm_type": "snp", "page_size": "2M", "folio": "4K"}, "folio"),
        ({"vm_type": "snp", "image_bytes": 0}, "image_bytes"),
    ],
)
def test_snp_bad_values(kw: dict[str, object], name: str) -> None:
    args = {"vcpus": 1, "bytes_per_vcpu": "2M", **kw}
    with pytest.raises(tdpmmu.ConfigError, match=f"^{name}"):
        snp_boot(**args)  # type: ignore[arg-type]


# ----- registry, flags, JSON ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "argv", "expect"),
    [
        (
            "td_lifecycle",
            [
                "-v",
                "2",
                "-b",
                "2M",
                "-s",
                "anonymous",
                "-i",
                "64K",
                "-c",
                "50",
                "-t",
                "terminate_vm",
            ],
            {"convert_percent": 50, "teardown": "terminate_vm", "image_bytes": "64K"},
        ),
        ("snp_boot", ["-v", "2", "-b", "2M", "-e", "-p", "2M"], {"eager": True, "page_size": "2M"}),
    ],
)
def test_registry_flags_and_json(name: str, argv: list[str], expect: dict[str, object]) -> None:
    wl = WORKLOADS[name]
    assert wl.command == name.replace("_", "-") and wl.selftest == "tdpmmu"
    parser = argparse.ArgumentParser()
    wl.add_arguments(parser)
    kwargs = wl.from_args(parser.parse_args(argv))
    assert kwargs.items() >= expect.items()
    r = wl.run(**kwargs, vm_type=wl.vm_types[0])
    all_ok(r)
    back = WorkloadResult.from_json(r.to_json())
    assert back == r
    assert back.lines == r.lines and back.metrics == r.metrics and back.detail == r.detail


@pytest.mark.parametrize(
    ("name", "argv"),
    [
        ("td_lifecycle", ["-c", "101"]),
        ("td_lifecycle", ["-t", "zap"]),
        ("td_lifecycle", ["-b", "5K"]),
        ("td_lifecycle", ["-v", "0"]),
        ("snp_boot", ["-p", "1G"]),
        ("snp_boot", ["-s", "anonymous_hugetlb_16kb"]),
        ("snp_boot", ["-i", "lots"]),
    ],
)
def test_bad_flags(name: str, argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    WORKLOADS[name].add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(argv)
    assert "error: argument" in capsys.readouterr().err
