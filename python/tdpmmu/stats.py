"""Counter snapshots with KVM's stat names (``pf_taken``, ``pf_fixed``, ``pages_4k``, ...)."""

from collections.abc import Iterator, Mapping
from types import MappingProxyType

__all__ = ["Stats"]


class Stats(Mapping[str, int | float]):
    """An immutable snapshot of a VM's counters, read as a mapping: ``stats["pf_fixed"]``.

    ``VM.stats`` returns one. Keys are KVM's counter names (``pf_taken``, ``pf_fixed``,
    ``pages_4k``, ``tdp_mmu_pages``, ``remote_tlb_flush``, ...), the external hooks'
    (``link_external_spt``, ...), SEAMCALL leaves (``"TDH.MEM.PAGE.AUG"``, ...), SNP and
    guest_memfd counters (``rmpupdate``, ``conversions``, ...; all listed in
    ``tdpmmu._core.COUNTER_NAMES``), then ``modeled_ns`` and ``page_table_bytes`` /
    ``page_table_peak_bytes``. Counters are ints; ``modeled_ns`` (the modeled clock, all vCPUs
    and host work) is a float. Taking a snapshot does not change the VM; subtract two snapshots
    to get a delta. A missing key raises ``KeyError``, as for any mapping.

    Args:
        data: name -> value; copied, so later VM activity does not show through.
    """

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, int | float]) -> None:
        # A private copy: later VM activity must not show through an old snapshot.
        self._data: Mapping[str, int | float] = MappingProxyType(dict(data))

    def __getitem__(self, key: str) -> int | float:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __sub__(self, other: Mapping[str, int | float]) -> "Stats":
        """Per-counter difference ``self - other`` (keys missing in ``other`` count as 0).

        Args:
            other: an earlier snapshot (any mapping of name -> number).

        Returns:
            Stats: a snapshot of the deltas, with this snapshot's keys.
        """
        return Stats({k: v - other.get(k, 0) for k, v in self._data.items()})

    def __reduce__(self) -> tuple[type["Stats"], tuple[dict[str, int | float]]]:
        # The read-only view itself cannot be pickled; its contents can.
        return (Stats, (dict(self._data),))

    def to_dict(self) -> dict[str, int | float]:
        """The snapshot as a new plain dict (name -> value). Never raises."""
        return dict(self._data)

    def __repr__(self) -> str:
        # Zero counters are the majority on most VMs; listing them would bury the signal.
        shown = ", ".join(f"{k}={v!r}" for k, v in self._data.items() if v)
        zeros = sum(1 for v in self._data.values() if not v)
        return f"Stats({shown}{'; ' if shown and zeros else ''}{f'{zeros} zero' if zeros else ''})"
