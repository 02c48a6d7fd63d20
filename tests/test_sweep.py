"""tdpmmu.sweep: grid expansion, the local process pool, a real Dask cluster, failures, lost
workers, and the result's JSON/CSV/pandas/table forms."""

import json
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

import tdpmmu
from tdpmmu import ConfigError, CostModel
from tdpmmu.results import read_csv, read_json, write_csv, write_json
from tdpmmu.sweep import SweepResult, expand, point_kwargs

# Small runs: 1 MiB per vCPU (256 pages), a few vCPUs.
BASE = {"bytes_per_vcpu": "1M"}
GRID = {"vcpus": [1, 2, 4], "vm_type": ["default", "tdx"], "mmu_lock": ["shared", "exclusive"]}


def modeled(point: Any) -> dict[str, Any]:
    """Everything of a point's run that comes from the cost model (no host wall time): the
    configuration, the modeled clock, its breakdown, the counters and the modeled metrics."""
    env = point.result
    return {
        "config": env["config"],
        "seed": env["seed"],
        "modeled_ns": env["modeled_ns"],
        "cost_breakdown": env["cost_breakdown"],
        "stats": env["result"]["stats"],
        "metrics": {k: v for k, v in point.metrics.items() if not k.startswith("wall_")},
    }


def direct(**kwargs: Any) -> dict[str, Any]:
    """The same fingerprint for a direct call of demand_paging in this process."""
    from tdpmmu.sweep import SweepPoint, run_point

    out = run_point("demand_paging", kwargs)
    assert out["error"] is None, out["error"]
    return modeled(SweepPoint(index=0, params={}, **out))


def flaky_demand_paging(marker: str, kill: bool = False, always: bool = False, **kw: Any) -> Any:
    """demand_paging, except that with ``kill`` it first kills its own (worker) process: once
    (it leaves ``marker`` so the next run goes through), or every time with ``always``."""
    if kill:
        if always:
            os._exit(3)
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pass
        else:
            os.close(fd)
            os._exit(3)
    return tdpmmu.demand_paging(**kw)


@pytest.fixture(scope="module")
def serial() -> SweepResult:
    return tdpmmu.sweep("demand_paging", GRID, base=BASE, processes=0)


# ----- the grid ------------------------------------------------------------------------------


def test_expand_is_the_cartesian_product_in_key_order_with_seeds_fastest() -> None:
    points = expand({"a": [1, 2], "b": ("x", "y", "z")}, seeds=(5, 7))
    assert len(points) == 12
    assert points[:3] == [
        {"a": 1, "b": "x", "seed": 5},
        {"a": 1, "b": "x", "seed": 7},
        {"a": 1, "b": "y", "seed": 5},
    ]
    assert points[-1] == {"a": 2, "b": "z", "seed": 7}
    assert expand({"a": range(3)}, seeds=()) == [{"a": 0}, {"a": 1}, {"a": 2}]


def test_point_kwargs_merges_tdx_and_cost_keys() -> None:
    base = {"tdx": {"measure": True}, "costs": CostModel().replace(exit_entry_ns=5.0), "vcpus": 1}
    kw = point_kwargs(base, {"tdx.track": "batched", "cost.fault_map_ns": 7.0, "vcpus": 2})
    assert kw["tdx"] == {"measure": True, "track": "batched"}
    assert kw["vcpus"] == 2
    costs = CostModel(**kw["costs"])
    assert costs == CostModel().replace(exit_entry_ns=5.0, fault_map_ns=7.0)
    # no dotted key: base values pass through untouched
    assert point_kwargs({"costs": None}, {"vcpus": 3}) == {"costs": None, "vcpus": 3}


def test_cost_and_tdx_keys_reach_the_run() -> None:
    res = tdpmmu.sweep(
        "demand-paging",
        {"cost.td_exit_entry_ns": [1000.0, 3000.0], "tdx.track": ["per_page", "batched"]},
        base={**BASE, "vm_type": "tdx", "vcpus": 2},
        processes=0,
    )
    assert res.workload == "demand_paging" and res.ok and len(res.points) == 4
    pages = 2 * 256
    for p in res.points:
        vm = p.result["config"]["vm"]
        assert vm["costs"]["td_exit_entry_ns"] == p.params["cost.td_exit_entry_ns"]
        assert vm["tdx"]["track"] == p.params["tdx.track"]
        # every first-touch fault of a TD exits once: the field is charged once per page
        assert p.result["cost_breakdown"]["td_exit_entry_ns"] == pytest.approx(
            pages * p.params["cost.td_exit_entry_ns"]
        )
    slow, fast = res.points[2], res.points[0]
    assert (
        slow.metrics["total_guest_execution_time_s"] > fast.metrics["total_guest_execution_time_s"]
    )


