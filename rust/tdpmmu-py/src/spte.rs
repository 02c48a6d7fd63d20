//! SPTE helpers (core `spte`) and the benchmark floor.

use pyo3::prelude::*;
use pyo3::types::PyDict;

use tdpmmu_core as core;

use crate::args::{Int, gfn_vec, in_range};
use crate::errors::{call_detached, config_err};

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

#[pyfunction]
pub fn make_nonleaf_spte(py: Python<'_>, child_pfn: Int) -> PyResult<u64> {
    Ok(core::spte::make_nonleaf_spte(in_range(
        py,
        "child_pfn",
        &child_pfn,
        1 << 40,
    )?))
}

#[pyfunction]
pub fn make_mmio_spte(py: Python<'_>, gfn: Int, generation: Int) -> PyResult<u64> {
    let gfn = in_range(py, "gfn", &gfn, 1 << 40)?;
    let generation = in_range(py, "generation", &generation, 1 << 19)?;
    Ok(core::spte::make_mmio_spte(gfn, generation))
}

/// Benchmark floor (benches/native_floor): map `gfns` at 4K in a bare tree with no MMU
/// rules. Returns (seconds, tables allocated).
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
