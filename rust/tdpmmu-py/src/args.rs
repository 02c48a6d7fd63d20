//! Argument conversion at the boundary: integers that refuse `bool`, ranges that raise
//! `ConfigError` naming the argument and the allowed range (in decimal; gfns also in hex),
//! integer arrays of any dtype, copied before the GIL is released.

use numpy::{PyArray1, PyArrayMethods, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::PyBool;

use crate::errors::config_err;

/// A Python int (or an object with `__index__`, such as a numpy integer), never a bool. Ints
/// beyond i128 saturate (every range check refuses them) and keep their text for messages.
pub struct Int(pub i128, pub Option<String>);

impl Int {
    pub const fn of(v: i128) -> Self {
        Int(v, None)
    }
}

impl std::fmt::Display for Int {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.1 {
            Some(text) => f.write_str(text),
            None => write!(f, "{}", self.0),
        }
    }
}

impl<'a, 'py> FromPyObject<'a, 'py> for Int {
    type Error = PyErr;

    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        if obj.is_instance_of::<PyBool>() {
            return Err(PyTypeError::new_err(format!(
                "expected an int, got bool ({})",
                obj.str()?
            )));
        }
        if let Ok(v) = obj.extract::<i128>() {
            return Ok(Int::of(v));
        }
        let Ok(index) = obj.call_method0("__index__") else {
            return Err(PyTypeError::new_err(format!(
                "expected an int, got {}",
                obj.get_type().name()?
            )));
        };
        let negative = index.lt(0i32)?;
        let v = if negative { i128::MIN } else { i128::MAX };
        Ok(Int(v, Some(index.str()?.to_string())))
    }
}

/// `v` as a u64 in `0..limit`, else `ConfigError` naming `name`.
pub fn in_range(py: Python<'_>, name: &str, v: &Int, limit: u128) -> PyResult<u64> {
    if v.0 < 0 || v.0 as u128 >= limit {
        return Err(config_err(
            py,
            format!("{name}: must be in 0..{limit} (exclusive), got {v}"),
        ));
    }
    Ok(v.0 as u64)
}

/// A gfn in `0..max_gfn`, the bound given in hex and decimal.
pub fn gfn_arg(py: Python<'_>, name: &str, v: &Int, max_gfn: u64) -> PyResult<u64> {
    if v.0 < 0 || v.0 as u128 >= max_gfn as u128 {
        return Err(config_err(
            py,
            format!("{name}: gfn must be in 0..{max_gfn:#x} ({max_gfn}, exclusive), got {v}"),
        ));
    }
    Ok(v.0 as u64)
}

/// A page count in `1..=max`.
pub fn count_arg(py: Python<'_>, name: &str, v: &Int, max: u64) -> PyResult<u64> {
    if v.0 <= 0 || v.0 as u128 > max as u128 {
        return Err(config_err(
            py,
            format!("{name}: must be in 1..={max}, got {v}"),
        ));
    }
    Ok(v.0 as u64)
}

/// A 1-D numpy array of any integer dtype as an owned `Vec<u64>`: copied (so another thread
/// cannot change what was validated once the GIL is released); negative values are refused.
pub fn gfn_vec(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<Vec<u64>> {
    let py = obj.py();
    if let Ok(a) = obj.cast::<PyArray1<u64>>() {
        return Ok(a.readonly().as_array().to_vec());
    }
    let Ok(arr) = obj.cast::<PyUntypedArray>() else {
        return Err(PyTypeError::new_err(format!(
            "{name}: expected a 1-D numpy array of integers, got {}",
            obj.get_type().name()?
        )));
    };
    let dtype = arr.dtype();
    let kind = dtype.getattr("kind")?.extract::<String>()?;
    if arr.ndim() != 1 || !(kind == "i" || kind == "u") {
        return Err(PyTypeError::new_err(format!(
            "{name}: expected a 1-D numpy array of integers, got dtype {} and shape {:?}",
            dtype.str()?,
            arr.shape()
        )));
    }
    if kind == "i" {
        let neg = obj.call_method1("__lt__", (0,))?;
        if neg.call_method0("any")?.is_truthy()? {
            let i: usize = neg.call_method0("argmax")?.extract()?;
            let v = obj.get_item(i)?;
            return Err(config_err(
                py,
                format!("{name}: gfns must be >= 0, got {name}[{i}] = {}", v.str()?),
            ));
        }
    }
    let u = obj.call_method1("astype", ("uint64",))?;
    let a = u.cast::<PyArray1<u64>>()?;
    Ok(a.readonly().as_array().to_vec())
}