@pytest.mark.parametrize(
    ("grid", "base", "kwargs", "match"),
    [
        ({"bogus": [1]}, {}, {}, r"grid: 'bogus' is not a parameter"),
        ({"vcpus": [1]}, {"nope": 1}, {}, r"base: 'nope' is not a parameter"),
        ({"tdx.nope": [1]}, {}, {}, r"grid\['tdx.nope'\]: unknown TDX option"),
        ({"cost.nope_ns": [1]}, {}, {}, r"grid\['cost.nope_ns'\]: 'nope_ns' is not a CostModel"),
        ({"vcpus": "12"}, {}, {}, r"grid\['vcpus'\]: expected a list"),
        ({"vcpus": []}, {}, {}, r"grid\['vcpus'\]: needs at least one value"),
        ({"seed": [1, 2]}, {}, {"seeds": [3]}, r"seeds: the grid or base sets seed"),
        ({"vcpus": [1]}, {}, {"seeds": [-1]}, r"seeds"),
        ({"vcpus": [1]}, {}, {"seeds": []}, r"seeds: needs at least one"),
        ({"vcpus": [1]}, {}, {"retries": -1}, r"retries"),
        ({"vcpus": [1]}, {}, {"processes": -2}, r"processes"),
        ({"progress": [None]}, {}, {}, r"grid: 'progress' is not a parameter"),
    ],
)
def test_bad_sweeps_are_refused_before_running(
    grid: dict[str, Any], base: dict[str, Any], kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        tdpmmu.sweep("demand_paging", grid, base=base, **{"processes": 0, **kwargs})


def test_unknown_workload_and_two_backends_are_refused() -> None:
    with pytest.raises(ConfigError, match="workload: unknown workload 'nope'"):
        tdpmmu.sweep("nope", {"vcpus": [1]})
    with pytest.raises(ConfigError, match="scheduler: give client or scheduler"):
        tdpmmu.sweep("demand_paging", {"vcpus": [1]}, client=object(), scheduler="tcp://x:1")


# ----- the local backends ------------------------------------------------------------------------


def test_serial_points_are_in_grid_order_and_match_direct_runs(serial: SweepResult) -> None:
    assert serial.backend == "serial" and serial.ok
    assert [p.params for p in serial.points] == expand(GRID, (0,))
    assert [p.index for p in serial.points] == list(range(12))
    for p in serial.points:
        assert p.result["config"]["vm"]["vcpus"] == p.params["vcpus"]
        assert p.result["config"]["vm"]["vm_type"] == p.params["vm_type"]
        assert p.row is not None and p.row["mmu_lock"] == p.params["mmu_lock"]
    p = serial.points[7]  # vcpus=2 (points 4..7), tdx (6, 7), exclusive (7)
    assert p.params == {"vcpus": 2, "vm_type": "tdx", "mmu_lock": "exclusive", "seed": 0}
    assert modeled(p) == direct(**BASE, vcpus=2, vm_type="tdx", mmu_lock="exclusive", seed=0)


def test_process_pool_gives_the_serial_results(serial: SweepResult) -> None:
    seen: list[tuple[int, int, str]] = []
    pooled = tdpmmu.sweep(
        "demand_paging",
        GRID,
        base=BASE,
        processes=2,
        progress=lambda done, total, label: seen.append((done, total, label)),
    )
    assert pooled.backend == "processes" and pooled.ok
    assert [p.params for p in pooled.points] == [p.params for p in serial.points]
    assert [modeled(p) for p in pooled.points] == [modeled(p) for p in serial.points]
    assert [d for d, _, _ in seen] == list(range(1, 13)) and {t for _, t, _ in seen} == {12}
    assert sorted(label for _, _, label in seen) == sorted(
        f"vcpus={p['vcpus']}, vm_type={p['vm_type']}, mmu_lock={p['mmu_lock']}, seed=0"
        for p in expand(GRID, (0,))
    )


def test_seeds_give_one_point_per_seed_with_that_seed() -> None:
    res = tdpmmu.sweep("demand_paging", {"vcpus": [2]}, base=BASE, seeds=[3, 11], processes=0)
    assert res.seeds == (3, 11)
    assert [p.params["seed"] for p in res.points] == [3, 11]
    assert [p.result["seed"] for p in res.points] == [3, 11]
    assert [p.result["config"]["vm"]["seed"] for p in res.points] == [3, 11]
    again = tdpmmu.sweep("demand_paging", {"vcpus": [2]}, base=BASE, seeds=[3, 11], processes=0)
    assert [modeled(p) for p in again.points] == [modeled(p) for p in res.points]


def test_a_failing_point_is_reported_and_the_others_complete() -> None:
    res = tdpmmu.sweep(
        "demand_paging",
        {"vm_type": ["default", "no_such_type", "tdx"], "vcpus": [1, 2]},
        base=BASE,
        processes=2,
    )
    assert not res.ok
    bad = [p for p in res.points if p.params["vm_type"] == "no_such_type"]
    assert res.errors == tuple(bad) and len(bad) == 2
    for p in bad:
        assert p.error is not None and p.error.startswith("ConfigError: vm_type")
        assert p.result is None and p.row is None and p.metrics == {}
        with pytest.raises(ConfigError, match="has no result"):
            p.envelope()
    good = [p for p in res.points if p.ok]
    assert len(good) == 4
    for p in good:
        assert modeled(p) == direct(**BASE, vm_type=p.params["vm_type"], vcpus=p.params["vcpus"])
    # a bad TDX option value fails only its point, too
    res = tdpmmu.sweep(
        "demand_paging",
        {"tdx.track": ["batched", "sideways"]},
        base={**BASE, "vm_type": "tdx"},
        processes=0,
    )
    assert res.points[0].ok
    assert res.points[1].error is not None and "tdx['track']" in res.points[1].error


def test_a_worker_killed_mid_sweep_is_retried_and_nothing_is_lost(tmp_path: Path) -> None:
    marker = tmp_path / "killed-once"
    res = tdpmmu.sweep(
        flaky_demand_paging,
        {"vcpus": [1, 2, 3, 4], "kill": [False, True]},
        base={**BASE, "marker": str(marker)},
        processes=2,
        retries=1,
    )
    assert marker.exists(), "no worker was killed: the test did not test anything"
    assert res.ok, [p.error for p in res.errors]
    for p in res.points:
        assert modeled(p) == direct(**BASE, vcpus=p.params["vcpus"])


def test_a_point_that_always_kills_its_worker_becomes_an_error(tmp_path: Path) -> None:
    res = tdpmmu.sweep(
        flaky_demand_paging,
        {"vcpus": [1, 2], "kill": [False, True]},
        base={**BASE, "marker": str(tmp_path / "m"), "always": True},
        processes=2,
        retries=1,
    )
    assert [p.ok for p in res.points] == [True, False] * 2
    for p in res.errors:
        assert p.error is not None and "died" in p.error and "retries=1" in p.error


# ----- a real Dask cluster -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    distributed = pytest.importorskip(
        "distributed", reason="dask.distributed is not installed (pip install 'tdpmmu[cluster]')"
    )
    with (
        distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
        ) as lc,
        distributed.Client(lc) as client,
    ):
        yield client


