//! Python bindings for tdpmmu-core. Thin on purpose: validate and convert arguments, release
//! the GIL around every call that takes a VM lock, convert results, map errors and panics. No
//! MMU logic here. Modules: `errors` (exception hierarchy), `args` (argument conversion),
//! `hooks` (Python hook objects), `vm` (the VM class), `spte` (SPTE helpers), `ret`.

mod args;
mod errors;
mod hooks;
mod ret;
mod spte;
mod vm;

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};

use tdpmmu_core as core;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    errors::set_main_thread();
    let t = errors::err_types(py)?;
    m.add("TdpmmuError", t.base.bind(py))?;
    m.add("ConfigError", t.config.bind(py))?;
    m.add("VmBugged", t.bugged.bind(py))?;
    m.add("InvariantError", t.invariant.bind(py))?;
    m.add("OutOfMemory", t.oom.bind(py))?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add(
        "SHADOW_NONPRESENT_VALUE",
        core::spte::SHADOW_NONPRESENT_VALUE,
    )?;
    m.add("FROZEN_SPTE", core::spte::FROZEN_SPTE)?;
    m.add("TABLE_BASE_PFN", core::arena::TABLE_BASE_PFN)?;
    m.add("DATA_BASE_PFN", core::memslot::DATA_BASE_PFN)?;
    m.add("COST_FIELDS", PyTuple::new(py, core::COST_FIELDS)?)?;
    m.add("COUNTER_NAMES", PyTuple::new(py, core::COUNTER_NAMES)?)?;
    m.add("WAIT_FIELDS", PyTuple::new(py, core::cost::WAIT_FIELDS)?)?;
    m.add(
        "USERFAULT_MODES",
        PyTuple::new(py, core::vtime::Userfault::NAMES)?,
    )?;
    let defaults = core::CostModel::default();
    let cd = PyDict::new(py);
    for (k, v) in core::COST_FIELDS.iter().zip(defaults.rates()) {
        cd.set_item(*k, v)?;
    }
    m.add("COST_DEFAULTS", cd)?;
    m.add("VM_TYPES", PyTuple::new(py, core::config::VmType::NAMES)?)?;
    m.add("DESIGNS", PyTuple::new(py, core::config::Design::NAMES)?)?;
    let rows = PyList::empty(py);
    for v in core::config::MATRIX {
        let d = PyDict::new(py);
        d.set_item("vm_type", v.vm_type.name())?;
        d.set_item("mirror", v.mirror)?;
        let names: Vec<&str> = v.designs.iter().map(|d| d.name()).collect();
        d.set_item("designs", PyTuple::new(py, names)?)?;
        d.set_item("mirror_root", v.mirror_root)?;
        d.set_item("tdx_options", v.tdx_options)?;
        rows.append(d)?;
    }
    m.add("MATRIX", rows.to_tuple())?;
    let choices = PyDict::new(py);
    for (k, allowed) in core::config::tdx_option_choices() {
        choices.set_item(k, PyTuple::new(py, allowed)?)?;
    }
    m.add("TDX_OPTION_CHOICES", choices)?;
    m.add_function(wrap_pyfunction!(spte::spte_decode, m)?)?;
    m.add_function(wrap_pyfunction!(spte::make_leaf_spte, m)?)?;
    m.add_function(wrap_pyfunction!(spte::make_nonleaf_spte, m)?)?;
    m.add_function(wrap_pyfunction!(spte::make_mmio_spte, m)?)?;
    m.add_function(wrap_pyfunction!(spte::native_floor, m)?)?;
    m.add_function(wrap_pyfunction!(ret::_register_ret, m)?)?;
    m.add_class::<vm::Fault>()?;
    m.add_class::<vm::Vm>()?;
    Ok(())
}
