"""Workloads: every VM type and design set up as a VMM would, the selftest's wall clock, and
the result envelope."""

import json
import math
import time
from typing import Any

import pytest

import tdpmmu
from tdpmmu import config
from tdpmmu._core import WAIT_FIELDS
from tdpmmu.results import Envelope
from tdpmmu.vm import VM
from tdpmmu.vmspec import VmSpec, launch, spec_of
from tdpmmu.workloads import (
    ConversionsResult,
    DemandPagingResult,
    demand_paging,
    private_mem_conversions,
)

#: Every (variant, design) of the engine's matrix.
PAIRS = [(v, d) for v in config.VARIANTS for d in v.designs]


def pair_id(pair: tuple[config.Variant, str]) -> str:
    return f"{pair[0].label}/{pair[1]}"


# ----- demand_paging on every VM type and design ----------------------------------------------


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_demand_paging_runs_on_every_vm_type_and_design(pair: tuple[config.Variant, str]) -> None:
    variant, design = pair
    image = 8
    r = demand_paging(
        vm_type=variant.vm_type,
        mirror=variant.mirror,
        hooks=design,
        vcpus=2,
        bytes_per_vcpu="1M",
        image_pages=image,
    )
    pages = 2 * (1 << 20) // 4096
    s = r.stats
    assert (r.spec.label, r.spec.hooks) == (variant.label, design)
    assert r.pages_per_vcpu == pages // 2
    # Every test page is first-touched once by its own vCPU (4K backing and folio); the image
    # is populated (a prefetch, not a fault).
    assert s["pf_fixed"] == pages
    assert s["pf_memory_fault"] == 0
    if variant.vm_type == "tdx":
        # Built, image added with PAGE.ADD, finalized, then run: every test page is AUGmented
        # and accepted by the guest as private memory.
        assert s["TDH.MEM.PAGE.ADD"] == image
        assert s["TDH.MEM.PAGE.AUG"] == s["TDG.MEM.PAGE.ACCEPT"] == pages
    if variant.vm_type == "snp":
        assert s["pvalidate"] == pages  # private pages, validated by the guest
    if variant.mirror_root:
        assert s["sept_tables"] > 0  # private leaves went through the mirror root
    if variant.vm_type != "default":
        # One attribute change: the VMM makes the region (outside slot 0, whose attributes
        # start private) private at setup; the guest's run requests none.
        assert s["conversions"] == 1


def test_demand_paging_tdx_default_arguments_run() -> None:
    # Used to fail with "the TD is not finalized".
    r = tdpmmu.demand_paging(vm_type="tdx", bytes_per_vcpu="1M")
    assert r.spec.hooks == config.default_design("tdx")
    assert r.stats["TDH.MEM.PAGE.AUG"] == 256


def test_demand_paging_takes_tdx_options_and_hook_designs() -> None:
    base = demand_paging(vm_type="tdx", bytes_per_vcpu="1M")
    two = demand_paging(
        vm_type="tdx", bytes_per_vcpu="1M", hooks=tdpmmu.HookDesign("mirror", interface="two_hook")
    )
    assert two.spec.tdx == {"interface": "two_hook"}
    b, t = base.stats, two.stats
    # two_hook: links are made through set_external_spte; the TDX module sees the same calls.
    assert t["link_external_spt"] == 0 < b["link_external_spt"]
    assert t["set_external_spte"] == b["set_external_spte"] + b["link_external_spt"]
    assert t["TDH.MEM.SEPT.ADD"] == b["TDH.MEM.SEPT.ADD"]
    batched = demand_paging(vm_type="tdx", bytes_per_vcpu="1M", tdx={"track": "batched"})
    assert batched.spec.tdx == {"track": "batched"}


def test_demand_paging_folio_and_backing_reach_snp() -> None:
    huge = demand_paging(vm_type="snp", bytes_per_vcpu="4M", backing="2M", folio="2M")
    small = demand_paging(vm_type="snp", bytes_per_vcpu="4M", backing="2M", folio="4K")
    two_m = (4 << 20) // (2 << 20)
    # 2M folios: one 2M RMP entry and one 2M NPT leaf per 2M; 4K folios cap both at 4K.
    assert huge.stats["pages_2m"] == two_m and huge.stats["pf_fixed"] == two_m
    assert small.stats["pages_2m"] == 0 and small.stats["pf_fixed"] == 1024
    assert huge.spec.folio == 2 << 20 and small.spec.folio == 4096


