"""The shared Python layer: configuration coercion, VmSpec, and the text renderer."""

import json
from typing import Any

import pytest

import tdpmmu
from tdpmmu import coerce, config, render
from tdpmmu.vmspec import VmSpec

# ----- coercion -------------------------------------------------------------------------------


def test_tdx_options_are_typed_from_the_engines_choices() -> None:
    for key, choices in config.TDX_OPTION_CHOICES.items():
        kind = choices[0] if len(choices) == 1 else None
        if kind == "bool":
            assert coerce.tdx_option(key, "yes") is True
            assert coerce.tdx_option(key, False) is False
            bad: object = "maybe"
        elif kind == "int":
            assert coerce.tdx_option(key, "12") == 12
            bad = "-1"
        elif kind == "probability":
            assert coerce.tdx_option(key, "0.25") == 0.25
            bad = 1.5
        else:
            for name in choices:
                assert coerce.tdx_option(key, f" {name} ") == name
            bad = "no-such-value"
        with pytest.raises(tdpmmu.ConfigError, match=key.replace(".", r"\.")):
            coerce.tdx_option(key, bad)
    with pytest.raises(tdpmmu.ConfigError, match="unknown option"):
        coerce.tdx_option("no_such_option", "1")


@pytest.mark.parametrize("variant", config.VARIANTS, ids=lambda v: v.label)
def test_hooks_follow_the_matrix(variant: config.Variant) -> None:
    assert coerce.hooks(None, variant)[0] == variant.default_design
    for design in config.DESIGNS:
        if design in variant.designs:
            assert coerce.hooks(design, variant) == (design, {}, None)
        else:
            with pytest.raises(tdpmmu.ConfigError, match="hooks"):
                coerce.hooks(design, variant)
    option = next(iter(config.TDX_OPTION_CHOICES))
    value = config.TDX_OPTION_CHOICES[option][0]
    if variant.tdx_options and value not in ("bool", "int", "probability"):
        assert coerce.hooks(None, variant, {option: value})[1] == {option: value}
    elif not variant.tdx_options:
        with pytest.raises(tdpmmu.ConfigError, match="tdx"):
            coerce.hooks(None, variant, {option: value})


def test_hook_design_options_merge_under_explicit_ones() -> None:
    tdx = config.variant("tdx")
    design = tdpmmu.HookDesign("private", track="batched", interface="two_hook")
    name, options, obj = coerce.hooks(design, tdx, {"track": "per_page"})
    assert (name, obj) == ("private", None)
    assert options == {"track": "per_page", "interface": "two_hook"}


def test_hook_objects_need_the_four_methods() -> None:
    class Hooks:
        def link_external_spt(self, gfn: int, level: int, value: int) -> int:
            return 0

        set_external_spte = remove_external_spte = free_external_spt = link_external_spt

    tdx = config.variant("tdx")
    hooks = Hooks()
    assert coerce.hooks(hooks, tdx) == ("mirror", {}, hooks)
    with pytest.raises(TypeError, match="needs a method link_external_spt"):
        coerce.hooks(object(), tdx)

    class Partial:
        link_external_spt = set_external_spte = remove_external_spte = Hooks.link_external_spt

    with pytest.raises(TypeError, match="needs a method free_external_spt"):
        coerce.hooks(Partial(), tdx)


def test_sizes_costs_and_counts() -> None:
    assert coerce.size("64M", "memory") == 64 << 20
    with pytest.raises(tdpmmu.ConfigError, match="memory"):
        coerce.size("3000", "memory")
    with pytest.raises(tdpmmu.ConfigError, match="memory"):
        coerce.size(0, "memory")
    assert coerce.folio("2MiB") == 2 << 20
    with pytest.raises(tdpmmu.ConfigError, match="folio"):
        coerce.folio("1G")
    assert coerce.backing("1G") == 1 << 30
    assert coerce.cost_model(None) == tdpmmu.CostModel()
    assert coerce.cost_model({"exit_entry_ns": 1}).exit_entry_ns == 1
    with pytest.raises(tdpmmu.ConfigError, match="bogus_ns"):
        coerce.cost_model({"bogus_ns": 1})
    with pytest.raises(TypeError, match="costs"):
        coerce.cost_model(3)
    with pytest.raises(TypeError, match="vcpus"):
        coerce.count(True, "vcpus")
    with pytest.raises(tdpmmu.ConfigError, match="levels"):
        coerce.levels(3)


# ----- VmSpec -----------------------------------------------------------------------------------


def test_vm_spec_round_trips_and_builds_the_vm_it_describes() -> None:
    spec = VmSpec.create(
        "sw_protected",
        memory="8MiB",
        vcpus=2,
        backing="2M",
        folio="2M",
        mirror=True,
        hooks=tdpmmu.HookDesign("private", interface="two_hook"),
        costs={"spte_update_ns": 1.0},
        seed=3,
    )
    assert spec.label == "sw_protected+mirror" and spec.hooks == "private"
    assert spec.tdx == {"interface": "two_hook"}
    assert VmSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    vm = spec.build()
    assert (vm.vm_type, vm.memory, vm.vcpus, vm.hooks_name) == (
        "sw_protected",
        8 << 20,
        2,
        "private",
    )
    assert vm.backing == 2 << 20 and vm.costs == spec.costs
    assert "sw_protected+mirror/private" in spec.describe()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"vm_type": "tdx", "memory": "3M", "backing": "2M"}, "memory"),
        ({"vm_type": "snp", "hooks": "mirror"}, "hooks"),
        ({"vm_type": "default", "mirror": True}, "mirror"),
        ({"vm_type": "tdx", "levels": 6}, "levels"),
    ],
)
def test_vm_spec_refuses_bad_configurations(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(tdpmmu.ConfigError, match=match):
        VmSpec.create(**kwargs)


# ----- the text renderer ----------------------------------------------------------------------


def test_table_aligns_columns_under_multi_line_headers() -> None:
    lines = render.table(
        [render.Column("name", right=False, key=True), render.Column(("total", "ms"))],
        [["a", "1.0"], ["longer", "12,345.6"]],
    )
    assert lines == [
        "           total",
        "name          ms",
        "------  --------",
        "a            1.0",
        "longer  12,345.6",
    ]


def test_wide_tables_are_split_and_repeat_the_key_columns() -> None:
    cols = [render.Column("row", right=False, key=True)]
    cols += [render.Column(f"column {i}") for i in range(12)]
    rows = [[f"r{j}", *(f"<{j}:{i:02d}>{'#' * 5}" for i in range(12))] for j in range(3)]
    lines = render.table(cols, rows, width=60)
    assert max(len(line) for line in lines) <= 60
    blocks = "\n".join(lines).split("\n\n")
    assert len(blocks) > 1
    for block in blocks:
        assert block.splitlines()[-1].startswith("r2")  # every block has every row, labelled
    # Every cell is shown exactly once.
    text = "\n".join(lines)
    for row in rows:
        for cell in row[1:]:
            assert text.count(cell) == 1


def test_wrap_keeps_lines_within_the_width() -> None:
    text = "word " * 80
    lines = render.wrap(text)
    assert len(lines) > 1 and all(len(line) <= render.WIDTH for line in lines)
    assert all(line.startswith("  ") for line in lines[1:])
    with pytest.raises(ValueError, match="cells"):
        render.table([render.Column("a")], [["1", "2"]])
