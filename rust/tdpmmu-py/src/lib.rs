//! Python bindings for tdpmmu-core. Thin on purpose: validate arguments, release the GIL for
//! anything that walks page tables in bulk, convert results, map errors. No MMU logic here.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use numpy::{PyArray1, PyArray2, PyArrayMethods, ndarray};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyList, PyTuple, PyType};

use tdpmmu_core::{self as core, Error, MemstressArgs, VmConfig};

// ----- exceptions ------------------------------------------------------------------------------

struct ErrTypes {
    base: Py<PyType>,
    config: Py<PyType>,
    bugged: Py<PyType>,
    invariant: Py<PyType>,
    oom: Py<PyType>,
}

static ERR_TYPES: PyOnceLock<ErrTypes> = PyOnceLock::new();

fn err_types(py: Python<'_>) -> PyResult<&ErrTypes> {
    ERR_TYPES.get_or_try_init(py, || {
        // ConfigError is both a TdpmmuError and a ValueError: built with Python's own class
        // machinery because it has two bases.
        let ns = PyDict::new(py);
        py.run(
            c"class TdpmmuError(Exception):\n    '''Base class of every tdpmmu error.'''\n    __module__ = 'tdpmmu'\n\
class ConfigError(TdpmmuError, ValueError):\n    '''Bad configuration or argument; the VM is unchanged.'''\n    __module__ = 'tdpmmu'\n\
class VmBugged(TdpmmuError):\n    '''A KVM_BUG_ON rule was broken; the VM refuses further operations.'''\n    __module__ = 'tdpmmu'\n\
class InvariantError(TdpmmuError):\n    '''check() found a broken invariant.'''\n    __module__ = 'tdpmmu'\n\
class OutOfMemory(TdpmmuError):\n    '''The page-table arena or the host ran out of memory.'''\n    __module__ = 'tdpmmu'\n",
            Some(&ns),
            Some(&ns),
        )?;
        let get = |n: &str| -> PyResult<Py<PyType>> {
            Ok(ns.get_item(n)?.expect("defined above").cast_into::<PyType>()?.unbind())
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

fn to_py(py: Python<'_>, e: Error) -> PyErr {
    let Ok(t) = err_types(py) else {
        return PyValueError::new_err(e.to_string());
    };
    let ty = match &e {
        Error::Config(_) => &t.config,
        Error::Bugged(_) => &t.bugged,
        Error::Invariant(_) => &t.invariant,
        Error::OutOfMemory(_) => &t.oom,
    };
    PyErr::from_type(ty.bind(py).clone(), e.to_string())
}

fn panic_to_py(py: Python<'_>, p: Box<dyn std::any::Any + Send>) -> PyErr {
    let msg = p
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    match err_types(py) {
        Ok(t) => PyErr::from_type(
            t.base.bind(py).clone(),
            format!("internal error in tdpmmu-core: {msg}"),
        ),
        Err(e) => e,
    }
}

/// Run core code with the GIL held; panics become TdpmmuError.
fn call<T>(py: Python<'_>, f: impl FnOnce() -> core::Result<T>) -> PyResult<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(to_py(py, e)),
        Err(p) => Err(panic_to_py(py, p)),
    }
}

/// Run core code with the GIL released; panics become TdpmmuError.
fn call_detached<T: Send>(
    py: Python<'_>,
    f: impl FnOnce() -> core::Result<T> + Send,
) -> PyResult<T> {
    match py.detach(move || catch_unwind(AssertUnwindSafe(f))) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(to_py(py, e)),
        Err(p) => Err(panic_to_py(py, p)),
    }
}

fn nonneg(name: &str, v: i128, limit: u128) -> PyResult<u64> {
    if v < 0 || v as u128 >= limit {
        return Err(PyValueError::new_err(format!(
            "{name}: must be in 0..{limit:#x}, got {v}"
        )));
    }
    Ok(v as u64)
}

// ----- Ret -------------------------------------------------------------------------------------

static RET_MEMBERS: PyOnceLock<Vec<Py<PyAny>>> = PyOnceLock::new();

/// Let the Python package hand over its `Ret` IntEnum so `Fault.ret` returns its members.
#[pyfunction]
fn _register_ret(py: Python<'_>, members: Vec<Py<PyAny>>) -> PyResult<()> {
    if members.len() < 8 {
        return Err(PyValueError::new_err(
            "members: expected the 8 Ret members in value order",
        ));
    }
    let _ = RET_MEMBERS.set(py, members);
    Ok(())
}

fn ret_obj(py: Python<'_>, r: u8) -> Py<PyAny> {
    match RET_MEMBERS.get(py) {
        Some(m) => m[r as usize].clone_ref(py),
        None => r.into_pyobject(py).expect("int").into_any().unbind(),
    }
}

// ----- SPTE helpers ----------------------------------------------------------------------------

#[pyfunction]
fn spte_decode(py: Python<'_>, value: u64) -> PyResult<Bound<'_, PyDict>> {
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
fn make_leaf_spte(pfn: i128, level: u8, exec: bool, prefetch: bool) -> PyResult<u64> {
    let pfn = nonneg("pfn", pfn, 1 << 40)?;
    if !(1..=3).contains(&level) {
        return Err(PyValueError::new_err(format!(
            "level: must be 1, 2 or 3, got {level}"
        )));
    }
    Ok(core::spte::make_leaf_spte(pfn, level, exec, prefetch))
}

#[pyfunction]
fn make_nonleaf_spte(child_pfn: i128) -> PyResult<u64> {
    Ok(core::spte::make_nonleaf_spte(nonneg(
        "child_pfn",
        child_pfn,
        1 << 40,
    )?))
}

#[pyfunction]
fn make_mmio_spte(gfn: i128, generation: i128) -> PyResult<u64> {
    let gfn = nonneg("gfn", gfn, 1 << 40)?;
    let generation = nonneg("generation", generation, 1 << 19)?;
    Ok(core::spte::make_mmio_spte(gfn, generation))
}

/// Benchmark floor: map `gfns` at 4K in a bare tree (no MMU rules). Returns (seconds, tables).
#[pyfunction]
#[pyo3(signature = (gfns, levels = 4))]
fn native_floor(py: Python<'_>, gfns: &Bound<'_, PyAny>, levels: u8) -> PyResult<(f64, usize)> {
    let arr = u64_array(gfns, "gfns")?;
    let ro = arr.readonly();
    let s = ro
        .as_slice()
        .map_err(|e| PyValueError::new_err(format!("gfns: {e}")))?;
    if levels != 4 && levels != 5 {
        return Err(PyValueError::new_err("levels: must be 4 or 5"));
    }
    if let Some(g) = s.iter().find(|g| **g >= 1 << 36) {
        return Err(PyValueError::new_err(format!("gfns: {g:#x} beyond 2**36")));
    }
    call_detached(py, || core::floor::native_floor(s, levels))
}

fn u64_array<'py>(obj: &Bound<'py, PyAny>, name: &str) -> PyResult<Bound<'py, PyArray1<u64>>> {
    match obj.cast::<PyArray1<u64>>() {
        Ok(a) => Ok(a.clone()),
        Err(_) => {
            let desc = match (obj.getattr("dtype"), obj.getattr("shape")) {
                (Ok(d), Ok(s)) => format!("array of dtype {} and shape {}", d.str()?, s.str()?),
                _ => format!("{}", obj.get_type().name()?),
            };
            Err(PyTypeError::new_err(format!(
                "{name}: expected a 1-D numpy array of dtype uint64, got {desc}"
            )))
        }
    }
}

// ----- user hook objects ----------------------------------------------------------------------

/// A Python object with the four hook methods, called where KVM calls the external hooks.
/// Slow by design (every call re-enters Python); each method returns 0, -16 (-EBUSY) or
/// another negative errno (treated as a failure that marks the VM bugged).
struct PyHooks {
    obj: Py<PyAny>,
}

impl PyHooks {
    fn call(
        &self,
        ctx: &mut core::stats::Ctx,
        name: &str,
        args: (u64, u8, u64),
    ) -> core::external::HookRet {
        use core::external::HookRet;
        Python::attach(|py| match self.obj.call_method1(py, name, args) {
            Ok(v) => match v.extract::<Option<i64>>(py) {
                Ok(None | Some(0)) => HookRet::Ok,
                Ok(Some(-16)) => HookRet::Busy,
                Ok(Some(e)) => {
                    ctx.bug(format!("hook {name} returned {e}"));
                    HookRet::Io
                }
                Err(_) => {
                    ctx.bug(format!("hook {name} returned a non-integer"));
                    HookRet::Io
                }
            },
            Err(e) => {
                ctx.bug(format!("hook {name} raised {e}"));
                HookRet::Io
            }
        })
    }
}

impl core::external::ExternalOps for PyHooks {
    fn link_external_spt(
        &self,
        ctx: &mut core::stats::Ctx,
        gfn: u64,
        level: u8,
        child: u32,
    ) -> core::external::HookRet {
        ctx.inc(core::stats::C::link_external_spt);
        ctx.trace("link_external_spt", gfn, level, child as u64);
        self.call(
            ctx,
            "link_external_spt",
            (gfn, level, core::arena::Arena::pfn(child)),
        )
    }
    fn set_external_spte(
        &self,
        ctx: &mut core::stats::Ctx,
        gfn: u64,
        level: u8,
        spte: u64,
    ) -> core::external::HookRet {
        ctx.inc(core::stats::C::set_external_spte);
        ctx.trace("set_external_spte", gfn, level, spte);
        self.call(ctx, "set_external_spte", (gfn, level, spte))
    }
    fn remove_external_spte(&self, ctx: &mut core::stats::Ctx, gfn: u64, level: u8, spte: u64) {
        ctx.inc(core::stats::C::remove_external_spte);
        ctx.trace("remove_external_spte", gfn, level, spte);
        let _ = self.call(ctx, "remove_external_spte", (gfn, level, spte));
    }
    fn free_external_spt(
        &self,
        ctx: &mut core::stats::Ctx,
        gfn: u64,
        level: u8,
        table: u32,
    ) -> core::external::HookRet {
        ctx.inc(core::stats::C::free_external_spt);
        ctx.trace("free_external_spt", gfn, level, table as u64);
        self.call(
            ctx,
            "free_external_spt",
            (gfn, level, core::arena::Arena::pfn(table)),
        )
    }
}

// ----- Fault -----------------------------------------------------------------------------------

/// Outcome of one fault.
#[pyclass(frozen, module = "tdpmmu._core", name = "Fault")]
pub struct Fault {
    r: core::FaultResult,
}

#[pymethods]
impl Fault {
    #[getter]
    fn ret(&self, py: Python<'_>) -> Py<PyAny> {
        ret_obj(py, self.r.ret as u8)
    }
    #[getter]
    fn level(&self) -> u8 {
        self.r.level
    }
    #[getter]
    fn retries(&self) -> u32 {
        self.r.retries
    }
    #[getter]
    fn modeled_ns(&self) -> f64 {
        self.r.modeled_ns
    }
    #[getter]
    fn spte(&self) -> u64 {
        self.r.spte
    }
    #[getter]
    fn gfn(&self) -> u64 {
        self.r.gfn
    }
    #[getter]
    fn private(&self) -> bool {
        self.r.private
    }
    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let ret = ret_obj(py, self.r.ret as u8);
        Ok(format!(
            "Fault(ret={}, gfn={:#x}, level={}, retries={}, modeled_ns={}, spte={:#x}, private={})",
            ret.bind(py).str()?,
            self.r.gfn,
            self.r.level,
            self.r.retries,
            self.r.modeled_ns,
            self.r.spte,
            if self.r.private { "True" } else { "False" }
        ))
    }
}

// ----- Vm --------------------------------------------------------------------------------------

/// Native VM. Use `tdpmmu.VM`, which subclasses this and adds the friendly constructor.
#[pyclass(subclass, frozen, module = "tdpmmu._core", name = "Vm")]
pub struct Vm {
    inner: Arc<core::Vm>,
}

#[pymethods]
impl Vm {
    #[new]
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (vm_type, memory, vcpus, levels, backing, hooks, costs, seed, trace, nx_huge_pages, slot_zap_all, options = None, hook_object = None))]
    fn new(
        py: Python<'_>,
        vm_type: String,
        memory: i128,
        vcpus: i128,
        levels: i128,
        backing: i128,
        hooks: String,
        costs: &Bound<'_, PyDict>,
        seed: i128,
        trace: bool,
        nx_huge_pages: bool,
        slot_zap_all: bool,
        options: Option<&Bound<'_, PyDict>>,
        hook_object: Option<Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let mut cm = core::CostModel::default();
        for (k, v) in costs.iter() {
            let k: String = k
                .extract()
                .map_err(|_| PyTypeError::new_err("costs: keys must be str"))?;
            let v: f64 = v
                .extract()
                .map_err(|_| PyTypeError::new_err(format!("costs[{k:?}]: must be a number")))?;
            cm.set(&k, v).map_err(|e| to_py(py, e))?;
        }
        let cfg = VmConfig {
            vm_type,
            memory: nonneg("memory", memory, 1 << 62)?,
            vcpus: nonneg("vcpus", vcpus, 1 << 31)? as u32,
            levels: nonneg("levels", levels, 256)? as u8,
            backing: nonneg("backing", backing, 1 << 62)?,
            hooks,
            costs: cm,
            seed: nonneg("seed", seed, 1 << 64)?,
            trace,
            nx_huge_pages,
            slot_zap_all,
            ..VmConfig::default()
        };
        let mut cfg = cfg;
        if let Some(o) = options {
            for (k, v) in o.iter() {
                let k: String = k
                    .extract()
                    .map_err(|_| PyTypeError::new_err("options: keys must be str"))?;
                let v = v.str()?.to_string();
                cfg.set_option(&k, &v).map_err(|e| to_py(py, e))?;
            }
        }
        let vm = match hook_object {
            None => call(py, || core::Vm::new(cfg))?,
            Some(obj) => {
                for m in [
                    "link_external_spt",
                    "set_external_spte",
                    "remove_external_spte",
                    "free_external_spt",
                ] {
                    if !obj.hasattr(m)? {
                        return Err(PyTypeError::new_err(format!(
                            "hooks: a hook object needs a method {m}(gfn, level, value); got {}",
                            obj.get_type().name()?
                        )));
                    }
                }
                let hooks = Arc::new(PyHooks { obj: obj.unbind() });
                call(py, || core::Vm::with_hooks(cfg, hooks))?
            }
        };
        Ok(Self {
            inner: Arc::new(vm),
        })
    }

    #[getter]
    fn vm_type(&self) -> &str {
        &self.inner.cfg.vm_type
    }
    #[getter]
    fn memory(&self) -> u64 {
        self.inner.cfg.memory
    }
    #[getter]
    fn vcpus(&self) -> u32 {
        self.inner.cfg.vcpus
    }
    #[getter]
    fn levels(&self) -> u8 {
        self.inner.cfg.levels
    }
    #[getter]
    fn max_gfn(&self) -> u64 {
        self.inner.max_gfn
    }
    /// The shared (direct) alias bit as a gfn bit value; 0 if the VM has none.
    #[getter]
    fn shared_bit(&self) -> u64 {
        self.inner.gfn_direct_bits
    }
    #[getter]
    fn bugged(&self) -> bool {
        self.inner.bugged.load(std::sync::atomic::Ordering::Acquire)
    }
    #[getter]
    fn hooks_name(&self) -> &str {
        &self.inner.cfg.hooks
    }
    #[getter]
    fn memslot_generation(&self) -> u64 {
        self.inner.memslot_generation()
    }
    /// TDX: the TD was finalized (is runnable).
    #[getter]
    fn finalized(&self) -> bool {
        self.inner.finalized()
    }
    #[getter]
    fn destroyed(&self) -> bool {
        self.inner
            .destroyed
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// KVM_SET_MEMORY_ATTRIBUTES over [gfn, gfn + npages); returns the leaves zapped.
    #[pyo3(signature = (gfn, npages, private = true))]
    fn set_memory_attributes(
        &self,
        py: Python<'_>,
        gfn: i128,
        npages: i128,
        private: bool,
    ) -> PyResult<u64> {
        let (gfn, npages) = self.range(gfn, npages)?;
        let inner = &self.inner;
        call_detached(py, || inner.set_memory_attributes(gfn, npages, private))
    }

    /// guest_memfd punch hole (PRIVATE filter); returns the leaves zapped.
    fn punch_hole(&self, py: Python<'_>, gfn: i128, npages: i128) -> PyResult<u64> {
        let (gfn, npages) = self.range(gfn, npages)?;
        let inner = &self.inner;
        call_detached(py, || inner.punch_hole(gfn, npages))
    }

    /// KVM_TDX_FINALIZE_VM.
    fn finalize(&self, py: Python<'_>) -> PyResult<()> {
        call(py, || self.inner.finalize())
    }

    /// Tear down in KVM's order; the VM refuses every operation afterwards.
    fn destroy(&self, py: Python<'_>) -> PyResult<()> {
        let inner = &self.inner;
        call_detached(py, || inner.destroy())
    }

    /// SEV-SNP guest PVALIDATE over [gfn, gfn + npages); returns {status name: pages}.
    #[pyo3(signature = (gfn, npages = 1, size_2m = false, validate = true))]
    fn pvalidate<'py>(
        &self,
        py: Python<'py>,
        gfn: i128,
        npages: i128,
        size_2m: bool,
        validate: bool,
    ) -> PyResult<Bound<'py, PyDict>> {
        let (gfn, npages) = self.range(gfn, npages)?;
        let inner = &self.inner;
        let r = call_detached(py, || inner.pvalidate(gfn, npages, size_2m, validate))?;
        let d = PyDict::new(py);
        for (k, v) in r {
            d.set_item(k, v)?;
        }
        Ok(d)
    }

    /// SEV-SNP NPF with the RMP size-mismatch bit at `gfn` (PSMASH + zap of its 2M range).
    fn rmp_fault(&self, py: Python<'_>, gfn: i128) -> PyResult<()> {
        let gfn = nonneg("gfn", gfn, self.inner.max_gfn as u128)?;
        let inner = &self.inner;
        call_detached(py, || inner.rmp_fault(gfn))
    }

    /// SEV-SNP RMP entry behind `gfn` as a dict (assigned, validated, size, gpa).
    fn rmp_entry<'py>(&self, py: Python<'py>, gfn: i128) -> PyResult<Bound<'py, PyDict>> {
        let gfn = nonneg("gfn", gfn, self.inner.max_gfn as u128)?;
        let (assigned, validated, two_m, g) = call(py, || self.inner.rmp_entry(gfn))?;
        let d = PyDict::new(py);
        d.set_item("assigned", assigned)?;
        d.set_item("validated", validated)?;
        d.set_item("size", if two_m { "2M" } else { "4K" })?;
        d.set_item("gpa", g << 12)?;
        Ok(d)
    }

    /// TDX: the TDX module's S-EPT entries (not FREE) in tree order:
    /// (gfn, level, state, pfn) with state TABLE, MAPPED, PENDING, BLOCKED or BLOCKED_TABLE.
    fn sept_entries(&self, py: Python<'_>) -> PyResult<Vec<(u64, u8, &'static str, u64)>> {
        call(py, || match &self.inner.tdx {
            Some(t) => Ok(t.module.dump()),
            None => Err(core::Error::Config(
                "vm_type: only TDX VMs (and sw_protected with mirror=True) have an S-EPT".into(),
            )),
        })
    }

    /// Trace events in order as (op, gfn, level, detail) tuples (empty unless trace=True).
    fn trace_events(&self) -> Vec<(&'static str, u64, u8, u64)> {
        self.inner
            .totals
            .events()
            .into_iter()
            .map(|e| (e.op, e.gfn, e.level, e.detail))
            .collect()
    }

    /// One fault. Kept on the GIL: it is shorter than a GIL hand-off.
    #[pyo3(signature = (gfn, private = None, write = true, exec = false, vcpu = 0))]
    fn fault(
        &self,
        py: Python<'_>,
        gfn: i128,
        private: Option<bool>,
        write: bool,
        exec: bool,
        vcpu: i128,
    ) -> PyResult<Fault> {
        let gfn = nonneg("gfn", gfn, self.inner.max_gfn as u128)?;
        let vcpu = nonneg("vcpu", vcpu, self.inner.cfg.vcpus as u128)? as u32;
        let r = call(py, || self.inner.fault(gfn, private, write, exec, vcpu))?;
        Ok(Fault { r })
    }

    #[pyo3(signature = (gfns, private = None, write = true, exec = false, vcpu = 0))]
    fn fault_batch<'py>(
        &self,
        py: Python<'py>,
        gfns: &Bound<'py, PyAny>,
        private: Option<bool>,
        write: bool,
        exec: bool,
        vcpu: i128,
    ) -> PyResult<Bound<'py, PyArray1<u8>>> {
        let arr = u64_array(gfns, "gfns")?;
        let vcpu = nonneg("vcpu", vcpu, self.inner.cfg.vcpus as u128)? as u32;
        let ro = arr.readonly();
        let owned;
        let s: &[u64] = match ro.as_slice() {
            Ok(s) => s,
            Err(_) => {
                owned = ro.as_array().to_vec();
                &owned
            }
        };
        let mut out = vec![0u8; s.len()];
        let inner = &self.inner;
        call_detached(py, || {
            inner.fault_batch(s, private, write, exec, vcpu, &mut out)
        })?;
        Ok(PyArray1::from_vec(py, out))
    }

    #[pyo3(signature = (gfn, npages, private = None))]
    fn populate(
        &self,
        py: Python<'_>,
        gfn: i128,
        npages: i128,
        private: Option<bool>,
    ) -> PyResult<u64> {
        let (gfn, npages) = self.range(gfn, npages)?;
        let inner = &self.inner;
        call_detached(py, || inner.populate(gfn, npages, private, 0))
    }

    fn zap_gfn_range(&self, py: Python<'_>, gfn: i128, npages: i128) -> PyResult<u64> {
        let (gfn, npages) = self.range(gfn, npages)?;
        let inner = &self.inner;
        call_detached(py, || inner.zap_gfn_range(gfn, npages))
    }

    fn mmu_notifier_invalidate(&self, py: Python<'_>, gfn: i128, npages: i128) -> PyResult<u64> {
        let (gfn, npages) = self.range(gfn, npages)?;
        let inner = &self.inner;
        call_detached(py, || inner.mmu_notifier_invalidate(gfn, npages))
    }

    fn zap_all_fast(&self, py: Python<'_>) -> PyResult<()> {
        let inner = &self.inner;
        call_detached(py, || inner.zap_all_fast())
    }

    #[pyo3(signature = (gfn, npages, backing = 4096, gmem = false))]
    fn add_memslot(
        &self,
        py: Python<'_>,
        gfn: i128,
        npages: i128,
        backing: i128,
        gmem: bool,
    ) -> PyResult<u32> {
        let (gfn, npages) = self.range(gfn, npages)?;
        let backing = nonneg("backing", backing, 1 << 62)?;
        call(py, || self.inner.add_memslot(gfn, npages, backing, gmem))
    }

    fn delete_memslot(&self, py: Python<'_>, slot: i128) -> PyResult<()> {
        let slot = nonneg("slot", slot, u32::MAX as u128)? as u32;
        let inner = &self.inner;
        call_detached(py, || inner.delete_memslot(slot))
    }

    fn memslots(&self) -> Vec<(u32, u64, u64, u64, bool, u64)> {
        self.inner.memslots()
    }

    fn roots<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let out = PyList::empty(py);
        for r in self.inner.roots_snapshot() {
            let d = PyDict::new(py);
            d.set_item("pfn", core::arena::Arena::pfn(r.table))?;
            d.set_item("role", r.role_word())?;
            d.set_item("level", self.inner.cfg.levels)?;
            d.set_item("mirror", r.is_mirror())?;
            d.set_item("refcount", r.refcount)?;
            d.set_item("invalid", r.invalid)?;
            d.set_item("scheduled_to_zap", r.scheduled_to_zap)?;
            out.append(d)?;
        }
        Ok(out)
    }

    #[pyo3(signature = (gfn, private = false))]
    fn walk(&self, py: Python<'_>, gfn: i128, private: bool) -> PyResult<Vec<(u8, u64)>> {
        let gfn = nonneg("gfn", gfn, self.inner.max_gfn as u128)?;
        call(py, || self.inner.walk(gfn, private))
    }

    #[pyo3(signature = (gfn, private = false))]
    fn spte(&self, py: Python<'_>, gfn: i128, private: bool) -> PyResult<u64> {
        let gfn = nonneg("gfn", gfn, self.inner.max_gfn as u128)?;
        call(py, || self.inner.spte(gfn, private))
    }

    /// Read-only, zero-copy (N, 512) uint64 view of every table handed out so far.
    fn tables<'py>(slf: Bound<'py, Self>) -> PyResult<Bound<'py, PyArray2<u64>>> {
        let py = slf.py();
        let inner = &slf.get().inner;
        let n = inner.arena.high_water();
        // SAFETY: the arena's reservation never moves or shrinks while the VM lives, and the
        // array keeps the VM object alive through its base; entries are u64-sized atomics.
        let view = unsafe { ndarray::ArrayView2::from_shape_ptr((n, 512), inner.arena.base_ptr()) };
        let arr = unsafe { PyArray2::borrow_from_array(&view, slf.clone().into_any()) };
        let kw = PyDict::new(py);
        kw.set_item("write", false)?;
        arr.call_method("setflags", (), Some(&kw))?;
        Ok(arr)
    }

    fn stats_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (k, v) in self.inner.stats() {
            if k == "modeled_ns" {
                d.set_item(k, v)?;
            } else {
                d.set_item(k, v as i64)?;
            }
        }
        Ok(d)
    }

    /// Modeled nanoseconds charged to each CostModel field (field order); the values sum, in
    /// that order, to exactly stats["modeled_ns"].
    fn cost_breakdown<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (k, v) in self.inner.cost_breakdown() {
            d.set_item(k, v)?;
        }
        Ok(d)
    }

    fn check(&self, py: Python<'_>) -> PyResult<()> {
        let inner = &self.inner;
        call_detached(py, || inner.check())
    }

    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (vcpus, pages_per_vcpu, base_gfn, overlap, random_access, write_percent, seed, private = None))]
    fn run_memstress<'py>(
        &self,
        py: Python<'py>,
        vcpus: i128,
        pages_per_vcpu: i128,
        base_gfn: i128,
        overlap: bool,
        random_access: bool,
        write_percent: i128,
        seed: i128,
        private: Option<bool>,
    ) -> PyResult<Bound<'py, PyList>> {
        let a = MemstressArgs {
            vcpus: nonneg("vcpus", vcpus, self.inner.cfg.vcpus as u128 + 1)? as u32,
            pages_per_vcpu: nonneg(
                "pages_per_vcpu",
                pages_per_vcpu,
                self.inner.max_gfn as u128 + 1,
            )?,
            base_gfn: nonneg("base_gfn", base_gfn, self.inner.max_gfn as u128)?,
            overlap,
            random_access,
            write_percent: nonneg("write_percent", write_percent, 101)? as u32,
            seed: nonneg("seed", seed, 1 << 64)?,
            private,
        };
        let inner = &self.inner;
        let res = call_detached(py, || inner.run_memstress(&a))?;
        let out = PyList::empty(py);
        for r in res {
            let d = PyDict::new(py);
            d.set_item("wall_s", r.wall_s)?;
            d.set_item("modeled_ns", r.modeled_ns)?;
            d.set_item("faults", r.faults)?;
            d.set_item("pages", r.pages)?;
            out.append(d)?;
        }
        Ok(out)
    }

    /// Test hook: panic inside the core to prove panics surface as TdpmmuError.
    fn _inject_panic(&self, py: Python<'_>) -> PyResult<()> {
        call_detached(py, || -> core::Result<()> {
            panic!("injected panic (test hook)")
        })
    }
}

impl Vm {
    fn range(&self, gfn: i128, npages: i128) -> PyResult<(u64, u64)> {
        let max = self.inner.max_gfn as u128;
        let gfn = nonneg("gfn", gfn, max)?;
        if npages <= 0 || npages as u128 > max {
            return Err(PyValueError::new_err(format!(
                "npages: must be in 1..={max:#x}, got {npages}"
            )));
        }
        Ok((gfn, npages as u64))
    }
}

// ----- module ----------------------------------------------------------------------------------

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    let t = err_types(py)?;
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
    m.add_function(wrap_pyfunction!(spte_decode, m)?)?;
    m.add_function(wrap_pyfunction!(make_leaf_spte, m)?)?;
    m.add_function(wrap_pyfunction!(make_nonleaf_spte, m)?)?;
    m.add_function(wrap_pyfunction!(make_mmio_spte, m)?)?;
    m.add_function(wrap_pyfunction!(native_floor, m)?)?;
    m.add_function(wrap_pyfunction!(_register_ret, m)?)?;
    m.add_class::<Fault>()?;
    m.add_class::<Vm>()?;
    Ok(())
}