def test_dask_cluster_gives_the_local_results(cluster: Any, serial: SweepResult) -> None:
    res = tdpmmu.sweep("demand_paging", GRID, base=BASE, client=cluster)
    assert res.backend == "dask" and res.ok
    assert [p.params for p in res.points] == [p.params for p in serial.points]
    assert [modeled(p) for p in res.points] == [modeled(p) for p in serial.points]
    # the workers are other processes (not this one)
    pids = cluster.run(os.getpid)
    assert len(pids) == 2 and os.getpid() not in pids.values()


def test_dask_by_scheduler_address(cluster: Any) -> None:
    address = cluster.scheduler.address
    res = tdpmmu.sweep("demand_paging", {"vcpus": [1, 2]}, base=BASE, scheduler=address)
    assert res.backend == "dask" and res.ok
    assert [modeled(p) for p in res.points] == [direct(**BASE, vcpus=v) for v in (1, 2)]


def test_dask_failing_point_is_reported(cluster: Any) -> None:
    res = tdpmmu.sweep("demand_paging", {"vcpus": [1, 0, 2]}, base=BASE, client=cluster, retries=0)
    assert [p.ok for p in res.points] == [True, False, True]
    assert res.points[1].error is not None and res.points[1].error.startswith("ConfigError: vcpus")


def test_dask_worker_killed_mid_sweep_is_retried(cluster: Any, tmp_path: Path) -> None:
    marker = tmp_path / "killed-once"
    res = tdpmmu.sweep(
        flaky_demand_paging,
        {"vcpus": [1, 2, 3], "kill": [False, True]},
        base={**BASE, "marker": str(marker)},
        client=cluster,
        retries=2,
    )
    assert marker.exists(), "no worker was killed: the test did not test anything"
    assert res.ok, [p.error for p in res.errors]
    for p in res.points:
        assert modeled(p) == direct(**BASE, vcpus=p.params["vcpus"])
    cluster.wait_for_workers(2, timeout=30)


