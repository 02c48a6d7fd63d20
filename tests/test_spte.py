"""Python SPTE predicates (written from the bit layout) against the engine's constructors."""

from hypothesis import given
from hypothesis import strategies as st

from tdpmmu import spte

pfns = st.integers(min_value=0, max_value=(1 << 40) - 1)
levels = st.integers(min_value=1, max_value=3)


@given(pfn=pfns, level=levels, exec_=st.booleans(), prefetch=st.booleans())
def test_leaf_round_trip(pfn: int, level: int, exec_: bool, prefetch: bool) -> None:
    value = spte.make_leaf(pfn, level, exec=exec_, prefetch=prefetch)
    assert spte.pfn(value) == pfn
    assert spte.is_shadow_present(value)
    assert not spte.is_frozen(value)
    assert spte.is_last(value, level)
    assert value >> 63 == 1  # suppress-#VE on every present entry
    d = spte.decode(value)
    assert d["pfn"] == pfn
    assert d["present"] and not d["mmio"] and not d["frozen"]
    assert d["large"] == (level > 1)
    assert d["executable"] == exec_
    assert d["accessed"] == (not prefetch)


@given(pfn=pfns, level=st.integers(min_value=2, max_value=5))
def test_nonleaf_is_not_last_above_4k(pfn: int, level: int) -> None:
    value = spte.make_nonleaf(pfn)
    assert value == pfn << 12 | 0x8000_0000_0000_0907
    assert not spte.is_last(value, level)
    assert spte.pfn(value) == pfn
    assert spte.decode(value)["present"]


@given(gfn=pfns, generation=st.integers(min_value=0, max_value=(1 << 19) - 1))
def test_mmio_is_neither_present_nor_frozen(gfn: int, generation: int) -> None:
    value = spte.make_mmio(gfn, generation)
    assert not spte.is_shadow_present(value)
    assert not spte.is_frozen(value)
    assert value >> 63 == 0  # EPT misconfig encoding, no SVE
    assert value & 0x7 == 0x6
    d = spte.decode(value)
    assert d["mmio"] and d["mmio_generation"] == generation


def test_nonpresent_values() -> None:
    for value in (spte.SHADOW_NONPRESENT_VALUE, spte.FROZEN_SPTE):
        d = spte.decode(value)
        assert not d["present"] and not d["mmio"]
        assert not spte.is_shadow_present(value)
    assert spte.FROZEN_SPTE == spte.SHADOW_NONPRESENT_VALUE | 0x5A0
