//! The exception hierarchy (`TdpmmuError` ⊃ `ConfigError` (also a `ValueError`), `VmBugged`,
//! `InvariantError`, `OutOfMemory`) and the mapping of core errors and panics onto it.

use std::panic::{AssertUnwindSafe, catch_unwind};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyType};

use tdpmmu_core::{self as core, Error};

pub struct ErrTypes {
    pub base: Py<PyType>,
    pub config: Py<PyType>,
    pub bugged: Py<PyType>,
    pub invariant: Py<PyType>,
    pub oom: Py<PyType>,
}

static ERR_TYPES: PyOnceLock<ErrTypes> = PyOnceLock::new();

pub fn err_types(py: Python<'_>) -> PyResult<&ErrTypes> {
    ERR_TYPES.get_or_try_init(py, || {
        // ConfigError is both a TdpmmuError and a ValueError: built with Python's own class
        // machinery because it has two bases.
        let ns = PyDict::new(py);
        py.run(
            c"class TdpmmuError(Exception):\n    '''Base class of every tdpmmu error.'''\n    __module__ = 'tdpmmu'\n\
class ConfigError(TdpmmuError, ValueError):\n    '''Bad configuration or argument (names the argument and what it allows); the VM is unchanged.'''\n    __module__ = 'tdpmmu'\n\
class VmBugged(TdpmmuError):\n    '''A rule KVM guards with KVM_BUG_ON was broken; the VM refuses further operations.'''\n    __module__ = 'tdpmmu'\n\
class InvariantError(TdpmmuError):\n    '''check() found a broken invariant (the message says which).'''\n    __module__ = 'tdpmmu'\n\
class OutOfMemory(TdpmmuError):\n    '''Page-table or metadata memory could not be had (budget, arena or host); nothing changed.'''\n    __module__ = 'tdpmmu'\n",
            Some(&ns),
            Some(&ns),
        )?;
        let get = |n: &str| -> PyResult<Py<PyType>> {
            Ok(ns
                .get_item(n)?
                .expect("defined above")
                .cast_into::<PyType>()?
                .unbind())
        };
        Ok::<_, PyErr>(ErrTypes {
            base: get("TdpmmuError")?,
            config: get("ConfigError")?,
            bugged: get("VmBugged")?,
            invariant: get("InvariantError")?,
            oom: get("OutOfMemory")?,
        })
    })
}

pub fn to_py(py: Python<'_>, e: Error) -> PyErr {
    let Ok(t) = err_types(py) else {
        return PyValueError::new_err(e.to_string());
    };
    let ty = match &e {
        Error::Config(_) => &t.config,
        Error::Bugged(_) => &t.bugged,
        Error::Invariant(_) => &t.invariant,
        Error::OutOfMemory(_) => &t.oom,
        Error::Interrupted => {
            return pyo3::exceptions::PyKeyboardInterrupt::new_err("tdpmmu: interrupted");
        }
        Error::Livelock(_) => &t.base,
    };
    PyErr::from_type(ty.bind(py).clone(), e.to_string())
}

/// A `ConfigError` with this message.
pub fn config_err(py: Python<'_>, msg: impl Into<String>) -> PyErr {
    to_py(py, Error::Config(msg.into()))
}

/// A `TdpmmuError` (the base class) with this message.
pub fn base_err(py: Python<'_>, msg: impl Into<String>) -> PyErr {
    match err_types(py) {
        Ok(t) => PyErr::from_type(t.base.bind(py).clone(), msg.into()),
        Err(e) => e,
    }
}

fn panic_to_py(py: Python<'_>, p: Box<dyn std::any::Any + Send>) -> PyErr {
    let msg = p
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    base_err(py, format!("internal error in tdpmmu-core: {msg}"))
}

/// Run core code with the GIL held (for calls that take no VM lock); panics become
/// `TdpmmuError`.
pub fn call<T>(py: Python<'_>, f: impl FnOnce() -> core::Result<T>) -> PyResult<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(to_py(py, e)),
        Err(p) => Err(panic_to_py(py, p)),
    }
}

thread_local! {
    /// When this thread last looked for a pending signal, and the exception it found.
    static SIGNALS: std::cell::RefCell<(Option<std::time::Instant>, Option<PyErr>)> =
        const { std::cell::RefCell::new((None, None)) };
}

static MAIN_THREAD: std::sync::OnceLock<std::thread::ThreadId> = std::sync::OnceLock::new();

/// Remember the thread that imported the module: Python delivers signals there.
pub fn set_main_thread() {
    let _ = MAIN_THREAD.set(std::thread::current().id());
}

/// The core's interrupt check on the main thread: at most every 50 ms, take the GIL and run
/// Python's signal handlers; a raised exception (KeyboardInterrupt) is kept to re-raise.
fn check_signals() -> bool {
    SIGNALS.with(|s| {
        let mut s = s.borrow_mut();
        if s.1.is_some() {
            return true;
        }
        let now = std::time::Instant::now();
        if s.0.is_some_and(|t| now.duration_since(t).as_millis() < 50) {
            return false;
        }
        s.0 = Some(now);
        if let Err(e) = Python::attach(|py| py.check_signals()) {
            s.1 = Some(e);
            return true;
        }
        false
    })
}

/// Run core code with the GIL released; panics become `TdpmmuError`. On the main thread long
/// operations poll for Ctrl-C and end with the KeyboardInterrupt Python raised.
pub fn call_detached<T: Send>(
    py: Python<'_>,
    f: impl FnOnce() -> core::Result<T> + Send,
) -> PyResult<T> {
    let on_main = MAIN_THREAD.get() == Some(&std::thread::current().id());
    let r = py.detach(move || {
        catch_unwind(AssertUnwindSafe(|| {
            if on_main {
                core::op::with_interrupt_check(check_signals, f)
            } else {
                f()
            }
        }))
    });
    match r {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(Error::Interrupted)) => Err(SIGNALS
            .with(|s| s.borrow_mut().1.take())
            .unwrap_or_else(|| to_py(py, Error::Interrupted))),
        Ok(Err(e)) => Err(to_py(py, e)),
        Err(p) => Err(panic_to_py(py, p)),
    }
}
