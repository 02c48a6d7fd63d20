//! The native VM class (`tdpmmu._core.Vm`; users get `tdpmmu.VM`, which subclasses it). Each
//! method validates and converts its arguments, runs the core operation through `Vm::run`
//! (GIL released, panics caught, hook re-entry refused) and converts the result.

use std::sync::Arc;

use numpy::{PyArray1, PyArray2, ndarray};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyList, PyString};

use tdpmmu_core::config::{OptionValue, VmType, parse_design};
use tdpmmu_core::{self as core, MemstressArgs, VmConfig};

use crate::args::{Int, count_arg, gfn_arg, gfn_vec, in_range};
use crate::errors::{base_err, call, call_detached, config_err, to_py};
use crate::hooks::{HOOK_METHODS, PyHooks, current_hook};
use crate::ret::ret_obj;

/// Outcome of one fault (`kvm_mmu_page_fault`'s RET_PF_* and where it ended).
#[pyclass(frozen, module = "tdpmmu._core", name = "Fault")]
pub struct Fault {
    r: core::FaultResult,
}

#[pymethods]
impl Fault {
    /// `tdpmmu.Ret`: FIXED, SPURIOUS, RETRY, EMULATE, WRITE_PROTECTED, INVALID or MEMORY_FAULT.
    #[getter]
    fn ret(&self, py: Python<'_>) -> Py<PyAny> {
        ret_obj(py, self.r.ret as u8)
    }
    /// Level of the entry the fault installed or stopped at (1 = 4K, 2 = 2M, 3 = 1G, ...).
    #[getter]
    fn level(&self) -> u8 {
        self.r.level
    }
    /// Times KVM retried the fault locally (TDX private faults) before returning.
    #[getter]
    fn retries(&self) -> u32 {
        self.r.retries
    }
    /// Modeled nanoseconds this fault cost (exit, handling, host page, SEAMCALLs, ...).
    #[getter]
    fn modeled_ns(&self) -> f64 {
        self.r.modeled_ns
    }
    /// The SPTE value at `level` after the fault.
    #[getter]
    fn spte(&self) -> u64 {
        self.r.spte
    }
    #[getter]
    fn gfn(&self) -> u64 {
        self.r.gfn
    }
    /// The fault was a private access.
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

/// Native VM. Use `tdpmmu.VM`, which subclasses this and adds the friendly constructor.
#[pyclass(subclass, frozen, module = "tdpmmu._core", name = "Vm")]
pub struct Vm {
    inner: Arc<core::Vm>,
    hooks: Option<Arc<PyHooks>>,
}

/// A TDX option value, typed as it arrives from Python.
fn option_value<'a>(key: &str, v: &'a Bound<'_, PyAny>) -> PyResult<OptionValue<'a>> {
    if v.is_instance_of::<PyBool>() {
        return Ok(OptionValue::Bool(v.extract()?));
    }
    if let Ok(s) = v.cast::<PyString>() {
        return Ok(OptionValue::Name(s.to_str()?));
    }
    match v.extract::<f64>() {
        Ok(x) => Ok(OptionValue::Number(x)),
        Err(_) => Err(PyTypeError::new_err(format!(
            "tdx[{key:?}]: expected a name (str), a bool or a number, got {}",
            v.get_type().name()?
        ))),
    }
}

#[pymethods]
impl Vm {
    #[new]
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (vm_type, memory, vcpus, levels, backing, hooks, costs, seed, trace, nx_huge_pages, slot_zap_all, *, tdx = None, mirror = false, folio = None, hook_object = None))]
    fn new(
        py: Python<'_>,
        vm_type: &str,
        memory: Int,
        vcpus: Int,
        levels: Int,
        backing: Int,
        hooks: Option<&str>,
        costs: &Bound<'_, PyDict>,
        seed: Int,
        trace: bool,
        nx_huge_pages: bool,
        slot_zap_all: bool,
        tdx: Option<&Bound<'_, PyDict>>,
        mirror: bool,
        folio: Option<Int>,
        hook_object: Option<Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let mut cm = core::CostModel::default();
        for (k, v) in costs.iter() {
            let k: String = k
                .extract()
                .map_err(|_| PyTypeError::new_err("costs: keys must be str"))?;
            if v.is_instance_of::<PyBool>() {
                return Err(PyTypeError::new_err(format!(
                    "costs[{k:?}]: must be a number, got bool"
                )));
            }
            let v: f64 = v
                .extract()
                .map_err(|_| PyTypeError::new_err(format!("costs[{k:?}]: must be a number")))?;
            cm.set(&k, v).map_err(|e| to_py(py, e))?;
        }
        let vm_type = VmType::parse(vm_type).map_err(|e| to_py(py, e))?;
        let mut cfg = VmConfig {
            vm_type,
            memory: in_range(py, "memory", &memory, 1 << 62)?,
            vcpus: in_range(py, "vcpus", &vcpus, 1 << 31)? as u32,
            levels: in_range(py, "levels", &levels, 256)? as u8,
            backing: in_range(py, "backing", &backing, 1 << 62)?,
            hooks: match hooks {
                Some(h) => Some(parse_design(h, vm_type, mirror).map_err(|e| to_py(py, e))?),
                None => None,
            },
            costs: cm,
            seed: in_range(py, "seed", &seed, 1 << 64)?,
            trace,
            nx_huge_pages,
            slot_zap_all,
            mirror,
            ..VmConfig::default()
        };
        if let Some(f) = folio {
            cfg.folio_given = true;
            cfg.folio_level = match f.0 {
                4096 => 1,
                0x20_0000 => 2,
                other => {
                    return Err(config_err(
                        py,
                        format!(
                            "folio: guest_memfd folio size must be 4K or 2M (4096 or 2097152 bytes), got {other}"
                        ),
                    ));
                }
            };
        }
        if let Some(o) = tdx {
            for (k, v) in o.iter() {
                let k: String = k
                    .extract()
                    .map_err(|_| PyTypeError::new_err("tdx: keys must be str"))?;
                let value = option_value(&k, &v)?;
                cfg.tdx.set(&k, value).map_err(|e| to_py(py, e))?;
            }
        }
        let (vm, hooks) = match hook_object {
            None => (call(py, || core::Vm::new(cfg))?, None),
            Some(obj) => {
                for m in HOOK_METHODS {
                    if !obj.hasattr(m)? {
                        return Err(PyTypeError::new_err(format!(
                            "hooks: a hook object needs a method {m}(gfn, level, value); got {}",
                            obj.get_type().name()?
                        )));
                    }
                }
                let h = Arc::new(PyHooks::new(obj.unbind()));
                let ext: Arc<dyn core::hooks::ExternalOps> = h.clone();
                (call(py, || core::Vm::with_hooks(cfg, ext))?, Some(h))
            }
        };
        Ok(Self {
            inner: Arc::new(vm),
            hooks,
        })
    }

    /// "default", "tdx", "snp" or "sw_protected".
    #[getter]
    fn vm_type(&self) -> &'static str {
        self.inner.cfg.vm_type.name()
    }
    /// Guest memory in bytes (slot 0 covers it from gfn 0).
    #[getter]
    fn memory(&self) -> u64 {
        self.inner.cfg.memory
    }
    #[getter]
    fn vcpus(&self) -> u32 {
        self.inner.cfg.vcpus
    }
    /// Paging levels of the TDP tables: 4 or 5.
    #[getter]
    fn levels(&self) -> u8 {
        self.inner.cfg.levels
    }
    /// Exclusive bound of guest gfns (on a VM with a mirror root: the shared bit).
    #[getter]
    fn max_gfn(&self) -> u64 {
        self.inner.max_gfn()
    }
    /// The shared (direct) alias bit as a gfn bit value; 0 if the VM has none.
    #[getter]
    fn shared_bit(&self) -> u64 {
        self.inner.shared_bit()
    }
    /// A KVM_BUG_ON fired; every further operation raises VmBugged.
    #[getter]
    fn bugged(&self) -> bool {
        self.inner.bugged()
    }
    /// The hook design in effect ("none", "mirror", "private" or "gmem").
    #[getter]
    fn hooks_name(&self) -> &'static str {
        self.inner.design.name()
    }
    /// sw_protected with a mirror root (the seed's variant).
    #[getter]
    fn mirror(&self) -> bool {
        self.inner.cfg.mirror
    }
    /// guest_memfd folio size in bytes (4096 or 2097152).
    #[getter]
    fn folio(&self) -> u64 {
        if self.inner.cfg.folio_level == 2 {
            0x20_0000
        } else {
            4096
        }
    }
    /// The seed of every seeded draw (TDX busy injection).
    #[getter]
    fn seed(&self) -> u64 {
        self.inner.cfg.seed
    }
    /// The TDX options in effect as {name: value} (every option, defaults included), or an
    /// empty dict on VM types without a TD-shaped mirror.
    #[getter]
    fn tdx_options<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        if !self.inner.variant.tdx_options {
            return Ok(d);
        }
        let o = &self.inner.cfg.tdx;
        d.set_item("version", o.version.name())?;
        d.set_item("sept_free", o.sept_free.name())?;
        d.set_item("track", o.track.name())?;
        d.set_item("interface", o.interface.name())?;
        d.set_item("measure", o.measure)?;
        d.set_item("max_local_retries", o.max_local_retries)?;
        for (leaf, p) in core::config::BUSY_LEAVES.iter().zip(o.busy) {
            d.set_item(*leaf, p)?;
        }
        Ok(d)
    }
    /// Memslot generation (bumped by 2 per memslot change; MMIO SPTEs record it).
    #[getter]
    fn memslot_generation(&self, py: Python<'_>) -> PyResult<u64> {
        self.run(py, |vm| Ok(vm.memslot_generation()))
    }
    /// TDX: the TD was finalized (is runnable).
    #[getter]
    fn finalized(&self) -> bool {
        self.inner.finalized()
    }
    #[getter]
    fn destroyed(&self) -> bool {
        self.inner.destroyed()
    }

    #[pyo3(signature = (gfn, npages, private = true))]
    fn set_memory_attributes(
        &self,
        py: Python<'_>,
        gfn: Int,
        npages: Int,
        private: bool,
    ) -> PyResult<u64> {
        let (gfn, npages) = self.range(py, &gfn, &npages)?;
        self.run(py, |vm| vm.set_memory_attributes(gfn, npages, private))
    }

    fn punch_hole(&self, py: Python<'_>, gfn: Int, npages: Int) -> PyResult<u64> {
        let (gfn, npages) = self.range(py, &gfn, &npages)?;
        self.run(py, |vm| vm.punch_hole(gfn, npages))
    }

    fn finalize(&self, py: Python<'_>) -> PyResult<()> {
        self.run(py, |vm| vm.finalize())
    }

    fn destroy(&self, py: Python<'_>) -> PyResult<()> {
        self.run(py, |vm| vm.destroy())
    }

    #[pyo3(signature = (gfn, npages = Int::of(1), size_2m = false, validate = true))]
    #[pyo3(text_signature = "(self, /, gfn, npages=1, size_2m=False, validate=True)")]
    fn pvalidate<'py>(
        &self,
        py: Python<'py>,
        gfn: Int,
        npages: Int,
        size_2m: bool,
        validate: bool,
    ) -> PyResult<Bound<'py, PyDict>> {
        let (gfn, npages) = self.range(py, &gfn, &npages)?;
        let r = self.run(py, |vm| vm.pvalidate(gfn, npages, size_2m, validate))?;
        let d = PyDict::new(py);
        for (k, v) in r {
            d.set_item(k, v)?;
        }
        Ok(d)
    }

    fn rmp_fault(&self, py: Python<'_>, gfn: Int) -> PyResult<()> {
        let gfn = gfn_arg(py, "gfn", &gfn, self.inner.max_gfn())?;
        self.run(py, |vm| vm.rmp_fault(gfn))
    }

    fn rmp_entry<'py>(&self, py: Python<'py>, gfn: Int) -> PyResult<Bound<'py, PyDict>> {
        let gfn = gfn_arg(py, "gfn", &gfn, self.inner.max_gfn())?;
        let (assigned, validated, two_m, g) = self.run(py, |vm| vm.rmp_entry(gfn))?;
        let d = PyDict::new(py);
        d.set_item("assigned", assigned)?;
        d.set_item("validated", validated)?;
        d.set_item("size", if two_m { "2M" } else { "4K" })?;
        d.set_item("gpa", g << 12)?;
        Ok(d)
    }

    fn sept_entries(&self, py: Python<'_>) -> PyResult<Vec<(u64, u8, &'static str, u64)>> {
        self.run(py, |vm| vm.sept_entries())
    }

    fn trace_events(&self) -> Vec<(&'static str, u64, u8, u64)> {
        self.inner
            .events()
            .into_iter()
            .map(|e| (e.op, e.gfn, e.level, e.detail))
            .collect()
    }

    #[pyo3(signature = (gfn, private = None, write = true, exec = false, vcpu = Int::of(0)))]
    #[pyo3(text_signature = "(self, /, gfn, private=None, write=True, exec=False, vcpu=0)")]
    fn fault(
        &self,
        py: Python<'_>,
        gfn: Int,
        private: Option<bool>,
        write: bool,
        exec: bool,
        vcpu: Int,
    ) -> PyResult<Fault> {
        let gfn = gfn_arg(py, "gfn", &gfn, self.inner.max_gfn())?;
        let vcpu = self.vcpu(py, &vcpu)?;
        let r = self.run(py, |vm| vm.fault(gfn, private, write, exec, vcpu))?;
        Ok(Fault { r })
    }

    #[pyo3(signature = (gfns, private = None, write = true, exec = false, vcpu = Int::of(0)))]
    #[pyo3(text_signature = "(self, /, gfns, private=None, write=True, exec=False, vcpu=0)")]
    fn fault_batch<'py>(
        &self,
        py: Python<'py>,
        gfns: &Bound<'py, PyAny>,
        private: Option<bool>,
        write: bool,
        exec: bool,
        vcpu: Int,
    ) -> PyResult<Bound<'py, PyArray1<u8>>> {
        let vcpu = self.vcpu(py, &vcpu)?;
        let gfns = gfn_vec(gfns, "gfns")?;
        let mut out = vec![0u8; gfns.len()];
        self.run(py, |vm| {
            vm.fault_batch(&gfns, private, write, exec, vcpu, &mut out)
        })?;
        Ok(PyArray1::from_vec(py, out))
    }

    #[pyo3(signature = (gfn, npages, private = None))]
    fn populate(
        &self,
        py: Python<'_>,
        gfn: Int,
        npages: Int,
        private: Option<bool>,
    ) -> PyResult<u64> {
        let (gfn, npages) = self.range(py, &gfn, &npages)?;
        self.run(py, |vm| vm.populate(gfn, npages, private, 0))
    }

    fn zap_gfn_range(&self, py: Python<'_>, gfn: Int, npages: Int) -> PyResult<u64> {
        let (gfn, npages) = self.range(py, &gfn, &npages)?;
        self.run(py, |vm| vm.zap_gfn_range(gfn, npages))
    }

    fn mmu_notifier_invalidate(&self, py: Python<'_>, gfn: Int, npages: Int) -> PyResult<u64> {
        let (gfn, npages) = self.range(py, &gfn, &npages)?;
        self.run(py, |vm| vm.mmu_notifier_invalidate(gfn, npages))
    }

    fn zap_all_fast(&self, py: Python<'_>) -> PyResult<()> {
        self.run(py, |vm| vm.zap_all_fast())
    }

    #[pyo3(signature = (gfn, npages, backing = Int::of(4096), gmem = false))]
    #[pyo3(text_signature = "(self, /, gfn, npages, backing=4096, gmem=False)")]
    fn add_memslot(
        &self,
        py: Python<'_>,
        gfn: Int,
        npages: Int,
        backing: Int,
        gmem: bool,
    ) -> PyResult<u32> {
        let (gfn, npages) = self.range(py, &gfn, &npages)?;
        let backing = in_range(py, "backing", &backing, 1 << 62)?;
        self.run(py, |vm| vm.add_memslot(gfn, npages, backing, gmem))
    }

    fn delete_memslot(&self, py: Python<'_>, slot: Int) -> PyResult<()> {
        let slot = in_range(py, "slot", &slot, u32::MAX as u128)? as u32;
        self.run(py, |vm| vm.delete_memslot(slot))
    }

    fn memslots(&self, py: Python<'_>) -> PyResult<Vec<core::vm::MemslotInfo>> {
        self.run(py, |vm| Ok(vm.memslots()))
    }

    fn roots<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let roots = self.run(py, |vm| Ok(vm.roots_snapshot()))?;
        let out = PyList::empty(py);
        for r in roots {
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
    fn walk(&self, py: Python<'_>, gfn: Int, private: bool) -> PyResult<Vec<(u8, u64)>> {
        let gfn = gfn_arg(py, "gfn", &gfn, self.inner.max_gfn())?;
        self.run(py, |vm| vm.walk(gfn, private))
    }

    #[pyo3(signature = (gfn, private = false))]
    fn spte(&self, py: Python<'_>, gfn: Int, private: bool) -> PyResult<u64> {
        let gfn = gfn_arg(py, "gfn", &gfn, self.inner.max_gfn())?;
        self.run(py, |vm| vm.spte(gfn, private))
    }

    /// Read-only, zero-copy (N, 512) uint64 view of every table handed out so far.
    fn tables<'py>(slf: Bound<'py, Self>) -> PyResult<Bound<'py, PyArray2<u64>>> {
        let py = slf.py();
        let arena = slf.get().inner.arena();
        let n = arena.high_water();
        // SAFETY: the arena's reservation never moves or shrinks while the VM lives, and the
        // array keeps the VM object alive through its base; entries are u64-sized atomics.
        let view = unsafe { ndarray::ArrayView2::from_shape_ptr((n, 512), arena.base_ptr()) };
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

    fn cost_breakdown<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (k, v) in self.inner.cost_breakdown() {
            d.set_item(k, v)?;
        }
        Ok(d)
    }

    fn check(&self, py: Python<'_>) -> PyResult<()> {
        self.run(py, |vm| vm.check())
    }

    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (vcpus, pages_per_vcpu, base_gfn, overlap, random_access, write_percent, seed, private = None))]
    fn run_memstress<'py>(
        &self,
        py: Python<'py>,
        vcpus: Int,
        pages_per_vcpu: Int,
        base_gfn: Int,
        overlap: bool,
        random_access: bool,
        write_percent: Int,
        seed: Int,
        private: Option<bool>,
    ) -> PyResult<Bound<'py, PyList>> {
        let max_gfn = self.inner.max_gfn();
        let a = MemstressArgs {
            vcpus: count_arg(py, "vcpus", &vcpus, self.inner.cfg.vcpus as u64)? as u32,
            pages_per_vcpu: count_arg(py, "pages_per_vcpu", &pages_per_vcpu, max_gfn)?,
            base_gfn: gfn_arg(py, "base_gfn", &base_gfn, max_gfn)?,
            overlap,
            random_access,
            write_percent: in_range(py, "write_percent", &write_percent, 101)? as u32,
            seed: in_range(py, "seed", &seed, 1 << 64)?,
            private,
        };
        let res = self.run(py, |vm| vm.run_memstress(&a))?;
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
    /// Every call that touches the VM's locks goes through here: a call back into this VM
    /// from one of its own hook objects is refused (it would wait for the `mmu_lock` its
    /// thread holds); the GIL is released (a hook object on another thread may need it while
    /// that thread holds `mmu_lock`); panics become `TdpmmuError`; an interrupt a hook raised
    /// is re-raised once the operation is over.
    fn run<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&core::Vm) -> core::Result<T> + Send,
    ) -> PyResult<T> {
        if let Some(h) = &self.hooks
            && current_hook() == h.id()
        {
            return Err(base_err(
                py,
                "hooks: a hook object called back into its own VM while the VM holds mmu_lock \
                 for the operation that called the hook; hooks must not use their VM",
            ));
        }
        let inner = &*self.inner;
        let r = call_detached(py, || f(inner));
        if let Some(h) = &self.hooks
            && let Some(e) = h.take_pending()
        {
            return Err(e);
        }
        r
    }

    fn range(&self, py: Python<'_>, gfn: &Int, npages: &Int) -> PyResult<(u64, u64)> {
        let max = self.inner.max_gfn();
        Ok((
            gfn_arg(py, "gfn", gfn, max)?,
            count_arg(py, "npages", npages, max)?,
        ))
    }

    fn vcpu(&self, py: Python<'_>, vcpu: &Int) -> PyResult<u32> {
        Ok(in_range(py, "vcpu", vcpu, self.inner.cfg.vcpus as u128)? as u32)
    }
}
