"""Size and backing arguments."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tdpmmu import ConfigError
from tdpmmu.sizes import format_size, parse_backing, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4K", 4096),
        ("4k", 4096),
        ("2M", 2 << 20),
        ("1G", 1 << 30),
        ("16GiB", 16 << 30),
        ("512MiB", 512 << 20),
        ("64MB", 64 << 20),
        ("1T", 1 << 40),
        ("3P", 3 << 50),
        ("0x1000", 4096),
        ("4096", 4096),
        (" 10M ", 10 << 20),
        ("8b", 8),
        (8192, 8192),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "lots", "1.5G", "-4K", "4KX", "0xZZ", "G"])
def test_parse_size_names_the_argument(bad: str) -> None:
    with pytest.raises(ConfigError, match="bytes_per_vcpu"):
        parse_size(bad, "bytes_per_vcpu")
    with pytest.raises(ValueError):  # ConfigError is a ValueError
        parse_size(bad)


def test_parse_size_types() -> None:
    with pytest.raises(TypeError, match="memory"):
        parse_size(True, "memory")
    with pytest.raises(TypeError, match="memory"):
        parse_size(1.5, "memory")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="memory"):
        parse_size(-1, "memory")


def test_parse_backing() -> None:
    assert [parse_backing(b) for b in ("4K", "2M", "1G", "2MiB", 4096)] == [
        4096,
        2 << 20,
        1 << 30,
        2 << 20,
        4096,
    ]
    for bad in ("8K", "4M", 0, "anonymous"):
        with pytest.raises(ConfigError, match="backing"):
            parse_backing(bad)


@given(st.integers(min_value=0, max_value=1 << 62))
def test_format_round_trip(n: int) -> None:
    assert parse_size(format_size(n)) == n