# ----- the result's forms -----------------------------------------------------------------------


def test_json_round_trip(serial: SweepResult, tmp_path: Path) -> None:
    assert SweepResult.from_json(serial.to_json()) == serial
    serial.write_json(tmp_path / "s.json")
    assert SweepResult.read_json(tmp_path / "s.json") == serial
    assert read_json(tmp_path / "s.json") == json.loads(serial.to_json())
    with pytest.raises(ConfigError, match="not a tdpmmu sweep"):
        SweepResult.from_dict({"tool": "tdpmmu", "kind": "envelope"})
    # a sweep with a failed point round-trips too, and the envelope reloads
    res = tdpmmu.sweep("demand_paging", {"vcpus": [1, 0]}, base=BASE, processes=0)
    assert SweepResult.from_json(res.to_json(indent=1)) == res
    env = res.points[0].envelope()
    assert env.modeled_ns == res.points[0].result["modeled_ns"]


def test_csv_round_trip(serial: SweepResult, tmp_path: Path) -> None:
    serial.to_csv(tmp_path / "s.csv")
    back = read_csv(tmp_path / "s.csv")
    assert back == serial.records()
    rows = [
        {"a": 1, "b": 0.1 + 0.2, "c": None, "d": True, "e": "x,y", "g": "1.5"},
        {"a": 2, "f": math.inf, "g": "true", "h": "", "i": '"q"', "j": [1, {"k": 2}]},
    ]
    write_csv(tmp_path / "r.csv", rows)
    none = dict.fromkeys("abcdefghij")
    assert read_csv(tmp_path / "r.csv") == [
        {**none, "a": 1, "b": 0.1 + 0.2, "d": True, "e": "x,y", "g": "1.5"},
        {**none, "a": 2, "g": "true", "h": "", "i": '"q"', "j": '[1, {"k": 2}]'},
    ]
    write_json(tmp_path / "r.json", {"x": math.nan, "y": (1, 2)})
    assert read_json(tmp_path / "r.json") == {"x": None, "y": [1, 2]}


def test_to_pandas_has_one_row_per_point(serial: SweepResult) -> None:
    pd = pytest.importorskip("pandas")
    df = serial.to_pandas()
    assert isinstance(df, pd.DataFrame) and len(df) == len(serial.points)
    for col in ("vcpus", "vm_type", "mmu_lock", "seed", "hooks", "modeled_ns", "error"):
        assert col in df.columns
    rate = "overall_demand_paging_rate_pgs_per_s"
    assert list(df[rate]) == [p.metrics[rate] for p in serial.points]
    assert list(df["hooks"]) == [p.row["hooks"] for p in serial.points]
    assert df["error"].isna().all()


def test_table_is_readable(serial: SweepResult) -> None:
    text = serial.table()
    lines = text.splitlines()
    assert lines[0].startswith("demand_paging: 12 points, simulated (modeled time")
    assert all(len(line) <= 100 for line in lines)
    assert "vcpus" in text and "mmu_lock" in text and "vm_type" in text
    assert "wall" not in "".join(lines[1:])  # modeled metrics only by default
    p = serial.points[-1]
    rate = p.metrics["overall_demand_paging_rate_pgs_per_s"]
    assert f"{rate:,.0f}" in text
    t = p.metrics["total_guest_execution_time_s"]
    assert f"{t:.9f}" in text  # seconds to the nanosecond, as the selftest prints them
    one = serial.table(metrics=["modeled_ns"]).splitlines()
    assert one[1].split() == ["vcpus", "vm_type", "mmu_lock", "modeled_ns"]
    assert set(one[2]) == {"-", " "} and len(one) == 3 + 12  # head, header, rule, rows
    assert one[-1].split() == ["4", "tdx", "exclusive", f"{p.result['modeled_ns']:,.0f}"]


def test_records_keep_grid_values_and_canonical_row_values() -> None:
    res = tdpmmu.sweep(
        "demand_paging",
        {"cost.exit_entry_ns": [500.0], "hooks": [None]},
        base=BASE,
        processes=0,
    )
    rec = res.records()[0]
    assert rec["cost.exit_entry_ns"] == 500.0
    assert rec["hooks"] == res.points[0].result["config"]["vm"]["hooks"] == "none"
    assert rec["error"] is None


def test_records_of_a_mapping_value_are_json_text() -> None:
    res = tdpmmu.sweep(
        "demand_paging",
        {"tdx": [{"track": "batched"}]},
        base={**BASE, "vm_type": "tdx"},
        processes=0,
    )
    assert res.ok
    assert json.loads(res.records()[0]["tdx"]) == {"track": "batched"}
    assert isinstance(res.points[0].params["tdx"], Mapping)
