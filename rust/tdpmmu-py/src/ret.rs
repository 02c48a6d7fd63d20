//! `Fault.ret` returns the Python package's `tdpmmu.Ret` members (registered at import).

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;

static RET_MEMBERS: PyOnceLock<Vec<Py<PyAny>>> = PyOnceLock::new();

/// Internal: ``tdpmmu.ret`` hands over ``tdpmmu.Ret``'s members at import.
///
/// Afterwards ``Fault.ret`` returns those members instead of plain ints; before it, plain ints.
///
/// Args:
///     members: the ``Ret`` members in value order (at least 8).
///
/// Returns:
///     None.
///
/// Raises:
///     ValueError: fewer than 8 members.
#[pyfunction]
pub fn _register_ret(py: Python<'_>, members: Vec<Py<PyAny>>) -> PyResult<()> {
    if members.len() < 8 {
        return Err(PyValueError::new_err(
            "members: expected the 8 Ret members in value order",
        ));
    }
    let _ = RET_MEMBERS.set(py, members);
    Ok(())
}

pub fn ret_obj(py: Python<'_>, r: u8) -> Py<PyAny> {
    match RET_MEMBERS.get(py) {
        Some(m) => m[r as usize].clone_ref(py),
        None => r.into_pyobject(py).expect("int").into_any().unbind(),
    }
}
