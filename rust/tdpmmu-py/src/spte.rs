//! SPTE helpers (core `spte`) and the benchmark floor.

use pyo3::prelude::*;
use pyo3::types::PyDict;

use tdpmmu_core as core;

use crate::args::{Int, gfn_vec, in_range};
use crate::errors::{call_detached, config_err};

/// Name the fields of a 64-bit SPTE as KVM's EPT format defines them (``tdpmmu.spte.decode``).
///
/// Pure bit decoding: the level is not known, so bit 7 is reported as ``large`` and a present
/// entry's ``kind`` says which of leaf and non-leaf it can be.
///
/// Args:
///     value: the SPTE, an int in ``0..2**64``.
///
/// Returns:
///     dict: ``tdpmmu.types.SpteFields``: ``value``; ``kind`` (``"frozen"``, ``"mmio"``,
///     ``"nonpresent"``, ``"huge-leaf-or-4k-nonleaf"`` when bit 7 is set, else
///     ``"leaf-or-nonleaf"``); ``present`` (bit 11, KVM's ``is_shadow_present_pte``);
///     ``frozen`` (equal to ``FROZEN_SPTE``); ``mmio``; ``readable``, ``writable``,
///     ``executable`` (bits 0-2); ``memtype`` (bits 3-5, 6 = write-back); ``ipat``; ``large``;
///     ``accessed``; ``dirty``; ``host_writable`` (bit 57); ``mmu_writable`` (bit 58);
///     ``suppress_ve`` (bit 63); ``pfn`` (bits 51:12: a data page, a table, or an MMIO SPTE's
///     gfn); ``mmio_generation`` (the memslot generation an MMIO SPTE records, None for other
///     entries).
///
/// Raises:
///     OverflowError: ``value`` is negative or >= 2**64.
///     TypeError: ``value`` is not an int.
#[pyfunction]
pub fn spte_decode(py: Python<'_>, value: u64) -> PyResult<Bound<'_, PyDict>> {
    let d = core::spte::decode(value);
    let out = PyDict::new(py);
    out.set_item("value", d.value)?;
    out.set_item("kind", d.kind)?;
    out.set_item("present", d.present)?;
    out.set_item("frozen", d.frozen)?;
    out.set_item("mmio", d.mmio)?;
    out.set_item("readable", d.readable)?;
    out.set_item("writable", d.writable)?;
    out.set_item("executable", d.executable)?;
    out.set_item("memtype", d.memtype)?;
    out.set_item("ipat", d.ipat)?;
    out.set_item("large", d.large)?;
    out.set_item("accessed", d.accessed)?;
    out.set_item("dirty", d.dirty)?;
    out.set_item("host_writable", d.host_writable)?;
    out.set_item("mmu_writable", d.mmu_writable)?;
    out.set_item("suppress_ve", d.suppress_ve)?;
    out.set_item("pfn", d.pfn)?;
    out.set_item("mmio_generation", d.mmio_generation)?;
    Ok(out)
}

/// The leaf SPTE KVM's ``make_spte`` builds for a writable write-back host page.
///
/// ``pfn << 12 | 0x8600_0000_0000_0B77`` for a 4 KiB leaf (present, RWX, WB, IPAT, A, D, host-
/// and MMU-writable, suppress-#VE); a 2 MiB or 1 GiB leaf also sets bit 7. ``pfn`` is used as
/// given (not aligned to the level).
///
/// Args:
///     pfn: host page-frame number, in ``0..2**40``.
///     level: 1 (4 KiB), 2 (2 MiB) or 3 (1 GiB).
///     exec: keep X (default True); False is a huge leaf made under ``nx_huge_pages``.
///     prefetch: a pre-fault's leaf, with Accessed clear (default False).
///
/// Returns:
///     int: the SPTE.
///
/// Raises:
///     ConfigError: naming ``pfn`` or ``level`` out of range.
///     OverflowError: ``level`` is negative or above 255.
///     TypeError: an argument of the wrong type (a bool ``pfn``, an int ``exec``).
#[pyfunction]
#[pyo3(signature = (pfn, level, *, exec = true, prefetch = false))]
pub fn make_leaf_spte(
    py: Python<'_>,
    pfn: Int,
    level: u8,
    exec: bool,
    prefetch: bool,
) -> PyResult<u64> {
    let pfn = in_range(py, "pfn", &pfn, 1 << 40)?;
    if !(1..=3).contains(&level) {
        return Err(config_err(
            py,
            format!("level: must be 1, 2 or 3, got {level}"),
        ));
    }
    Ok(core::spte::make_leaf_spte(pfn, level, exec, prefetch))
}

/// The non-leaf SPTE that links the page table at ``child_pfn`` (``make_nonleaf_spte``).
///
/// ``child_pfn << 12 | 0x8000_0000_0000_0907``: present, RWX, Accessed, suppress-#VE.
///
/// Args:
///     child_pfn: host page-frame number of the child table, in ``0..2**40``.
///
/// Returns:
///     int: the SPTE.
///
/// Raises:
///     ConfigError: naming ``child_pfn`` out of range.
///     TypeError: ``child_pfn`` is not an int (or is a bool).
#[pyfunction]
pub fn make_nonleaf_spte(py: Python<'_>, child_pfn: Int) -> PyResult<u64> {
    Ok(core::spte::make_nonleaf_spte(in_range(
        py,
        "child_pfn",
        &child_pfn,
        1 << 40,
    )?))
}

/// The MMIO SPTE KVM installs for an access to a gfn in no memslot (``make_mmio_spte``).
///
/// An EPT-misconfig encoding (write and execute without read, no bit 11 or 63) that caches the
/// gfn and the memslot generation: ``gen_low << 3 | 0x6 | gfn << 12 | gen_high << 52``. A later
/// access with the same generation is emulated without a page fault.
///
/// Args:
///     gfn: the guest page-frame number, in ``0..2**40``.
///     generation: the memslot generation to record, in ``0..2**19``.
///
/// Returns:
///     int: the SPTE.
///
/// Raises:
///     ConfigError: naming ``gfn`` or ``generation`` out of range.
///     TypeError: an argument is not an int (or is a bool).
#[pyfunction]
pub fn make_mmio_spte(py: Python<'_>, gfn: Int, generation: Int) -> PyResult<u64> {
    let gfn = in_range(py, "gfn", &gfn, 1 << 40)?;
    let generation = in_range(py, "generation", &generation, 1 << 19)?;
    Ok(core::spte::make_mmio_spte(gfn, generation))
}

/// Benchmark floor: map ``gfns`` at 4 KiB in a bare page-table tree with no MMU rules.
///
/// The fastest a 4 KiB mapping can be made in this process (benches/native_floor): no locks,
/// roots, memslots, counters or costs, just table allocation and stores. Not a model of KVM.
///
/// Args:
///     gfns: 1-D numpy array of any integer dtype, each value in ``0..2**36``.
///     levels: paging levels of the tree, 4 (default) or 5.
///
/// Returns:
///     tuple[float, int]: host wall-clock seconds of the mapping loop and the number of tables
///     allocated (root included).
///
/// Raises:
///     ConfigError: naming ``levels`` (not 4 or 5) or ``gfns`` (a value >= 2**36 or < 0).
///     TypeError: ``gfns`` is not a 1-D numpy integer array.
#[pyfunction]
#[pyo3(signature = (gfns, levels = 4))]
pub fn native_floor(py: Python<'_>, gfns: &Bound<'_, PyAny>, levels: u8) -> PyResult<(f64, usize)> {
    let s = gfn_vec(gfns, "gfns")?;
    if levels != 4 && levels != 5 {
        return Err(config_err(py, "levels: must be 4 or 5"));
    }
    if let Some(g) = s.iter().find(|g| **g >= 1 << 36) {
        return Err(config_err(py, format!("gfns: {g:#x} beyond 2**36")));
    }
    call_detached(py, || tdpmmu_native_floor::native_floor(&s, levels))
}