def test_demand_paging_backing_takes_selftest_source_names() -> None:
    r = demand_paging(bytes_per_vcpu="4M", backing="anonymous_hugetlb_2mb")
    assert r.backing == 2 << 20 and r.backing_source == "anonymous_hugetlb_2mb"
    assert r.stats["pages_2m"] == 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"vm_type": "snp", "hooks": "mirror"}, "hooks"),
        ({"vm_type": "tdx", "tdx": {"track": "sometimes"}}, "track"),
        ({"vm_type": "default", "tdx": {"track": "batched"}}, "tdx"),
        ({"vm_type": "tdx", "mirror": True}, "mirror"),
        ({"vm_type": "sev"}, "vm_type"),
        ({"vm_type": "snp", "folio": "1G"}, "folio"),
        ({"image_pages": -1}, "image_pages"),
    ],
)
def test_demand_paging_refuses_bad_configurations(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(tdpmmu.ConfigError, match=match):
        demand_paging(bytes_per_vcpu="1M", **kwargs)


# ----- the selftest's host wall clock ---------------------------------------------------------


@pytest.mark.parametrize(
    ("clock", "runner"), [("host", "run_memstress"), ("virtual", "run_virtual")]
)
def test_wall_clock_is_measured_around_the_vcpu_threads(
    monkeypatch: pytest.MonkeyPatch, clock: str, runner: str
) -> None:
    # Make starting/joining the vCPUs slow (as 256 threads on 2 cores are): the selftest's
    # clock includes it, the threads' own clocks do not. In virtual time the same clock is
    # measured around the one native call that runs every simulated vCPU.
    native = getattr(VM, runner)
    delay = 0.2

    def slow_start(self: VM, *args: Any, **kwargs: Any) -> Any:
        time.sleep(delay)
        return native(self, *args, **kwargs)

    monkeypatch.setattr(VM, runner, slow_start)
    r = demand_paging(vcpus=2, bytes_per_vcpu="1M", clock=clock)
    assert r.options.clock == clock
    assert r.wall_total_guest_execution_time_s >= delay
    assert r.slowest_vcpu_wall_s == max(d["wall_s"] for d in r.per_vcpu) < delay
    assert r.wall_per_vcpu_demand_paging_rate_pgs_per_s == pytest.approx(
        r.pages_per_vcpu / r.wall_total_guest_execution_time_s
    )
    assert r.wall_overall_demand_paging_rate_pgs_per_s == pytest.approx(
        r.pages_per_vcpu * 2 / r.wall_total_guest_execution_time_s
    )
    assert r.wall_s >= r.wall_total_guest_execution_time_s


def test_modeled_rates_use_the_slowest_vcpu() -> None:
    r = demand_paging(vcpus=2, bytes_per_vcpu="1M")
    slowest = max(d["modeled_ns"] for d in r.per_vcpu) / 1e9
    assert r.total_guest_execution_time_s == slowest
    assert r.overall_demand_paging_rate_pgs_per_s == pytest.approx(2 * r.pages_per_vcpu / slowest)


# ----- the result envelope --------------------------------------------------------------------


def test_demand_paging_envelope() -> None:
    r = demand_paging(
        vm_type="snp", vcpus=2, bytes_per_vcpu="1M", costs={"psc_exit_ns": 1.0}, seed=7
    )
    doc = json.loads(r.to_json())
    assert (doc["tool"], doc["version"], doc["simulated"]) == ("tdpmmu", tdpmmu.__version__, True)
    assert doc["workload"] == "demand_paging" and doc["seed"] == 7
    vm = doc["config"]["vm"]
    assert vm["vm_type"] == "snp" and vm["hooks"] == config.default_design("snp")
    assert vm["costs"] == r.costs.to_dict() and vm["costs"]["psc_exit_ns"] == 1.0
    assert doc["config"]["workload"]["bytes_per_vcpu"] == 1 << 20
    # Modeled time with its breakdown by CostModel field then wait kind, which sums to it.
    assert doc["config"]["workload"]["options"]["clock"] == "virtual"
    assert doc["modeled_ns"] == r.stats["modeled_ns"] > 0
    assert list(doc["cost_breakdown"]) == [*tdpmmu.CostModel.field_names(), *WAIT_FIELDS]
    assert sum(doc["cost_breakdown"].values()) == pytest.approx(doc["modeled_ns"], abs=1e-6)
    # Virtual time: every page fixed once; every access a hit or exactly one outcome.
    assert r.stats["pf_fixed"] == 2 * 256
    o = r.virtual["outcomes"]
    assert o["accesses"] == 2 * 256
    assert o["accesses"] == (
        o["hits"] + o["fixed"] + o["spurious"] + o["emulate"] + o["write_protected"]
    )
    assert doc["wall_s"] >= doc["result"]["wall_total_guest_execution_time_s"] > 0
    # JSON round trip, both as an envelope and as the typed result.
    assert Envelope.from_json(r.to_json()) == r.envelope()
    assert DemandPagingResult.from_json(r.to_json()) == r


def test_demand_paging_envelope_host_clock() -> None:
    r = demand_paging(
        vm_type="snp",
        vcpus=2,
        bytes_per_vcpu="1M",
        costs={"psc_exit_ns": 1.0},
        seed=7,
        clock="host",
    )
    doc = json.loads(r.to_json())
    assert doc["config"]["workload"]["options"]["clock"] == "host"
    assert doc["modeled_ns"] == r.stats["modeled_ns"] > 0
    b = doc["cost_breakdown"]
    assert list(b) == [*tdpmmu.CostModel.field_names(), *WAIT_FIELDS]
    # Host threads wait for nothing in the ledger: the waits are virtual time's alone.
    assert all(b[w] == 0.0 for w in WAIT_FIELDS)
    assert sum(b.values()) == pytest.approx(doc["modeled_ns"], abs=1e-6)
    assert r.virtual == {}
    assert Envelope.from_json(r.to_json()) == r.envelope()
    assert DemandPagingResult.from_json(r.to_json()) == r


def test_envelope_round_trip_with_an_unbounded_rate() -> None:
    # Host clock: with every cost zero nothing takes modeled time (in virtual time the host's
    # memory bandwidth still does), so the modeled rate is unbounded.
    zero = {name: 0.0 for name in tdpmmu.CostModel.field_names()}
    r = demand_paging(bytes_per_vcpu="1M", costs=zero, clock="host")
    assert math.isinf(r.per_vcpu_demand_paging_rate_pgs_per_s)
    text = r.to_json()
    assert json.loads(text)["result"]["per_vcpu_demand_paging_rate_pgs_per_s"] is None
    assert DemandPagingResult.from_json(text) == r


def test_envelope_refuses_a_breakdown_that_does_not_add_up() -> None:
    with pytest.raises(tdpmmu.ConfigError, match="cost_breakdown"):
        Envelope(
            workload="x",
            config={},
            seed=0,
            modeled_ns=10.0,
            cost_breakdown={"exit_entry_ns": 9.0},
            wall_s=0.0,
            result={},
        )
    with pytest.raises(tdpmmu.ConfigError, match="envelope"):
        Envelope.from_json('{"tool": "tdpmmu"}')


# ----- VMM-style launch and the conversion workload -------------------------------------------


def test_launch_builds_the_initial_image_and_finalizes_a_td() -> None:
    spec = VmSpec.create("tdx", memory="8MiB", vcpus=2)
    vm = spec.build()
    assert spec_of(vm) is spec and not vm.finalized
    with pytest.raises(tdpmmu.ConfigError, match="finalized"):
        private_mem_conversions(vm, 4, 8, touch_first=True)
    launch(vm, image_gfn=1024, image_pages=16)
    assert vm.finalized and vm.stats["TDH.MEM.PAGE.ADD"] == 16
    res = private_mem_conversions(vm, 4, 8, touch_first=True, region_pages=1024)
    assert res.unexpected == {} and res.vm == spec.to_dict()


@pytest.mark.parametrize("pair", [p for p in PAIRS if p[0].vm_type != "default"], ids=pair_id)
def test_conversions_on_huge_pages_leave_nothing_unexpected(
    pair: tuple[config.Variant, str],
) -> None:
    # With 2M backing and folios, a converted chunk sits inside a 2M leaf (and on SNP gmem a 2M
    # RMP entry): the guest's writes under a 2M leaf take no exit, and a 4K rescind inside a 2M
    # RMP entry needs the entry split first. Neither may show up as a failure.
    variant, design = pair
    spec = VmSpec.create(
        variant.vm_type,
        memory="8MiB",
        vcpus=2,
        backing="2M",
        folio="2M",
        hooks=design,
        mirror=variant.mirror,
    )
    vm = spec.build()
    launch(vm)
    vm.run_memstress(2, 1024, 0, False, False, 100, 0, True)
    retries = vm.stats["pf_retry"]
    res = private_mem_conversions(vm, 4, 16)
    assert res.unexpected == {}, res.unexpected
    huge_rmp = variant.vm_type == "snp" and design == "gmem"
    assert (res.rmp_splits > 0) == huge_rmp
    # Each converted page is written twice (shared, private again): at most one fault each.
    assert 0 < res.faults - (vm.stats["pf_retry"] - retries) <= 2 * 4 * 16
    vm.check()


def test_conversions_envelope_round_trip() -> None:
    vm = tdpmmu.VM("sw_protected", memory="8MiB", vcpus=2)
    res = private_mem_conversions(vm, 4, 8, touch_first=True)
    assert res.vm["vm_type"] == "sw_protected"  # a VM built directly: what it exposes
    doc = json.loads(res.to_json())
    assert doc["workload"] == "private_mem_conversions"
    assert doc["config"]["workload"]["chunks"] == 4
    assert sum(doc["cost_breakdown"].values()) == pytest.approx(res.modeled_ns)
    assert res.modeled_ns >= res.fault_modeled_ns > 0
    assert ConversionsResult.from_json(res.to_json()) == res


def test_conversions_result_as_a_frame() -> None:
    """``ConversionsResult.to_pandas`` is one row with the run's configuration and figures."""
    pytest.importorskip("pandas")
    vm = tdpmmu.VM("sw_protected", memory="16MiB")
    vm.set_memory_attributes(0, 4096, True)
    r = private_mem_conversions(vm, chunks=2, chunk_pages=8)
    df = r.to_pandas()
    assert len(df) == 1
    assert df["vm_type"][0] == "sw_protected" and df["chunks"][0] == 2
    assert df["modeled_ns"][0] == r.envelope().modeled_ns
