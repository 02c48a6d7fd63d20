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

/// Outcome of one guest page fault, as ``VM.fault`` returns it (read-only).
///
/// Models what ``kvm_mmu_page_fault`` returned for one EPT/NPT violation: KVM's RET_PF_* code
/// (``ret``), where the fault ended (``level``, ``spte``), how often KVM retried it locally
/// (``retries``) and the modeled time it cost (``modeled_ns``), for the 4 KiB guest page
/// ``gfn``. Only ``VM.fault`` creates it.
#[pyclass(frozen, module = "tdpmmu._core", name = "Fault")]
pub struct Fault {
    r: core::FaultResult,
}

#[pymethods]
impl Fault {
    /// KVM's RET_PF_* result, as a ``tdpmmu.Ret`` member (an ``int``).
    ///
    /// The model returns FIXED (a leaf was installed), SPURIOUS (the present leaf already allowed
    /// the access, or the new SPTE equals the old), RETRY (the walk met a FROZEN entry, a cmpxchg
    /// lost, or a hook answered -EBUSY, after TDX's local retries ran out), EMULATE (a gfn in no
    /// memslot: MMIO; an MMIO SPTE was installed or hit the MMIO cache) or MEMORY_FAULT (the
    /// access's kind does not match the gfn's memory attribute, or a private access to memory
    /// without guest_memfd: KVM's -EFAULT with KVM_EXIT_MEMORY_FAULT; nothing changed). CONTINUE,
    /// WRITE_PROTECTED and INVALID exist for KVM's numbering but the model never returns them.
    #[getter]
    fn ret(&self, py: Python<'_>) -> Py<PyAny> {
        ret_obj(py, self.r.ret as u8)
    }
    /// Level of the entry the fault ended at: 1 = 4 KiB, 2 = 2 MiB, 3 = 1 GiB, up to ``VM.levels``.
    ///
    /// FIXED and SPURIOUS: the leaf that maps ``gfn`` now. EMULATE: 1 (MMIO SPTEs are 4 KiB).
    /// MEMORY_FAULT: where a walk of the root the access would use stops (a leaf, or the first
    /// non-present entry, e.g. ``VM.levels`` in an empty root). RETRY: the level the fault had
    /// reached, or 1 if it stopped above its goal level.
    #[getter]
    fn level(&self) -> u8 {
        self.r.level
    }
    /// How many times KVM retried this fault locally before returning to the guest (an ``int``).
    ///
    /// Only TDX private faults retry locally: a RETRY (a SEAMCALL answered OPERAND_BUSY) is retried
    /// up to ``tdx["max_local_retries"]`` times (default 1000), each retry charging
    /// ``fault_handling_ns`` again and counting ``pf_taken``, ``pf_retry`` and
    /// ``tdx_local_retries``. 0 for every other fault.
    #[getter]
    fn retries(&self) -> u32 {
        self.r.retries
    }
    /// Modeled nanoseconds this fault cost (a ``float``; cost-model time, not host time).
    ///
    /// The exit and re-entry (``exit_entry_ns``, on a TD ``td_exit_entry_ns``), KVM's handling
    /// (``fault_handling_ns`` per try), first-touch host allocation, TLB flushes, huge-page splits,
    /// the hooks' SEAMCALLs or RMP instructions, and what the guest does right after (a TD's
    /// TDG.MEM.PAGE.ACCEPT, an SNP guest's PVALIDATE). The same amount is added to
    /// ``VM.stats["modeled_ns"]``.
    #[getter]
    fn modeled_ns(&self) -> f64 {
        self.r.modeled_ns
    }
    /// The 64-bit SPTE at ``level`` after the fault (an ``int``).
    ///
    /// FIXED: the leaf installed; SPURIOUS: the present leaf; EMULATE: the MMIO SPTE; MEMORY_FAULT
    /// and RETRY: the entry where the walk stopped (``tdpmmu.spte.SHADOW_NONPRESENT_VALUE`` when
    /// nothing is there). Decode it with ``tdpmmu.spte.decode``.
    #[getter]
    fn spte(&self) -> u64 {
        self.r.spte
    }
    /// The guest page-frame number that faulted: the 4 KiB page at guest-physical ``gfn << 12``.
    ///
    /// Never carries the shared bit (the ``gfn`` argument of ``VM.fault``, unchanged).
    #[getter]
    fn gfn(&self) -> u64 {
        self.r.gfn
    }
    /// True if the fault was handled as a private access.
    ///
    /// ``VM.fault(private=None)`` resolves it from the gfn's memory attribute; always False on a
    /// default VM.
    #[getter]
    fn private(&self) -> bool {
        self.r.private
    }
    /// The fault as ``Fault(ret=..., gfn=0x..., level=..., retries=..., modeled_ns=..., ...)``.
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

/// Native VM (``tdpmmu._core.Vm``); use ``tdpmmu.VM``, which subclasses it.
///
/// ``tdpmmu.VM`` coerces the constructor's arguments (sizes, hook designs, cost models) and
/// documents them.
///
/// Conventions of every method: a gfn is the guest page-frame number of a 4 KiB guest page
/// (guest-physical address >> 12) in ``0..max_gfn``; npages counts 4 KiB pages; sizes are in
/// bytes. A bad argument raises ``tdpmmu.ConfigError`` (also a ``ValueError``) whose message
/// starts with the argument's name, and the VM is unchanged; an argument of the wrong Python
/// type (a bool where an int is expected, an int where a bool is, a list for an array) raises
/// ``TypeError``. After a KVM_BUG_ON every operation raises ``tdpmmu.VmBugged``; after
/// ``destroy()`` every operation raises ``ConfigError`` naming ``vm`` (inspection methods still
/// answer). A Rust panic surfaces as ``tdpmmu.TdpmmuError``. Calls that take the VM's locks
/// release the GIL.
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
    /// Build the VM from already-coerced arguments; ``tdpmmu.VM(...)`` is the constructor to use.
    ///
    /// Sizes are in bytes, ``hooks`` is a design name or None, ``costs`` a dict of nanoseconds.
    #[new]
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (vm_type, memory, vcpus, levels, backing, hooks, costs, seed, trace, nx_huge_pages, slot_zap_all, *, tdx = None, mirror = false, folio = None, budget = None, hook_object = None, ad_bits = true))]
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
        budget: Option<Int>,
        hook_object: Option<Bound<'_, PyAny>>,
        ad_bits: bool,
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
            ad_bits,
            ..VmConfig::default()
        };
        if let Some(b) = budget {
            cfg.budget = Some(in_range(py, "budget", &b, 1 << 62)?);
        }
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

    /// The VM type: ``"default"``, ``"tdx"``, ``"snp"`` or ``"sw_protected"``.
    ///
    /// KVM's KVM_X86_DEFAULT_VM, KVM_X86_TDX_VM, KVM_X86_SNP_VM and KVM_X86_SW_PROTECTED_VM.
    #[getter]
    fn vm_type(&self) -> &'static str {
        self.inner.cfg.vm_type.name()
    }
    /// Guest memory in bytes given at creation: the default memslot (slot 0) covers it from gfn 0.
    ///
    /// Memslots added later are not included.
    #[getter]
    fn memory(&self) -> u64 {
        self.inner.cfg.memory
    }
    /// Number of vCPUs (1..4096); vCPU indices are ``0..vcpus``.
    #[getter]
    fn vcpus(&self) -> u32 {
        self.inner.cfg.vcpus
    }
    /// TDP paging levels: 4 (guest-physical gfns below 2**36) or 5 (below 2**40).
    #[getter]
    fn levels(&self) -> u8 {
        self.inner.cfg.levels
    }
    /// Exclusive upper bound of every gfn argument.
    ///
    /// 2**36 with 4 levels, 2**40 with 5; on a VM with a mirror root (tdx, and sw_protected with
    /// ``mirror=True``) the shared bit (2**35 or 2**39): the guest owns the half of guest-physical
    /// space below it, and shared accesses are chosen with ``private=False``, not with the bit.
    #[getter]
    fn max_gfn(&self) -> u64 {
        self.inner.max_gfn()
    }
    /// The shared bit as a gfn value, or 0 if the VM has none.
    ///
    /// ``1 << 35`` (4 levels) or ``1 << 39`` (5 levels) on a VM with a mirror root (tdx, and
    /// sw_protected with ``mirror=True``). The direct root maps shared gfn ``g`` at index ``g |
    /// shared_bit``; gfn arguments, ``Fault.gfn`` and ``walk`` never carry the bit.
    #[getter]
    fn shared_bit(&self) -> u64 {
        self.inner.shared_bit()
    }
    /// True once a KVM_BUG_ON fired; every further operation then raises ``tdpmmu.VmBugged``.
    ///
    /// A SEAMCALL, RMP instruction or hook failed where KVM does not expect it to.
    #[getter]
    fn bugged(&self) -> bool {
        self.inner.bugged()
    }
    /// The hook design in effect: ``"none"``, ``"mirror"``, ``"private"`` or ``"gmem"``.
    ///
    /// ``"mirror"`` when a hook object answers the hooks. Which VM types take which design:
    /// ``tdpmmu.config.VARIANTS``.
    #[getter]
    fn hooks_name(&self) -> &'static str {
        self.inner.design.name()
    }
    /// True for ``VM("sw_protected", mirror=True)``, False otherwise.
    ///
    /// That variant has a TDX-shaped mirror root and shared bit over a software external tree (no
    /// SEAMCALLs). A TD's mirror root comes with ``vm_type="tdx"`` and does not set this.
    #[getter]
    fn mirror(&self) -> bool {
        self.inner.cfg.mirror
    }
    /// guest_memfd folio size in bytes: 4096 (the default) or 2097152 (``folio="2M"``).
    ///
    /// A private mapping is never larger than the folio. 4096 on a default VM (no guest_memfd).
    #[getter]
    fn folio(&self) -> u64 {
        if self.inner.cfg.folio_level == 2 {
            0x20_0000
        } else {
            4096
        }
    }
    /// Bytes of page tables and per-page metadata the VM may commit: the ``budget=`` given at
    /// construction, else this machine's RAM. Checked before anything is allocated.
    #[getter]
    fn budget(&self) -> u64 {
        self.inner.budget
    }
    /// Bytes of the budget committed so far: the page tables of every tree that can map the
    /// memslots (fully mapped at 4K: the direct tree, or the mirror tree plus the S-EPT or
    /// software external tree) and their first-touch bitmaps and RMP entries.
    #[getter]
    fn committed_bytes(&self, py: Python<'_>) -> PyResult<u64> {
        self.run(py, |vm| Ok(vm.committed_bytes()))
    }
    /// Seed of the VM's seeded draws (TDX OPERAND_BUSY injection), an int in ``0..2**64``.
    #[getter]
    fn seed(&self) -> u64 {
        self.inner.cfg.seed
    }
    /// The TDX options in effect as a new dict ``{name: value}``: every option, defaults included.
    ///
    /// Keys: ``version`` ("6.19" or "6.16"), ``sept_free`` ("teardown" or "sept_remove"), ``track``
    /// ("per_page" or "batched"), ``interface`` ("four_hook" or "two_hook"), ``teardown``
    /// ("remove" or "terminate_vm"), ``measure`` (bool), ``huge_pages`` (bool),
    /// ``max_local_retries`` (int) and one OPERAND_BUSY probability (float in [0, 1]) per leaf of
    /// TDH.MEM.SEPT.ADD, TDH.MEM.PAGE.AUG, TDH.MEM.RANGE.BLOCK, TDH.MEM.TRACK and
    /// TDH.MEM.PAGE.REMOVE. An empty dict on VM types without a TD-shaped mirror (default, snp,
    /// sw_protected without ``mirror``).
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
        d.set_item("teardown", o.teardown.name())?;
        d.set_item("measure", o.measure)?;
        d.set_item("huge_pages", o.huge_pages)?;
        d.set_item("max_local_retries", o.max_local_retries)?;
        for (leaf, p) in core::config::BUSY_LEAVES.iter().zip(o.busy) {
            d.set_item(*leaf, p)?;
        }
        Ok(d)
    }
    /// KVM's memslot generation: 0 for a new VM, +2 per memslot added or deleted.
    ///
    /// Slot 0 comes with the VM and is not an addition. An MMIO SPTE records the generation it was
    /// made in; one of an older generation is stale, and the next fault on it installs a new one.
    #[getter]
    fn memslot_generation(&self, py: Python<'_>) -> PyResult<u64> {
        self.run(py, |vm| Ok(vm.memslot_generation()))
    }
    /// True once the TD is runnable (its vCPUs can fault).
    ///
    /// On a tdx VM after ``finalize()`` (KVM_TDX_FINALIZE_VM); on sw_protected with ``mirror=True``
    /// from the start; False on other VM types.
    #[getter]
    fn finalized(&self) -> bool {
        self.inner.finalized()
    }
    /// True after ``destroy()`` (also called when a ``with`` block ends).
    ///
    /// Every operation that changes the VM or runs a vCPU then raises ``ConfigError`` naming
    /// ``vm``; ``check()`` audits the teardown.
    #[getter]
    fn destroyed(&self) -> bool {
        self.inner.destroyed()
    }

    /// Make a range private or shared (KVM_SET_MEMORY_ATTRIBUTES).
    ///
    /// Models one guest conversion request and KVM's handling of it. If the attribute of any page
    /// of ``[gfn, gfn + npages)`` changes, the request charges ``psc_exit_ns + gmem_convert_ns``
    /// (counter ``conversions``) plus, with ``folio="2M"``, ``gmem_split_2m_ns`` per 2 MiB folio
    /// the range only partly covers (``gmem_splits``); then, before the change, KVM unmaps the
    /// range under the old attribute's filter (``kvm_arch_pre_set_memory_attributes``): going
    /// shared zaps private leaves (on a VM with a mirror root the mirror root's, through the hooks:
    /// a TD removes each page with BLOCK, TRACK, kick, PAGE.REMOVE, WBINVD and clear), going
    /// private zaps shared ones (the direct root's); a VM without a mirror root has one root and
    /// loses every leaf of the range. One remote TLB flush if a valid root lost a leaf. A range
    /// already all of the requested kind is a no-op that costs nothing (``map_gpa_range`` models
    /// a guest request, whose exit is charged even then). guest_memfd pages are not freed
    /// (``punch_hole`` does that) and the RMP is not changed.
    ///
    /// Args:
    ///     gfn: first 4 KiB guest page, in ``0..max_gfn``.
    ///     npages: number of 4 KiB pages, >= 1; the range must end at or below ``max_gfn`` and
    ///         every page must be in a memslot (with or without guest_memfd).
    ///     private: True (default) to make the range private, False to make it shared.
    ///
    /// Returns:
    ///     int: the number of present leaves zapped (0 when nothing changed).
    ///
    /// Raises:
    ///     ConfigError: naming ``private`` on a default VM (no private memory); ``gfn`` or
    ///         ``npages`` for a range beyond ``max_gfn`` or not covered by memslots; ``vm`` after
    ///         ``destroy()``. The VM is unchanged.
    ///     VmBugged: the VM was bugged, or a hook or SEAMCALL failed during the zap.
    ///     TypeError: an argument of the wrong type.
    ///     TdpmmuError: called from one of this VM's own hook objects (hooks must not use it).
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

    /// The guest's request to make a range private or shared, as KVM forwards it to the VMM.
    ///
    /// Models the KVM_HC_MAP_GPA_RANGE exit to userspace and the VMM's answer
    /// (KVM_SET_MEMORY_ATTRIBUTES). An SEV-SNP guest asks with a page-state-change (PSC) VMGEXIT;
    /// KVM (``snp_begin_psc``) makes one exit per run of contiguous entries of one page size and
    /// operation, so one call models one such run (a Linux guest's ``__set_pages_state`` sends up
    /// to 253 entries, 2 MiB ones where the range is 2 MiB-aligned). A TD asks with
    /// TDG.VP.VMCALL<MapGPA>, which KVM splits into one exit per 2 MiB (``TDX_MAP_GPA_MAX_LEN``):
    /// ``ceil(npages / 512)`` exits per call. A sw_protected guest makes the hypercall itself (one
    /// exit). Unlike ``set_memory_attributes`` (the VMM's own ioctl), every exit is charged
    /// ``psc_exit_ns`` and counted in ``conversions`` even when the whole range already has the
    /// requested attribute (an SNP guest accepting memory that is already private still asks
    /// before it PVALIDATEs). If any page's attribute changes, the call then does what
    /// ``set_memory_attributes`` does (without a second exit): ``gmem_convert_ns``, with
    /// ``folio="2M"`` ``gmem_split_2m_ns`` per partly covered 2 MiB folio (``gmem_splits``), and
    /// the unmap under the old attribute's filter, with one remote TLB flush if a valid root lost
    /// a leaf. guest_memfd pages are not freed and the RMP is not changed.
    ///
    /// Args:
    ///     gfn: first 4 KiB guest page, in ``0..max_gfn``.
    ///     npages: number of 4 KiB pages, >= 1; the range must end at or below ``max_gfn`` and
    ///         every page must be in a memslot (with or without guest_memfd).
    ///     private: True (default) to ask for private, False for shared.
    ///
    /// Returns:
    ///     int: the number of present leaves zapped (0 when nothing changed).
    ///
    /// Raises:
    ///     ConfigError: naming ``private`` on a default VM (no private memory); ``gfn`` or
    ///         ``npages`` for a range beyond ``max_gfn`` or not covered by memslots; ``vm`` after
    ///         ``destroy()``. The VM is unchanged (nothing charged).
    ///     VmBugged: the VM was bugged, or a hook or SEAMCALL failed during the zap.
    ///     TypeError: an argument of the wrong type.
    ///     TdpmmuError: called from one of this VM's own hook objects (hooks must not use it).
    #[pyo3(signature = (gfn, npages, private = true))]
    fn map_gpa_range(&self, py: Python<'_>, gfn: Int, npages: Int, private: bool) -> PyResult<u64> {
        let (gfn, npages) = self.range(py, &gfn, &npages)?;
        self.run(py, |vm| vm.map_gpa_range(gfn, npages, private))
    }

    /// Free the guest_memfd pages of a range (fallocate(PUNCH_HOLE) on the VM's guest_memfd).
    ///
    /// Models ``kvm_gmem_invalidate_begin``: KVM unmaps the range with the PRIVATE filter (on a VM
    /// with a mirror root: the mirror root and invalid roots, through the hooks; on a VM without
    /// one, every leaf of the range in its one root), with one remote TLB flush if a valid root
    /// lost a leaf; then guest_memfd frees the pages: the vendor's ``kvm_arch_gmem_invalidate``
    /// (SNP with design "gmem": RMPUPDATE back to shared, one instruction per 2 MiB RMP entry
    /// wholly inside the range, PSMASH first for one it only partly covers) and the freed backing
    /// pages (whole ones only) count as never touched, so the next private fault allocates and
    /// charges them again. The memory attributes do not change.
    ///
    /// Args:
    ///     gfn: first 4 KiB guest page, in ``0..max_gfn``.
    ///     npages: number of 4 KiB pages, >= 1; every page must be in a memslot with guest_memfd.
    ///
    /// Returns:
    ///     int: the number of present leaves zapped.
    ///
    /// Raises:
    ///     ConfigError: naming ``vm_type`` on a default VM (no guest_memfd); ``gfn`` or ``npages``
    ///         for a range beyond ``max_gfn`` or a page that is not in a guest_memfd memslot;
    ///         ``vm`` after ``destroy()``. The VM is unchanged.
    ///     VmBugged: the VM was bugged, or a hook, SEAMCALL or RMP instruction failed.
    ///     TypeError: an argument of the wrong type.
    ///     TdpmmuError: called from one of this VM's own hook objects (hooks must not use it).
    fn punch_hole(&self, py: Python<'_>, gfn: Int, npages: Int) -> PyResult<u64> {
        let (gfn, npages) = self.range(py, &gfn, &npages)?;
        self.run(py, |vm| vm.punch_hole(gfn, npages))
    }

    /// Make the TD runnable (KVM_TDX_FINALIZE_VM).
    ///
    /// Before it no vCPU can run (``fault``, ``fault_batch`` and ``run_memstress`` raise) and
    /// ``populate(..., private=True)`` builds the initial image with TDH.MEM.PAGE.ADD (the page is
    /// MAPPED at once; 16 TDH.MR.EXTEND per page with ``tdx={"measure": True}``). After it, private
    /// faults and pre-faults use TDH.MEM.PAGE.AUG (PENDING until the guest's TDG.MEM.PAGE.ACCEPT),
    /// and zaps of private pages TRACK and kick the vCPUs. Charges nothing.
    ///
    /// Returns:
    ///     None.
    ///
    /// Raises:
    ///     ConfigError: naming ``vm_type`` on a VM that is not a TD (default, snp, sw_protected;
    ///         sw_protected with ``mirror=True`` runs from the start); ``finalize`` if the TD is
    ///         already finalized or, with ``tdx={"version": "6.16"}``, while pre-faulted pages
    ///         still lack TDH.MEM.PAGE.ADD (``nr_premapped`` is not 0); ``vm`` after ``destroy()``.
    ///     VmBugged: the VM was bugged.
    ///     TdpmmuError: called from one of this VM's own hook objects (hooks must not use it).
    fn finalize(&self, py: Python<'_>) -> PyResult<()> {
        self.run(py, |vm| vm.finalize())
    }

    /// Tear the VM down in KVM's order (the last reference to the VM goes: ``kvm_destroy_vm``).
    ///
    /// 1. guest_memfd is released: every guest_memfd memslot is unmapped with the PRIVATE filter
    ///    and its pages are freed (as ``punch_hole``) while a TD still has its HKID, so a TD
    ///    removes each private page (BLOCK, TRACK, kick, PAGE.REMOVE, WBINVD, clear) and SNP
    ///    returns every RMP entry to shared;
    /// 2. with ``tdx={"sept_free": "sept_remove"}`` the leaf-less mirror tree is torn down before
    ///    the HKID goes, each S-EPT table by BLOCK (its parent entry), TRACK, kick, SEPT.REMOVE,
    ///    WBINVD and clear;
    /// 3. ``kvm_arch_pre_destroy_vm``: a TD releases its HKID (TDH.VP.FLUSH per vCPU,
    ///    TDH.MNG.VPFLUSHDONE, TDH.PHYMEM.CACHE.WB, TDH.MNG.KEY.FREEID);
    /// 4. every vCPU drops its roots, and every root is invalidated and zapped exclusively
    ///    (``kvm_mmu_uninit_tdp_mmu``); on the mirror root only ``free_external_spt`` is left to
    ///    run, so each remaining S-EPT table goes by TDH.PHYMEM.PAGE.RECLAIM and clear.
    ///
    /// Afterwards every operation that changes the VM or runs a vCPU raises ``ConfigError`` naming
    /// ``vm``; inspection (``walk``, ``spte``, ``roots``, ``memslots``, ``tables``, ``stats``,
    /// ``rmp_entry``, ``sept_entries``, ``trace_events``) still answers, and ``check()`` audits the
    /// teardown (no roots, no KVM page tables, no S-EPT or external tables, no private leaves, no
    /// assigned RMP entries). Leaving a ``with tdpmmu.VM(...)`` block calls it.
    ///
    /// Returns:
    ///     None.
    ///
    /// Raises:
    ///     ConfigError: naming ``vm`` if the VM is already destroyed.
    ///     VmBugged: the VM was bugged (it is then not torn down), or a hook or SEAMCALL failed
    ///         during the teardown (the VM is then destroyed and bugged).
    ///     TdpmmuError: called from one of this VM's own hook objects (hooks must not use it).
    fn destroy(&self, py: Python<'_>) -> PyResult<()> {
        self.run(py, |vm| vm.destroy())
    }

    /// The SEV-SNP guest's PVALIDATE over a range: validate private pages, or rescind validation.
    ///
    /// Models the guest instruction against the RMP: one PVALIDATE per 4 KiB page, or per 2 MiB
    /// page with ``size_2m``; each charges ``pvalidate_ns`` and counts ``pvalidate``. Architectural
    /// failures are reported, not raised, count ``pvalidate_errors`` and change nothing:
    /// ``NO_UPDATE`` (the page is already in the requested state) and ``FAIL_SIZEMISMATCH`` (a 4
    /// KiB PVALIDATE inside a 2 MiB RMP entry, or a 2 MiB one over 4 KiB entries). A guest rescinds
    /// validation (``validate=False``) before it hands a page back for conversion to shared.
    ///
    /// Args:
    ///     gfn: first 4 KiB guest page, in ``0..max_gfn``; a multiple of 512 with ``size_2m``.
    ///     npages: number of 4 KiB pages, >= 1 (default 1); a multiple of 512 with ``size_2m``.
    ///     size_2m: issue 2 MiB PVALIDATEs, one per 512 pages (default False: 4 KiB ones).
    ///     validate: True (default) to validate, False to rescind validation.
    ///
    /// Returns:
    ///     dict[str, int]: status name -> number of PVALIDATEs that ended with it: ``"SUCCESS"``,
    ///     ``"NO_UPDATE"``, ``"FAIL_SIZEMISMATCH"``.
    ///
    /// Raises:
    ///     ConfigError: naming ``vm_type`` on a VM that is not SNP; ``gfn`` if ``size_2m`` and
    ///         ``gfn`` or ``npages`` is not a multiple of 512, or if a page is not guest_memfd
    ///         memory assigned to the guest at that gpa in the RMP (checked before any PVALIDATE
    ///         runs); ``gfn`` or ``npages`` for a range beyond ``max_gfn``; ``vm`` after
    ///         ``destroy()``.
    ///     VmBugged: the VM was bugged.
    ///     TypeError: an argument of the wrong type.
    ///     TdpmmuError: called from one of this VM's own hook objects (hooks must not use it).
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

    /// Handle a nested page fault with the RMP size-mismatch bit set (``sev_handle_rmp_fault``).
    ///
    /// KVM PSMASHes the 2 MiB RMP entry behind ``gfn`` (if the entry is an assigned 2 MiB one; an
    /// entry already split is tolerated) and zaps the 2 MiB-aligned gfn range ``[gfn & ~511,
    /// +512)`` in every valid root so the NPT is rebuilt at 4 KiB, with one remote TLB flush if a
    /// leaf was zapped. Counts ``rmp_faults``. Use it before a 4 KiB PVALIDATE or conversion inside
    /// a 2 MiB RMP entry.
    ///
    /// Args:
    ///     gfn: any 4 KiB guest page of the 2 MiB range, in ``0..max_gfn``; it must be guest_memfd
    ///         memory.
    ///
    /// Returns:
    ///     None.
    ///
    /// Raises:
    ///     ConfigError: naming ``vm_type`` on a VM that is not SNP; ``gfn`` beyond ``max_gfn`` or
    ///         not guest_memfd memory; ``vm`` after ``destroy()``.
    ///     VmBugged: the VM was bugged, or the RMP instruction failed.
    ///     TypeError: ``gfn`` is not an int.
    ///     TdpmmuError: called from one of this VM's own hook objects (hooks must not use it).
    fn rmp_fault(&self, py: Python<'_>, gfn: Int) -> PyResult<()> {
        let gfn = gfn_arg(py, "gfn", &gfn, self.inner.max_gfn())?;
        self.run(py, |vm| vm.rmp_fault(gfn))
    }

    /// The SEV-SNP RMP entry of the guest_memfd page behind ``gfn`` (inspection; changes nothing).
    ///
    /// Args:
    ///     gfn: the 4 KiB guest page, in ``0..max_gfn``; it must be in a guest_memfd memslot of an
    ///         SNP VM.
    ///
    /// Returns:
    ///     dict: ``assigned`` (bool: the page is private to the guest), ``validated`` (bool: the
    ///     guest has PVALIDATEd it), ``size`` (``"4K"`` or ``"2M"``: the entry's page size) and
    ///     ``gpa`` (int: the guest-physical address in bytes the entry is assigned to, 0 when not
    ///     assigned); see ``tdpmmu.types.RmpEntry``.
    ///
    /// Raises:
    ///     ConfigError: naming ``gfn`` beyond ``max_gfn``, or with no RMP entry (not SNP
    ///         guest_memfd memory; also on every other VM type).
    ///     TypeError: ``gfn`` is not an int.
    ///     TdpmmuError: called from one of this VM's own hook objects (hooks must not use it).
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

    /// The entries of the external tree: a TD's S-EPT, or sw_protected+mirror's software tree.
    ///
    /// The S-EPT is the one the model of the TDX module keeps (inspection; changes nothing).
    ///
    /// Returns:
    ///     list[tuple[int, int, str, int]]: every entry that is not FREE, in tree order, as ``(gfn,
    ///     level, state, pfn)``: the first gfn the entry covers; its level (``VM.levels`` down to
    ///     1; an entry at level L > 1 links a table of level L - 1); its state, ``"TABLE"``,
    ///     ``"MAPPED"``, ``"PENDING"`` (added by PAGE.AUG, not yet accepted by the guest),
    ///     ``"BLOCKED"`` or ``"BLOCKED_TABLE"``; and a pfn: a leaf's private page, or for a table
    ///     entry the S-EPT table's own page (the module's memory, not one of ``tables()``). Empty
    ///     when a hook object answers the hooks (the model is then not driven).
    ///
    /// Raises:
    ///     ConfigError: naming ``vm_type`` on a VM without an external tree (default, snp,
    ///         sw_protected without ``mirror``).
    ///     TdpmmuError: called from one of this VM's own hook objects (hooks must not use it).
    fn sept_entries(&self, py: Python<'_>) -> PyResult<Vec<(u64, u8, &'static str, u64)>> {
        self.run(py, |vm| vm.sept_entries())
    }

    /// The trace as plain tuples (``tdpmmu.VM.trace_events`` wraps them as ``tdpmmu.Event``).
    ///
    /// Returns:
    ///     list[tuple[str, int, int, int]]: ``(op, gfn, level, detail)`` per event, empty unless
    ///     the VM was created with ``trace=True``. See ``tdpmmu.Event`` for the ops and details.
    fn trace_events(&self) -> Vec<(&'static str, u64, u8, u64)> {
        self.inner
            .events()
            .into_iter()
            .map(|e| (e.op, e.gfn, e.level, e.detail))
            .collect()
    }

    /// Take one guest page fault (an EPT/NPT violation) on a vCPU and handle it as KVM does.
    ///
    /// Models the exit, ``kvm_mmu_page_fault`` and ``kvm_tdp_mmu_page_fault``, and the re-entry.
    /// The vCPU loads its roots on its first fault (a TD's mirror root first). A gfn in no memslot
    /// is MMIO: an MMIO SPTE is installed at 4 KiB, or one of the current memslot generation is
    /// found without a page fault (the MMIO cache; no ``pf_taken``): EMULATE. An access whose kind
    /// (private or shared) does not match the gfn's memory attribute, or a private access to memory
    /// without guest_memfd, is KVM_EXIT_MEMORY_FAULT: MEMORY_FAULT, nothing changes. Otherwise KVM
    /// faults the pfn in (the first touch of a host backing page is charged; private pages come
    /// from guest_memfd), picks the level (the memslot's backing page; for private memory at most
    /// the folio, 4 KiB on a TD, and on SNP the RMP entry's size; never larger than a range of
    /// uniform attributes; 4 KiB for an exec fault with ``nx_huge_pages``) and walks the vCPU's
    /// root, linking missing tables and splitting huge leaves in the way, to install the leaf with
    /// a cmpxchg. A private fault uses the mirror root on a VM that has one; the hooks fire as the
    /// design says. On a TD a private fault is a write, a RETRY is retried inside KVM
    /// (``Fault.retries``) and the guest accepts the page afterwards; on SNP the guest PVALIDATEs a
    /// page it was just given.
    ///
    /// Args:
    ///     gfn: the faulting 4 KiB guest page, in ``0..max_gfn`` (without the shared bit: the alias
    ///         is chosen with ``private``).
    ///     private: True for a private access, False for a shared one, None (default) for what the
    ///         gfn's memory attribute says; a default VM has only shared memory and refuses True.
    ///     write: True (default) for a write access, False for a read (a read maps the same
    ///         writable SPTE, as KVM does for a writable host page).
    ///     exec: True for an instruction fetch (default False); with ``nx_huge_pages`` it maps 4
    ///         KiB only and splits a huge leaf in the way.
    ///     vcpu: index of the faulting vCPU, in ``0..vcpus`` (default 0).
    ///
    /// Returns:
    ///     tdpmmu.Fault: the outcome (``ret``, ``level``, ``spte``, ``retries``, ``modeled_ns``,
    ///     ``gfn``, ``private``).
    ///
    /// Raises:
    ///     ConfigError: naming ``gfn`` or ``vcpu`` out of range; ``private`` (True) on a default
    ///         VM; ``vm`` on a TD that is not finalized yet or after ``destroy()``. The VM is
    ///         unchanged.
    ///     VmBugged: the VM was bugged, or a hook, SEAMCALL or RMP instruction failed in this
    ///         fault.
    ///     OutOfMemory: no page-table memory for a table the walk needs.
    ///     TypeError: an argument of the wrong type (e.g. ``write=1`` or a bool ``gfn``).
    ///     TdpmmuError: called from one of this VM's own hook objects (hooks must not use it).
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

    /// Take one fault per gfn of an array, in order, on one vCPU, in one native call.
    ///
    /// Each gfn is handled exactly as ``fault(gfn, private, write, exec, vcpu)`` would (same
    /// counters, costs and hooks), under one hold of ``mmu_lock`` for read; only the RET_PF_* codes
    /// are returned. Use it to drive many faults without a Python call each.
    ///
    /// Args:
    ///     gfns: 1-D numpy array of any integer dtype (copied before the GIL is released), each
    ///         value in ``0..max_gfn``; may be empty.
    ///     private: as ``fault``'s, for every gfn (True, False or None: by each gfn's attribute).
    ///     write: as ``fault``'s, for every gfn (default True).
    ///     exec: as ``fault``'s, for every gfn (default False).
    ///     vcpu: the faulting vCPU, in ``0..vcpus`` (default 0).
    ///
    /// Returns:
    ///     numpy.ndarray: uint8, one ``tdpmmu.Ret`` code per gfn (``Ret(code)`` names it).
    ///
    /// Raises:
    ///     TypeError: ``gfns`` is not a 1-D numpy integer array (a list is refused), or another
    ///         argument has the wrong type.
    ///     ConfigError: naming ``gfns`` (a negative value or one >= ``max_gfn``, with its index),
    ///         ``vcpu`` out of range, ``private`` (True) on a default VM, ``vm`` on a TD that is
    ///         not finalized or after ``destroy()``; all refused before any fault runs.
    ///     VmBugged: the VM was bugged, or a fault bugged it (the batch stops there; earlier faults
    ///         stay done).
    ///     OutOfMemory: no page-table memory for a table (earlier faults stay done).
    ///     TdpmmuError: called from one of this VM's own hook objects (hooks must not use it).
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

    /// Pre-fault a range without exits (KVM_PRE_FAULT_MEMORY, or a TD's initial image).
    ///
    /// Before ``finalize()`` a TD's private pre-faults are its initial image
    /// (KVM_TDX_INIT_MEM_REGION).
    ///
    /// Runs prefetch faults on vCPU 0 from ``gfn`` on: each maps its page at the level a fault
    /// would choose, and the next starts after the page it mapped (a 2 MiB-backed range takes one
    /// per 2 MiB); a page already mapped is skipped. Leaves are made with Accessed clear. A
    /// pre-fault is an ioctl, not an exit: it charges ``fault_handling_ns`` per leaf installed
    /// (plus first-touch host allocation), no ``exit_entry_ns``, and counts no ``pf_taken`` or
    /// ``pf_fixed``. Private pre-faults on a TD: before ``finalize()`` TDH.MEM.PAGE.ADD (MAPPED at
    /// once; with ``tdx={"measure": True}`` also 16 TDH.MR.EXTEND per page; with ``"version":
    /// "6.16"`` the hook only counts ``nr_premapped`` and populate issues PAGE.ADD after the map);
    /// after it TDH.MEM.PAGE.AUG (PENDING until the guest first touches and accepts the page).
    ///
    /// Args:
    ///     gfn: first 4 KiB guest page, in ``0..max_gfn``.
    ///     npages: number of 4 KiB pages, >= 1; every page must be in a memslot.
    ///     private: True for private memory, False for shared, None (default) for the range's
    ///         memory attribute. On a VM with private memory the whole range's attribute must be of
    ///         that kind, and private memory must be in guest_memfd memslots; a TD before
    ///         ``finalize()`` takes only private pre-faults (its initial image).
    ///
    /// Returns:
    ///     int: the number of leaves installed (pages already mapped are not counted).
    ///
    /// Raises:
    ///     ConfigError: naming ``gfn`` (a page in no memslot) or ``npages`` for a bad range;
    ///         ``private`` on a default VM (True), when the range's attributes are not all of the
    ///         requested kind, for private memory without guest_memfd, or for shared memory on a TD
    ///         not yet finalized; ``vm`` after ``destroy()``. All refused before anything changes.
    ///     VmBugged: the VM was bugged, or a hook or SEAMCALL failed (the pre-faults stop there).
    ///     OutOfMemory: no page-table memory for a table.
    ///     KeyboardInterrupt: Ctrl-C, polled every 16384 pre-fault attempts when called from
    ///         the main thread; the leaves installed so far stay and the VM is consistent.
    ///     TypeError: an argument of the wrong type.
    ///     TdpmmuError: called from one of this VM's own hook objects (hooks must not use it).
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

    /// Zap the leaves of a range in every valid root (``kvm_zap_gfn_range``).
    ///
    /// Every present leaf that overlaps ``[gfn, gfn + npages)`` (a huge leaf partly inside is
    /// zapped whole) in every valid root, direct and mirror, is set to ``SHADOW_NONPRESENT_VALUE``,
    /// charging ``spte_update_ns`` each; page tables stay linked. One remote TLB flush if anything
    /// was zapped. On a mirror root the hooks fire under design "mirror" (a TD removes each page:
    /// BLOCK, TRACK, kick, PAGE.REMOVE, WBINVD, clear) but not under "private" (this zap has no
    /// PRIVATE filter, so the S-EPT keeps the page). Host pages are not freed.
    ///
    /// Args:
    ///     gfn: first 4 KiB guest page, in ``0..max_gfn``.
    ///     npages: number of 4 KiB pages, >= 1; the range must end at or below ``max_gfn`` (it need
    ///         not be in a memslot).
    ///
    /// Returns:
    ///     int: the number of present leaves zapped, over all roots.
    ///
    /// Raises:
    ///     ConfigError: naming ``gfn`` or ``npages`` for a range beyond ``max_gfn``; ``vm`` after
    ///         ``destroy()``. The VM is unchanged.
    ///     VmBugged: the VM was bugged, or a hook or SEAMCALL failed during the zap.
    ///     TypeError: an argument of the wrong type.
    ///     TdpmmuError: called from one of this VM's own hook objects (hooks must not use it).
    fn zap_gfn_range(&self, py: Python<'_>, gfn: Int, npages: Int) -> PyResult<u64> {
        let (gfn, npages) = self.range(py, &gfn, &npages)?;
        self.run(py, |vm| vm.zap_gfn_range(gfn, npages))
    }

    /// Unmap a range for a host mm event (the MMU notifier's ``invalidate_range_start``).
    ///
    /// Models ``kvm_unmap_gfn_range`` → ``kvm_tdp_mmu_unmap_gfn_range`` with the SHARED attribute
    /// filter: on a VM with a mirror root only the direct roots (and invalid roots) are zapped, so
    /// private memory behind the mirror root stays mapped; a VM without a mirror root has one
    /// direct root for both kinds, and every leaf of the range in it (and in invalid roots) is
    /// zapped. One remote TLB flush if a valid root lost a leaf. Each entry zapped charges
    /// ``spte_update_ns``. Host pages are not freed. The range is in gfns (the model's host mapping
    /// is linear).
    ///
    /// Args:
    ///     gfn: first 4 KiB guest page, in ``0..max_gfn``.
    ///     npages: number of 4 KiB pages, >= 1; the range must end at or below ``max_gfn``.
    ///
    /// Returns:
    ///     int: the number of present leaves zapped.
    ///
    /// Raises:
    ///     ConfigError: naming ``gfn`` or ``npages`` for a range beyond ``max_gfn``; ``vm`` after
    ///         ``destroy()``. The VM is unchanged.
    ///     VmBugged: the VM was bugged, or a hook failed during the zap.
    ///     TypeError: an argument of the wrong type.
    ///     TdpmmuError: called from one of this VM's own hook objects (hooks must not use it).
    fn mmu_notifier_invalidate(&self, py: Python<'_>, gfn: Int, npages: Int) -> PyResult<u64> {
        let (gfn, npages) = self.range(py, &gfn, &npages)?;
        self.run(py, |vm| vm.mmu_notifier_invalidate(gfn, npages))
    }

    /// Invalidate and zap every direct root (``kvm_mmu_zap_all_fast``, KVM's "fast zap").
    ///
    /// Every valid direct root is marked invalid; every vCPU drops its reference to it (and loads a
    /// new root on its next fault); each invalidated root is zapped with the shared (atomic) setter
    /// in four passes (4 KiB, 2 MiB, 1 GiB, root level), charging ``spte_update_ns`` per entry, and
    /// the TDP MMU drops its reference; a root whose refcount reaches 0 is freed. Mirror roots are
    /// not touched. No remote TLB flush. Deleting a memslot of a default VM with
    /// ``slot_zap_all=True`` does the same.
    ///
    /// Returns:
    ///     None.
    ///
    /// Raises:
    ///     ConfigError: naming ``vm`` after ``destroy()``.
    ///     VmBugged: the VM was bugged.
    ///     TdpmmuError: called from one of this VM's own hook objects (hooks must not use it).
    fn zap_all_fast(&self, py: Python<'_>) -> PyResult<()> {
        self.run(py, |vm| vm.zap_all_fast())
    }

    /// Create a memslot (KVM_SET_USER_MEMORY_REGION2).
    ///
    /// The slot maps ``[gfn, gfn + npages)`` to a fresh range of host pages of ``backing`` bytes (1
    /// GiB-aligned on the host) and, with ``gmem``, has a guest_memfd: separate host pages for
    /// private memory (on SNP, RMP entries bound to the VM). Its pages start shared (only the
    /// memory given at creation starts private on a confidential VM). The memslot generation grows
    /// by 2. ``tdpmmu.VM.add_memslot`` also takes ``backing`` as ``"4K"``, ``"2M"`` or ``"1G"``.
    ///
    /// Args:
    ///     gfn: first 4 KiB guest page; a multiple of the backing page (1, 512 or 262144 pages).
    ///     npages: number of 4 KiB pages, >= 1, a multiple of the backing page; the slot must end
    ///         at or below ``max_gfn`` and must not overlap another memslot.
    ///     backing: host page size in bytes: 4096 (default), 2097152 or 1073741824.
    ///     gmem: give the slot a guest_memfd (default False); only VMs with private memory (tdx,
    ///         snp, sw_protected) take it.
    ///     readonly: ``KVM_MEM_READONLY`` (default False): SPTEs of the slot are never writable
    ///         and a guest write is emulated (``Ret.EMULATE``, userspace MMIO); not on tdx/snp
    ///         (protected state) nor with ``gmem``, and the slot cannot log dirty pages.
    ///
    /// Returns:
    ///     int: the new slot's id (ids count up and are never reused; the default slot is 0).
    ///
    /// Raises:
    ///     ConfigError: naming ``gfn`` (misaligned, or overlapping a memslot), ``npages``,
    ///         ``backing`` (not a host page size), ``gmem`` (on a default VM), ``readonly`` (where
    ///         KVM has no read-only memory) or ``vm`` (after ``destroy()``). The VM is unchanged.
    ///     OutOfMemory: the slot's page tables and metadata (fully mapped at 4 KiB) would exceed
    ///         the VM's ``budget`` (nothing is allocated), or its bookkeeping could not be
    ///         allocated.
    ///     VmBugged: the VM was bugged.
    ///     TypeError: an argument of the wrong type.
    ///     TdpmmuError: called from one of this VM's own hook objects (hooks must not use it).
    #[pyo3(signature = (gfn, npages, backing = Int::of(4096), gmem = false, readonly = false))]
    #[pyo3(text_signature = "(self, /, gfn, npages, backing=4096, gmem=False, readonly=False)")]
    fn add_memslot(
        &self,
        py: Python<'_>,
        gfn: Int,
        npages: Int,
        backing: Int,
        gmem: bool,
        readonly: bool,
    ) -> PyResult<u32> {
        let (gfn, npages) = self.range(py, &gfn, &npages)?;
        let backing = in_range(py, "backing", &backing, 1 << 62)?;
        self.run(py, |vm| {
            vm.add_memslot_flags(gfn, npages, backing, gmem, readonly)
        })
    }

    /// Move a memslot to another guest-physical address (``KVM_MR_MOVE``).
    ///
    /// The same host memory, flags and dirty log, at ``new_gfn``. As KVM does, the old range
    /// is flushed first like a deletion (the fast zap of everything on a default VM with
    /// ``slot_zap_all``, otherwise the slot's leaves in every root, with one flush); the
    /// memslot generation grows. guest_memfd slots cannot move.
    ///
    /// Args:
    ///     slot: the slot's id.
    ///     new_gfn: the slot's new first gfn, a multiple of its backing page; the moved slot
    ///         must end at or below ``max_gfn`` and overlap no other slot.
    ///
    /// Returns:
    ///     None.
    ///
    /// Raises:
    ///     ConfigError: naming ``slot`` (unknown, or with guest_memfd) or ``new_gfn``
    ///         (misaligned, past ``max_gfn``, overlapping); ``vm`` after ``destroy()``. The VM is
    ///         unchanged.
    ///     VmBugged: the VM was bugged, or a hook failed during the zap.
    ///     TypeError: an argument of the wrong type.
    ///     TdpmmuError: called from one of this VM's own hook objects (hooks must not use it).
    fn move_memslot(&self, py: Python<'_>, slot: Int, new_gfn: Int) -> PyResult<()> {
        let slot = in_range(py, "slot", &slot, u32::MAX as u128)? as u32;
        let new_gfn = gfn_arg(py, "new_gfn", &new_gfn, self.inner.max_gfn())?;
        self.run(py, |vm| vm.move_memslot(slot, new_gfn))
    }

    /// Delete a memslot (KVM_SET_USER_MEMORY_REGION2 with size 0).
    ///
    /// On a default VM with ``slot_zap_all=True`` (KVM_X86_QUIRK_SLOT_ZAP_ALL, the default) KVM
    /// zaps everything with the fast zap (as ``zap_all_fast``). Otherwise it zaps the slot's leaves
    /// in every root, mirror and direct, valid and invalid (``kvm_mmu_zap_memslot``, PRIVATE and
    /// SHARED), with one remote TLB flush if a valid root lost a leaf; a TD removes the private
    /// pages through the hooks. The slot's guest_memfd is unbound (on SNP its RMP entries are
    /// dropped) and its first-touch state is forgotten. The memslot generation grows by 2. The
    /// memory attributes of the range stay as they are.
    ///
    /// Args:
    ///     slot: the slot's id, as ``add_memslot`` returned it or ``memslots()`` lists it (0 is the
    ///         default slot).
    ///
    /// Returns:
    ///     None.
    ///
    /// Raises:
    ///     ConfigError: naming ``slot`` (no such memslot, or negative) or ``vm`` (after
    ///         ``destroy()``). The VM is unchanged.
    ///     VmBugged: the VM was bugged, or a hook or SEAMCALL failed during the zap.
    ///     TypeError: ``slot`` is not an int.
    ///     TdpmmuError: called from one of this VM's own hook objects (hooks must not use it).
    fn delete_memslot(&self, py: Python<'_>, slot: Int) -> PyResult<()> {
        let slot = in_range(py, "slot", &slot, u32::MAX as u128)? as u32;
        self.run(py, |vm| vm.delete_memslot(slot))
    }

    /// Start or stop dirty logging on a memslot (``KVM_MEM_LOG_DIRTY_PAGES``).
    ///
    /// Models ``kvm_mmu_slot_apply_flags``. Enabling allocates the slot's dirty bitmap (one bit
    /// per 4 KiB page; all set with ``initially_set``) and, unless both ``manual_protect`` and
    /// ``initially_set`` are given, splits the slot's huge pages (``eager_split``, KVM's
    /// ``eager_page_split``) and write-protects every leaf (W cleared, MMU-writable kept, so
    /// the guest's next write takes the lockless fast path and marks the page dirty); one
    /// remote TLB flush if any leaf changed. While logging, new mappings of the slot are 4K
    /// and every writable SPTE installed marks its page dirty. Disabling frees the bitmap and
    /// recovers huge mappings where the backing allows (``recover_huge_pages``).
    ///
    /// Args:
    ///     slot: memslot id (from ``memslots()``/``add_memslot``).
    ///     enabled: True to start logging, False to stop (doing what is already the state is a
    ///         no-op returning 0).
    ///     manual_protect: ``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2``: ``get_dirty_log`` only copies
    ///         the bitmap and ``clear_dirty_log`` re-arms pages (default False).
    ///     initially_set: ``KVM_DIRTY_LOG_INITIALLY_SET`` (needs ``manual_protect``): the bitmap
    ///         starts all set and nothing is write-protected up front (default False).
    ///     eager_split: split huge pages when protection reaches them (default True).
    ///     pml: the host logs with PML (Intel, default False): 4K leaves are armed by clearing
    ///         their D bit instead of W (no exit: the CPU logs the first write to each page, one
    ///         PML-full exit per 512 logged pages per vCPU), huge leaves are still
    ///         write-protected, and GET/CLEAR re-arm by clearing D.
    ///
    /// Returns:
    ///     int: SPTEs changed: write-protected (or D-cleared with ``pml``) when enabling, made
    ///     huge again when disabling.
    ///
    /// Raises:
    ///     ConfigError: naming ``slot`` for an unknown id or a guest_memfd slot (KVM refuses
    ///         dirty logging on private memory), ``initially_set`` without ``manual_protect``,
    ///         ``pml`` when enabling on a VM with ``ad_bits=False`` (PML needs EPT A/D),
    ///         ``vm`` after ``destroy()``. The VM is unchanged.
    ///     OutOfMemory: the bitmap does not fit the VM's budget.
    ///     VmBugged: the VM was bugged.
    ///     TypeError: an argument of the wrong type.
    ///     TdpmmuError: called from one of this VM's own hook objects (hooks must not use it).
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (slot, enabled, manual_protect = false, initially_set = false, eager_split = true, pml = false))]
    fn set_dirty_logging(
        &self,
        py: Python<'_>,
        slot: Int,
        enabled: bool,
        manual_protect: bool,
        initially_set: bool,
        eager_split: bool,
        pml: bool,
    ) -> PyResult<u64> {
        let slot = in_range(py, "slot", &slot, u32::MAX as u128)? as u32;
        self.run(py, |vm| {
            vm.set_dirty_logging(
                slot,
                enabled,
                manual_protect,
                initially_set,
                eager_split,
                pml,
            )
        })
    }

    /// The memslot's dirty bitmap (``KVM_GET_DIRTY_LOG``).
    ///
    /// Models ``kvm_get_dirty_log_protect``. Without manual protection the set bits are taken
    /// (the bitmap is cleared) and those pages write-protected again under ``mmu_lock`` for
    /// write, with one remote TLB flush; with ``manual_protect`` the bitmap is only copied.
    ///
    /// Args:
    ///     slot: memslot id; the slot must log dirty pages.
    ///
    /// Returns:
    ///     numpy.ndarray: uint64 words, KVM's layout: bit ``i`` of word ``w`` is page ``64 * w +
    ///     i`` of the slot. ``numpy.unpackbits(a.view(numpy.uint8), bitorder="little")`` gives
    ///     one 0/1 per page.
    ///
    /// Raises:
    ///     ConfigError: naming ``slot`` for an unknown id or a slot that does not log dirty pages;
    ///         ``vm`` after ``destroy()``.
    ///     VmBugged: the VM was bugged.
    ///     TypeError: ``slot`` is not an int.
    ///     TdpmmuError: called from one of this VM's own hook objects (hooks must not use it).
    fn get_dirty_log<'py>(
        &self,
        py: Python<'py>,
        slot: Int,
    ) -> PyResult<Bound<'py, PyArray1<u64>>> {
        let slot = in_range(py, "slot", &slot, u32::MAX as u128)? as u32;
        let words = self.run(py, |vm| vm.get_dirty_log(slot))?;
        Ok(PyArray1::from_vec(py, words))
    }

    /// Re-arm dirty logging of part of a memslot (``KVM_CLEAR_DIRTY_LOG``).
    ///
    /// Models ``kvm_clear_dirty_log_protect``: the bits of pages ``[first_page, first_page +
    /// npages)`` of the slot are cleared and the pages that were dirty write-protected again
    /// (with ``initially_set``, huge pages over them are first split or write-protected); one
    /// remote TLB flush if any SPTE changed. Needs ``manual_protect``.
    ///
    /// Args:
    ///     slot: memslot id; the slot must log dirty pages with ``manual_protect``.
    ///     first_page: first page, counted from the slot's start, a multiple of 64.
    ///     npages: pages, >= 1; a multiple of 64 unless the range reaches the slot's end.
    ///
    /// Returns:
    ///     int: the SPTEs write-protected.
    ///
    /// Raises:
    ///     ConfigError: naming ``slot`` (unknown, not logging, or without ``manual_protect``),
    ///         ``first_page`` or ``npages`` out of KVM's rules; ``vm`` after ``destroy()``. The
    ///         VM is unchanged.
    ///     VmBugged: the VM was bugged.
    ///     TypeError: an argument of the wrong type.
    ///     TdpmmuError: called from one of this VM's own hook objects (hooks must not use it).
    fn clear_dirty_log(
        &self,
        py: Python<'_>,
        slot: Int,
        first_page: Int,
        npages: Int,
    ) -> PyResult<u64> {
        let slot = in_range(py, "slot", &slot, u32::MAX as u128)? as u32;
        let first = in_range(py, "first_page", &first_page, 1 << 64)?;
        let n = in_range(py, "npages", &npages, 1 << 64)?;
        self.run(py, |vm| vm.clear_dirty_log(slot, first, n))
    }

    /// Age a range's shared leaves (the MMU notifier's clear_young).
    ///
    /// Models ``kvm_tdp_mmu_age_gfn_range``: lockless in KVM, one SPTE update
    /// (``spte_update_ns``, ``sptes_aged``) per young leaf, no ``handle_changed_spte`` and no
    /// flush. Only the direct root (the notifier's SHARED filter). With A/D bits an atomic AND
    /// clears Accessed and guest accesses set it again (EPT A/D); with ``ad_bits=False`` a
    /// cmpxchg marks the leaf for access tracking (RWX cleared, R and X saved in bits 54/56),
    /// so the next access faults and the fast path restores it.
    ///
    /// Args:
    ///     gfn: first 4 KiB guest page, in ``0..max_gfn``.
    ///     npages: number of 4 KiB pages, >= 1, within ``max_gfn``.
    ///
    /// Returns:
    ///     bool: whether any leaf in the range was young.
    ///
    /// Raises:
    ///     ConfigError: naming ``gfn`` or ``npages`` out of range; ``vm`` after ``destroy()``.
    ///     VmBugged: the VM was bugged.
    ///     TypeError: an argument of the wrong type.
    ///     TdpmmuError: called from one of this VM's own hook objects (hooks must not use it).
    fn age_gfn_range(&self, py: Python<'_>, gfn: Int, npages: Int) -> PyResult<bool> {
        let (gfn, npages) = self.range(py, &gfn, &npages)?;
        self.run(py, |vm| vm.age_gfn_range(gfn, npages))
    }

    /// Whether a range has a young shared leaf (the MMU notifier's test_young).
    ///
    /// Models ``kvm_tdp_mmu_test_age_gfn``: changes nothing.
    ///
    /// Args:
    ///     gfn: first 4 KiB guest page, in ``0..max_gfn``.
    ///     npages: number of 4 KiB pages, >= 1 (default 1).
    ///
    /// Returns:
    ///     bool: True if a present leaf in the range is young: its Accessed bit is set (with
    ///     ``ad_bits=False``: it is not access-tracked).
    ///
    /// Raises:
    ///     ConfigError: naming ``gfn`` or ``npages`` out of range; ``vm`` after ``destroy()``.
    ///     VmBugged: the VM was bugged.
    ///     TypeError: an argument of the wrong type.
    ///     TdpmmuError: called from one of this VM's own hook objects (hooks must not use it).
    #[pyo3(signature = (gfn, npages = None))]
    fn test_age_gfn(&self, py: Python<'_>, gfn: Int, npages: Option<Int>) -> PyResult<bool> {
        let n = npages.unwrap_or(Int::of(1));
        let (gfn, npages) = self.range(py, &gfn, &n)?;
        self.run(py, |vm| vm.test_age_gfn(gfn, npages))
    }

    /// Split the huge pages of a range (eager page splitting).
    ///
    /// Models ``kvm_tdp_mmu_try_split_huge_pages`` under ``mmu_lock`` for read: every present
    /// huge leaf above ``target_level`` in the direct root becomes a table of 512 smaller
    /// leaves with the same permissions, in pre-order (1G to 2M to 4K in one pass), charging
    /// ``spte_update_ns`` per SPTE created; no TLB flush (the translation is unchanged).
    ///
    /// Args:
    ///     gfn: first 4 KiB guest page, in ``0..max_gfn``.
    ///     npages: number of 4 KiB pages, >= 1, within ``max_gfn``.
    ///     target_level: 1 (split to 4K) or 2 (split 1G pages to 2M).
    ///
    /// Returns:
    ///     int: the huge pages split.
    ///
    /// Raises:
    ///     ConfigError: naming ``gfn``, ``npages`` or ``target_level`` out of range; ``vm``
    ///         after ``destroy()``.
    ///     OutOfMemory: no page-table memory for a table.
    ///     VmBugged: the VM was bugged.
    ///     TypeError: an argument of the wrong type.
    ///     TdpmmuError: called from one of this VM's own hook objects (hooks must not use it).
    fn split_huge_pages(
        &self,
        py: Python<'_>,
        gfn: Int,
        npages: Int,
        target_level: Int,
    ) -> PyResult<u64> {
        let (gfn, npages) = self.range(py, &gfn, &npages)?;
        let level = in_range(py, "target_level", &target_level, 256)? as u8;
        self.run(py, |vm| vm.split_huge_pages(gfn, npages, level))
    }

    /// Map a memslot huge again where its backing allows (huge-page recovery).
    ///
    /// Models ``kvm_mmu_recover_huge_pages`` (v6.13+, formerly zapping collapsible SPTEs)
    /// under ``mmu_lock`` for read: each table at 2M or 1G wholly inside the slot, whose range
    /// the host backing (and on a confidential VM the shared attribute) allows to map huge,
    /// is replaced by one huge leaf built from its first present leaf, and the subtree below is
    /// torn down; one flush if any was. ``set_dirty_logging(slot, False)`` does this.
    ///
    /// Args:
    ///     slot: memslot id; the slot must not log dirty pages.
    ///
    /// Returns:
    ///     int: the huge leaves made.
    ///
    /// Raises:
    ///     ConfigError: naming ``slot`` for an unknown id or a slot that logs dirty pages;
    ///         ``vm`` after ``destroy()``.
    ///     VmBugged: the VM was bugged.
    ///     TypeError: ``slot`` is not an int.
    ///     TdpmmuError: called from one of this VM's own hook objects (hooks must not use it).
    fn recover_huge_pages(&self, py: Python<'_>, slot: Int) -> PyResult<u64> {
        let slot = in_range(py, "slot", &slot, u32::MAX as u128)? as u32;
        self.run(py, |vm| vm.recover_huge_pages(slot))
    }

    /// Add or remove a write tracker of a shared guest page (KVM's page tracking).
    ///
    /// Models ``kvm_write_track_add_gfn`` / ``kvm_write_track_remove_gfn`` (users such as
    /// KVMGT). The first tracker disallows huge pages over the page and write-protects every
    /// leaf mapping it (``kvm_tdp_mmu_write_protect_gfn``: W and MMU-writable cleared, one
    /// flush), so the fast path cannot undo it; a guest write to the page then returns
    /// ``Ret.WRITE_PROTECTED`` (KVM emulates the write; ``pf_write_protected``). With the last
    /// tracker removed, the next write fault maps the page writable again.
    ///
    /// Args:
    ///     gfn: a shared guest page in a memslot without guest_memfd, in ``0..max_gfn``.
    ///     add: True to add a tracker (default), False to remove one.
    ///
    /// Returns:
    ///     int: the page's tracker count afterwards.
    ///
    /// Raises:
    ///     ConfigError: naming ``gfn`` (out of range, in no memslot, in a guest_memfd slot, or
    ///         not tracked when removing); ``vm`` after ``destroy()``. The VM is unchanged.
    ///     OutOfMemory: the slot's tracking counts (4 bytes per page) exceed the VM's budget.
    ///     VmBugged: the VM was bugged.
    ///     TypeError: an argument of the wrong type.
    ///     TdpmmuError: called from one of this VM's own hook objects (hooks must not use it).
    #[pyo3(signature = (gfn, add = true))]
    fn write_track_gfn(&self, py: Python<'_>, gfn: Int, add: bool) -> PyResult<u32> {
        let gfn = gfn_arg(py, "gfn", &gfn, self.inner.max_gfn())?;
        self.run(py, |vm| vm.write_track_gfn(gfn, add))
    }

    /// One run of the NX huge page recovery worker.
    ///
    /// Models ``kvm_recover_nx_huge_pages`` with the TDP MMU's v6.17+
    /// ``kvm_tdp_mmu_zap_possible_nx_huge_page`` (``mmu_lock`` for read). With
    /// ``nx_huge_pages=True`` an exec fault maps 4K where a huge page could have been and puts
    /// the table it had to create on a list (``stats["nx_lpage_splits"]``); this zaps
    /// ⌈nx_lpage_splits / ratio⌉ of the oldest (the parent entry is set non-present if it
    /// still points at the table, and the subtree is torn down), so later non-exec faults there
    /// map huge again. Tables of a slot that logs dirty pages are only taken off the list. One
    /// remote TLB flush if any table was zapped. The worker's period is the caller's cadence.
    ///
    /// Args:
    ///     ratio: KVM's ``nx_huge_pages_recovery_ratio``, >= 0 (default 60; 0 recovers nothing).
    ///
    /// Returns:
    ///     int: the tables zapped (``stats["nx_huge_pages_recovered"]`` adds them up).
    ///
    /// Raises:
    ///     ConfigError: naming ``ratio`` out of range; ``vm`` after ``destroy()``.
    ///     VmBugged: the VM was bugged.
    ///     TypeError: ``ratio`` is not an int.
    ///     TdpmmuError: called from one of this VM's own hook objects (hooks must not use it).
    #[pyo3(signature = (ratio = None))]
    fn nx_recover(&self, py: Python<'_>, ratio: Option<Int>) -> PyResult<u64> {
        let ratio = match ratio {
            Some(r) => in_range(py, "ratio", &r, 1 << 32)? as u32,
            None => 60,
        };
        self.run(py, |vm| vm.nx_recover(ratio))
    }

    /// The memslots, ordered by gfn (inspection).
    ///
    /// Returns:
    ///     list[tuple[int, int, int, int, bool, int]]: one ``(id, gfn, npages, backing, gmem,
    ///     host_pfn)`` per slot: its id, first gfn, size in 4 KiB pages, host page size in bytes,
    ///     whether it has a guest_memfd, and the host pfn of its first (shared) page.
    ///
    /// Raises:
    ///     TdpmmuError: called from one of this VM's own hook objects (hooks must not use it).
    fn memslots(&self, py: Python<'_>) -> PyResult<Vec<core::vm::MemslotInfo>> {
        self.run(py, |vm| Ok(vm.memslots()))
    }

    /// The TDP roots, newest first (inspection).
    ///
    /// Returns:
    ///     list[dict]: one dict per root (``tdpmmu.types.RootInfo``): ``pfn`` (host pfn of the root
    ///     table), ``role`` (KVM's ``kvm_mmu_page_role`` word: level, direct, access, efer_nx,
    ///     cr0_wp; bit 11 set when invalid, bit 19 ``is_mirror``), ``level`` (= ``levels``),
    ///     ``mirror``, ``refcount`` (one per vCPU that loaded it plus one for the TDP MMU while it
    ///     is valid), ``invalid`` and ``scheduled_to_zap``. Empty before the first fault or
    ///     pre-fault, and after ``destroy()``.
    ///
    /// Raises:
    ///     TdpmmuError: called from one of this VM's own hook objects (hooks must not use it).
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

    /// The entries on the path to ``gfn``, as the hardware walk sees them (inspection).
    ///
    /// Walks the newest valid root of the kind ``private`` selects: the mirror root for
    /// ``private=True`` on a VM with one, else the direct root (on a VM with a shared bit, at index
    /// ``gfn | shared_bit``). A VM without a mirror root (snp, sw_protected) walks its one root
    /// either way.
    ///
    /// Args:
    ///     gfn: the 4 KiB guest page, in ``0..max_gfn``.
    ///     private: True to walk the private (mirror) root, False (default) for the direct root; a
    ///         default VM refuses True.
    ///
    /// Returns:
    ///     list[tuple[int, int]]: ``(level, spte)`` from the root level down, ending at a leaf or
    ///     at the first non-present entry; ``[]`` when there is no such root (before the first
    ///     fault, after ``zap_all_fast`` until the next fault, after ``destroy()``).
    ///
    /// Raises:
    ///     ConfigError: naming ``gfn`` beyond ``max_gfn``, or ``private`` (True) on a default VM.
    ///     TypeError: an argument of the wrong type.
    ///     TdpmmuError: called from one of this VM's own hook objects (hooks must not use it).
    #[pyo3(signature = (gfn, private = false))]
    fn walk(&self, py: Python<'_>, gfn: Int, private: bool) -> PyResult<Vec<(u8, u64)>> {
        let gfn = gfn_arg(py, "gfn", &gfn, self.inner.max_gfn())?;
        self.run(py, |vm| vm.walk(gfn, private))
    }

    /// The SPTE that maps ``gfn``: the last entry of ``walk(gfn, private)`` (inspection).
    ///
    /// Args:
    ///     gfn: the 4 KiB guest page, in ``0..max_gfn``.
    ///     private: True for the private (mirror) root, False (default) for the direct root; a
    ///         default VM refuses True.
    ///
    /// Returns:
    ///     int: the leaf, or the entry where the walk stopped; ``SHADOW_NONPRESENT_VALUE`` (``1 <<
    ///     63``) when there is no root.
    ///
    /// Raises:
    ///     ConfigError: naming ``gfn`` beyond ``max_gfn``, or ``private`` (True) on a default VM.
    ///     TypeError: an argument of the wrong type.
    ///     TdpmmuError: called from one of this VM's own hook objects (hooks must not use it).
    #[pyo3(signature = (gfn, private = false))]
    fn spte(&self, py: Python<'_>, gfn: Int, private: bool) -> PyResult<u64> {
        let gfn = gfn_arg(py, "gfn", &gfn, self.inner.max_gfn())?;
        self.run(py, |vm| vm.spte(gfn, private))
    }

    /// A read-only, zero-copy view of the KVM page tables (inspection).
    ///
    /// Returns:
    ///     numpy.ndarray: shape ``(N, 512)``, dtype uint64: row ``i`` is the table at host pfn
    ///     ``TABLE_BASE_PFN + i``, for every table handed out so far (roots included; freed tables
    ///     keep their last contents, e.g. ``FROZEN_SPTE`` after a shared teardown). The view is
    ///     live: later operations show through it, but N is fixed when it is taken. It keeps the VM
    ///     alive. S-EPT and software external tables are not in it (``sept_entries``).
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

    /// The VM's counters as a new plain dict (``tdpmmu.VM.stats`` wraps it as a ``tdpmmu.Stats``).
    ///
    /// Returns:
    ///     dict[str, int | float]: every name of ``tdpmmu._core.COUNTER_NAMES`` (KVM's counters
    ///     such as ``pf_taken`` and ``pages_4k``, the hook names, SEAMCALL leaves such as
    ///     ``"TDH.MEM.PAGE.AUG"``, RMP and guest_memfd counters) as ints, ``modeled_ns`` (float:
    ///     the modeled clock so far, the exact sum of ``cost_breakdown()``), and
    ///     ``page_table_bytes`` and ``page_table_peak_bytes`` (ints: KVM page tables, roots
    ///     included, live now and at peak, 4096 bytes each).
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

    /// Modeled nanoseconds charged so far to each ``tdpmmu.CostModel`` field.
    ///
    /// Take it before and after an operation to see what the operation cost and why.
    ///
    /// Returns:
    ///     dict[str, float]: every cost field, in field order, zeros included; the values add up
    ///     exactly to ``stats_dict()["modeled_ns"]``.
    fn cost_breakdown<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (k, v) in self.inner.cost_breakdown() {
            d.set_item(k, v)?;
        }
        Ok(d)
    }

    /// Check every invariant of the model's state (none changes; takes ``mmu_lock`` for write).
    ///
    /// Live VM: every reachable table is linked once, at its level, with its root's mirror flag and
    /// the gfn it covers; no FROZEN_SPTE at rest; non-present entries are SHADOW_NONPRESENT_VALUE
    /// or MMIO SPTEs; every leaf lies in a memslot, is no larger than its backing page, maps the
    /// right pfn (guest_memfd for private memory) and agrees with the memory attributes; the
    /// vendor's state agrees (SNP: an assigned RMP entry of the leaf's gpa and size behind every
    /// private leaf; TDX and the software mirror: the external tree has the mirror tree's tables
    /// and private leaves); root refcounts equal their holders;
    /// ``pages_4k``/``pages_2m``/``pages_1g`` and ``tdp_mmu_pages`` match the tables; no table
    /// leaked. After ``destroy()``: the teardown audit (no roots, no KVM tables, no S-EPT or
    /// external tables, no private leaves, no assigned RMP entries).
    ///
    /// Returns:
    ///     None.
    ///
    /// Raises:
    ///     InvariantError: an invariant is broken (the message says which).
    ///     VmBugged: the VM was bugged (a bugged VM is not checked).
    ///     TdpmmuError: called from one of this VM's own hook objects (hooks must not use it).
    fn check(&self, py: Python<'_>) -> PyResult<()> {
        self.run(py, |vm| vm.check())
    }

    /// Run a memstress-shaped guest workload on real threads (KVM selftests' memstress.c).
    ///
    /// vCPUs ``0..vcpus`` each run on an OS thread; the threads start together, and each makes
    /// ``pages_per_vcpu`` accesses to its slice ``[base_gfn + v * pages_per_vcpu,
    /// +pages_per_vcpu)`` (vCPU ``v``), or with ``overlap`` to ``[base_gfn, base_gfn +
    /// pages_per_vcpu)``. Each access is first translated by the "hardware" walk of the vCPU's
    /// root: if a present leaf allows it, it costs nothing (no exit); otherwise the vCPU takes the
    /// fault path exactly as ``fault()`` and retries a RETRY until the access is mapped or another
    /// outcome ends it. The threads take ``mmu_lock`` for read per 64 accesses. KVM's
    /// ``demand_paging_test`` is ``overlap=False, random_access=False, write_percent=100``.
    ///
    /// Args:
    ///     vcpus: number of vCPU threads, 1..``self.vcpus``.
    ///     pages_per_vcpu: accesses per vCPU, which is also its slice's size in 4 KiB pages, >= 1.
    ///     base_gfn: first gfn of the region, in ``0..max_gfn``; every page of the region must be
    ///         in a memslot.
    ///     overlap: every vCPU walks the same ``pages_per_vcpu`` pages (memstress's ``-o``) instead
    ///         of a slice of its own.
    ///     random_access: each access picks a page of the slice at random (pages may repeat or be
    ///         missed) instead of going in order.
    ///     write_percent: share of the accesses that are writes, 0..100 (100: every access, no
    ///         draw).
    ///     seed: seed of the per-vCPU Park-Miller generator (vCPU ``v`` uses ``seed + v``), in
    ///         ``0..2**64``.
    ///     private: True, False or None (default: by each gfn's memory attribute), as for
    ///         ``fault``.
    ///     rng_skip: draws each vCPU's generator already made before this call, in
    ///         ``0..2**64`` (default 0: start from the seed). The guest's generator runs on
    ///         across passes, as memstress's (seeded once, before its endless loop): a caller
    ///         continuing a previous call's stream passes the draws made so far
    ///         (``tdpmmu.workloads.memstress.draws_per_pass``). Advanced in O(log n).
    ///
    /// Returns:
    ///     list[dict]: one ``tdpmmu.types.VcpuRecord`` per vCPU, in vCPU order: ``wall_s`` (float:
    ///     host wall-clock seconds of the thread's loop), ``modeled_ns`` (float: modeled time
    ///     charged on that vCPU), ``faults`` (int: faults taken, RETRYs included) and ``pages``
    ///     (int: accesses made).
    ///
    /// Raises:
    ///     ConfigError: naming ``vcpus``, ``pages_per_vcpu``, ``base_gfn``, ``write_percent``,
    ///         ``seed`` or ``rng_skip`` out of range; ``base_gfn`` when a page of the region is in no memslot;
    ///         ``npages`` when the region runs past ``max_gfn`` (the engine's range check names its
    ///         own argument); ``private`` (True) on a default VM; ``vm`` on a TD that is not
    ///         finalized or after ``destroy()``.
    ///     VmBugged: the VM was bugged, or a fault bugged it (every thread stops; a bug is
    ///         reported before any other thread's error).
    ///     OutOfMemory: no page-table memory for a table.
    ///     KeyboardInterrupt: Ctrl-C on the calling (main) thread stopped every vCPU thread; what
    ///         they did stays and the VM is consistent.
    ///     TdpmmuError: a livelock: one access got RETRY 2**20 times in a row (e.g. a hook object
    ///         that always answers -16); every thread stops.
    ///     TypeError: an argument of the wrong type.
    ///     TdpmmuError: called from one of this VM's own hook objects (hooks must not use it).
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (vcpus, pages_per_vcpu, base_gfn, overlap, random_access, write_percent, seed, private = None, *, rng_skip = Int::of(0)))]
    #[pyo3(
        text_signature = "(self, /, vcpus, pages_per_vcpu, base_gfn, overlap, random_access, write_percent, seed, private=None, *, rng_skip=0)"
    )]
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
        rng_skip: Int,
    ) -> PyResult<Bound<'py, PyList>> {
        let a = self.memstress_args(
            py,
            [
                &vcpus,
                &pages_per_vcpu,
                &base_gfn,
                &write_percent,
                &seed,
                &rng_skip,
            ],
            overlap,
            random_access,
            private,
        )?;
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

    /// Run the memstress-shaped workload in virtual time: every vCPU simulated on one host thread.
    ///
    /// Models KVM's page faults at scale. vCPUs ``0..vcpus`` make the accesses ``run_memstress``
    /// describes, but as simulated threads of a deterministic discrete-event engine: each access
    /// that faults takes the real fault path on the real tables, split into steps where
    /// concurrency matters (exit, host page, ``mmu_lock``, each walk read and cmpxchg, each hook
    /// or SEAMCALL, flush, unlock, entry), and the steps of all vCPUs run in modeled-time order.
    /// Lost cmpxchg races, FROZEN entries, RETRY and SPURIOUS come from that interleaving alone;
    /// the same arguments give the same result bit for bit. Shared resources are mechanisms with
    /// ``CostModel`` parameters: ``mmu_lock`` as KVM's queued rwlock (a waiting writer blocks new
    /// readers), contended cache lines costed by CPU distance on ``machine``, the host
    /// first-touch path (VMA lock, per-CPU page lists and the zone lock, zeroing bounded by each
    /// socket's bandwidth), userfaultfd (one context per vCPU or one for all, reader threads,
    /// FIFO faults, wake-ups), IPIs, and the TDX module's try-locks (a SEAMCALL that overlaps a
    /// conflicting one gets OPERAND_BUSY). The run is one operation: it holds the VM's
    /// ``mmu_lock`` for read throughout (other threads' writers wait for it).
    ///
    /// Args:
    ///     vcpus: simulated vCPUs, 1..``self.vcpus`` (at most 4096); vCPU ``i`` runs on CPU ``i``
    ///         unless ``cpus`` pins it.
    ///     pages_per_vcpu: accesses per vCPU per pass, which is also its slice's size in 4 KiB
    ///         pages, >= 1.
    ///     base_gfn: first gfn of the region, in ``0..max_gfn``; every page of the region must be
    ///         in a memslot.
    ///     overlap: every vCPU walks the same ``pages_per_vcpu`` pages (memstress's ``-o``).
    ///     random_access: each access picks a page of the slice at random.
    ///     write_percent: share of the accesses that are writes, 0..100.
    ///     seed: seed of the per-vCPU Park-Miller generator (vCPU ``v`` uses ``seed + v``), in
    ///         ``0..2**64``.
    ///     private: True, False or None (default: by each gfn's memory attribute).
    ///     rng_skip: draws each vCPU's generator already made before this call, in ``0..2**64``
    ///         (default 0), as for ``run_memstress``; the passes of one call continue one
    ///         stream, so ``passes=2`` draws what two calls with ``rng_skip`` 0 and then
    ///         ``tdpmmu.workloads.memstress.draws_per_pass`` draw.
    ///     passes: times each vCPU walks its accesses, >= 1 (default 1: first touch only); 0 runs
    ///         until the remover is done (needs ``remove``).
    ///     mmu_lock: ``"shared"`` (default: faults take ``mmu_lock`` for read, parallel TDP MMU
    ///         faults) or ``"exclusive"`` (for write, KVM before parallel faults).
    ///     userfault: ``"none"`` (default: anonymous memory, the host allocates on first touch),
    ///         ``"MISSING"`` or ``"MINOR"`` (userfaultfd resolved by reader threads, the
    ///         selftest's ``-u``), or ``"memory_fault"`` (KVM_EXIT_MEMORY_FAULT: each vCPU thread
    ///         resolves its own fault). Shared memory only.
    ///     uffd_all: one userfaultfd for all vCPUs (the selftest's ``-a``) instead of one each.
    ///     uffd_readers: reader threads per userfaultfd (``-r``), 1..64 (default 1).
    ///     uffd_delay_ns: userspace handling delay per fault (``-d``, here in ns), >= 0.
    ///     machine: dict with ``sockets`` (1..64), ``cores_per_socket`` (1..1024),
    ///         ``threads_per_core`` (1..8) and ``mem_bw_gbps`` (per socket, > 0); missing keys
    ///         keep the default 2 x 64 x 2 CPUs, 150 GB/s.
    ///     tdx_module: ``"1.5"`` (default: AUG/SEPT.ADD take the S-EPT lock shared) or ``"1.0"``
    ///         (exclusive: concurrent private faults of one TD collide).
    ///     remove: ``(gfn, npages)``: a host thread zaps these private pages one at a time under
    ///         ``mmu_lock`` for write while the vCPUs run (TDX: BLOCK, TRACK, kick, REMOVE).
    ///     cpus: the selftests' ``-c`` pinning: vCPU ``i`` runs on CPU ``cpus[i]`` of ``machine``
    ///         (so contended cache lines and IPIs cost by those CPUs' distance); one distinct CPU
    ///         per vCPU in ``0..machine CPUs``, all or nothing (default None: CPU ``i``). The
    ///         reader and remover threads take the lowest CPUs left free.
    ///
    /// Returns:
    ///     dict: ``tdpmmu.types.VirtualRecord``: ``elapsed_ns`` (float, modeled time to the last
    ///     vCPU's end), ``vcpus`` (list of per-vCPU dicts: ``modeled_ns``, ``accesses``, ``hits``,
    ///     ``faults``, ``fixed``, ``spurious``, ``retry``, ``emulate``, ``memory_fault``,
    ///     ``write_protected``, ``local_retries``), ``breakdown`` (CostModel field or wait kind ->
    ///     modeled ns over all vCPUs; sums to the vCPUs' modeled time), ``host_breakdown`` (the
    ///     same for the reader and remover threads), ``lock_acquires``, ``lock_contended``,
    ///     ``removed``, ``remove_ns``, ``steps``, ``switches`` (engine scheduling points and
    ///     thread switches) and ``wall_s`` (host seconds of the engine loop).
    ///
    /// Raises:
    ///     ConfigError: an argument out of range, naming it (as ``run_memstress``, plus
    ///         ``passes``, ``mmu_lock``, ``userfault``, ``uffd_readers``, ``uffd_delay``,
    ///         ``machine.<key>``, ``tdx_module``, ``remove``, ``cpus``); ``clock`` on a VM with
    ///         a hooks object (those run on host threads only).
    ///     VmBugged: a fault or removal hit a KVM_BUG_ON (the run stops).
    ///     OutOfMemory: no page-table memory.
    ///     KeyboardInterrupt: Ctrl-C stopped the run; what it did stays.
    ///     TdpmmuError: a livelock (one access retried 2**20 times).
    ///     TypeError: an argument of the wrong type.
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (vcpus, pages_per_vcpu, base_gfn, overlap, random_access, write_percent, seed, private = None, *, rng_skip = Int::of(0), passes = None, mmu_lock = "shared", userfault = "none", uffd_all = false, uffd_readers = None, uffd_delay_ns = 0.0, machine = None, tdx_module = "1.5", remove = None, cpus = None))]
    #[pyo3(
        text_signature = "(self, /, vcpus, pages_per_vcpu, base_gfn, overlap, random_access, write_percent, seed, private=None, *, rng_skip=0, passes=None, mmu_lock='shared', userfault='none', uffd_all=False, uffd_readers=None, uffd_delay_ns=0.0, machine=None, tdx_module='1.5', remove=None, cpus=None)"
    )]
    fn run_virtual<'py>(
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
        rng_skip: Int,
        passes: Option<Int>,
        mmu_lock: &str,
        userfault: &str,
        uffd_all: bool,
        uffd_readers: Option<Int>,
        uffd_delay_ns: f64,
        machine: Option<Bound<'py, PyDict>>,
        tdx_module: &str,
        remove: Option<(Int, Int)>,
        cpus: Option<Vec<Int>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let ms = self.memstress_args(
            py,
            [
                &vcpus,
                &pages_per_vcpu,
                &base_gfn,
                &write_percent,
                &seed,
                &rng_skip,
            ],
            overlap,
            random_access,
            private,
        )?;
        let a = vt_args(
            py,
            self.inner.max_gfn(),
            ms,
            VtOptions {
                passes,
                mmu_lock,
                userfault,
                uffd_all,
                uffd_readers,
                uffd_delay_ns,
                machine,
                tdx_module,
                remove,
                cpus,
            },
        )?;
        let r = self.run(py, |vm| vm.run_virtual(&a))?;
        virtual_record(py, &self.inner.cfg.costs.rates(), &r)
    }

    /// Guest accesses to a list of pages on one vCPU, in order (a guest loop that is not
    /// memstress-shaped).
    ///
    /// Each access whose current mapping allows it (present, and writable for a write) is served
    /// by the "hardware" walk: no exit and no modeled time, as in ``run_memstress`` on the host
    /// clock (a write to a PML-armed page is logged). Any other access takes the fault path as an
    /// EPT violation would (``fault``), and an access that got RETRY faults again until it is
    /// served. Runs on the calling thread under one read-lock hold.
    ///
    /// Args:
    ///     gfns: 1-D numpy array of 4 KiB guest pages, each in ``0..max_gfn``, accessed in order.
    ///     write: True (every access writes; None, the default, means True), False (every access
    ///         reads), or a 1-D numpy array of bools, one per gfn.
    ///     private: True, False or None (default: by each gfn's memory attribute), as for
    ///         ``fault``.
    ///     vcpu: the vCPU making the accesses, ``0..vcpus`` (default 0).
    ///
    /// Returns:
    ///     dict: ``faults`` (int: faults taken, RETRYs included), ``accesses`` (int: the accesses
    ///     made, ``len(gfns)`` unless a KVM_BUG_ON stopped them) and ``modeled_ns`` (float:
    ///     modeled time charged on the vCPU, all of it by its faults).
    ///
    /// Raises:
    ///     ConfigError: naming ``gfns`` (a gfn beyond ``max_gfn``), ``write`` (an array of
    ///         another length), ``vcpu`` or ``private`` (True on a default VM); ``vm`` on a TD
    ///         not finalized or after ``destroy()``. Refused before any access.
    ///     VmBugged: the VM was bugged, or a fault bugged it (earlier accesses stay done).
    ///     OutOfMemory: no page-table memory for a table.
    ///     TdpmmuError: one access got RETRY 2**20 times in a row (a livelock).
    ///     TypeError: ``gfns`` not an integer array, ``write`` not a bool or bool array.
    #[pyo3(signature = (gfns, write = None, private = None, vcpu = Int::of(0)))]
    #[pyo3(text_signature = "(self, /, gfns, write=None, private=None, vcpu=0)")]
    fn access_batch<'py>(
        &self,
        py: Python<'py>,
        gfns: &Bound<'py, PyAny>,
        write: Option<Bound<'py, PyAny>>,
        private: Option<bool>,
        vcpu: Int,
    ) -> PyResult<Bound<'py, PyDict>> {
        let vcpu = self.vcpu(py, &vcpu)?;
        let gfns = gfn_vec(gfns, "gfns")?;
        let write = write.unwrap_or_else(|| PyBool::new(py, true).to_owned().into_any());
        let writes: Vec<bool> = if let Ok(b) = write.cast::<PyBool>() {
            vec![b.is_true()]
        } else if let Ok(a) = write.cast::<PyArray1<bool>>() {
            numpy::PyArrayMethods::readonly(a).as_array().to_vec()
        } else {
            return Err(PyTypeError::new_err(format!(
                "write: expected a bool or a 1-D numpy array of bools, got {}",
                write.get_type().name()?
            )));
        };
        let (faults, ns) = self.run(py, |vm| vm.access_batch(&gfns, &writes, private, vcpu))?;
        let out = PyDict::new(py);
        out.set_item("faults", faults)?;
        out.set_item("accesses", gfns.len())?;
        out.set_item("modeled_ns", ns)?;
        Ok(out)
    }

    /// ``madvise(MADV_DONTNEED)`` of the host memory behind a range of shared guest pages.
    ///
    /// Models the host freeing the pages of the memslots' userspace mapping: the MMU notifier
    /// unmaps the range as ``mmu_notifier_invalidate`` does (``kvm_unmap_gfn_range`` with the
    /// SHARED filter; ``spte_update_ns`` per entry zapped, one remote TLB flush if a valid root
    /// lost a leaf), and the host pages are freed, so the next guest touch of each allocates and
    /// zeroes it again (``host_page_alloc_ns`` + ``host_zero_4k_ns``, ``host_pages_allocated``).
    /// Freeing itself is not charged. Only memory without guest_memfd: guest_memfd pages are
    /// freed with ``punch_hole``.
    ///
    /// Args:
    ///     gfn: first 4 KiB guest page, in ``0..max_gfn``.
    ///     npages: number of 4 KiB pages, >= 1. Every page must be in a memslot without
    ///         guest_memfd, and the range must start and end on each slot's backing-page
    ///         boundary (a 2 MiB or 1 GiB hugetlb page is freed whole).
    ///
    /// Returns:
    ///     int: the number of present leaves zapped.
    ///
    /// Raises:
    ///     ConfigError: naming ``gfn`` or ``npages`` (beyond ``max_gfn``, not in a memslot, in a
    ///         guest_memfd slot, not on a backing-page boundary); ``vm`` after ``destroy()``.
    ///         The VM is unchanged.
    ///     VmBugged: the VM was bugged, or a hook failed during the zap.
    ///     TypeError: an argument of the wrong type.
    ///     TdpmmuError: called from one of this VM's own hook objects (hooks must not use it).
    fn madvise_dontneed(&self, py: Python<'_>, gfn: Int, npages: Int) -> PyResult<u64> {
        let (gfn, npages) = self.range(py, &gfn, &npages)?;
        self.run(py, |vm| vm.madvise_dontneed(gfn, npages))
    }

    /// ``mprotect`` of the host mapping behind a range of guest pages.
    ///
    /// Models a protection change of the memslots' userspace mapping: the kernel notifies the
    /// MMU notifier for it, so the range's shared SPTEs are zapped (as
    /// ``mmu_notifier_invalidate``). While read-only (``writable=False``), a guest write fault
    /// there cannot get a writable host page (``hva_to_pfn`` fails, KVM_PFN_ERR_FAULT): KVM
    /// prepares a KVM_EXIT_MEMORY_FAULT exit and KVM_RUN returns -EFAULT; the fault returns
    /// ``Ret.MEMORY_FAULT`` (``pf_memory_fault``), nothing is mapped and the write does not
    /// happen. A read fault maps the page without W, MMU-writable and host-writable, so a later
    /// write faults (and fails) again. ``writable=True`` restores write access (and
    /// invalidates again). Private (guest_memfd) accesses do not use the host mapping and are
    /// not affected.
    ///
    /// Args:
    ///     gfn: first 4 KiB guest page, in ``0..max_gfn``.
    ///     npages: number of 4 KiB pages, >= 1. Every page must be in a memslot, and the range
    ///         must start and end on each slot's backing-page boundary.
    ///     writable: False for ``PROT_READ``, True for ``PROT_READ|PROT_WRITE``.
    ///
    /// Returns:
    ///     int: the number of present leaves zapped.
    ///
    /// Raises:
    ///     ConfigError: naming ``gfn`` or ``npages`` (beyond ``max_gfn``, not in a memslot, not
    ///         on a backing-page boundary); ``vm`` after ``destroy()``. The VM is unchanged.
    ///     OutOfMemory: no host memory for a slot's read-only bitmap (1 bit per backing page).
    ///     VmBugged: the VM was bugged, or a hook failed during the zap.
    ///     TypeError: an argument of the wrong type.
    ///     TdpmmuError: called from one of this VM's own hook objects (hooks must not use it).
    fn mprotect(&self, py: Python<'_>, gfn: Int, npages: Int, writable: bool) -> PyResult<u64> {
        let (gfn, npages) = self.range(py, &gfn, &npages)?;
        self.run(py, |vm| vm.mprotect(gfn, npages, writable))
    }

    /// Explicit per-vCPU lists of guest accesses, all vCPUs at once in virtual time.
    ///
    /// Models vCPUs whose guest loops are not memstress-shaped (e.g. ``kvm_page_table_test``'s
    /// stages, ``mmu_stress_test``'s writes): vCPU ``i`` accesses ``gfns_per_vcpu[i]`` in order.
    /// Everything else is ``run_virtual``'s: the same simulated vCPU (the "hardware" walk, then
    /// on a miss the real fault path with its exit, host page, ``mmu_lock``, walk steps and
    /// entry), the same engine and shared resources, the vCPUs interleaved in modeled-time order
    /// (so they wait for ``mmu_lock`` and host memory, and race on first touches: a vCPU that
    /// finds the page another just mapped gets SPURIOUS), deterministic bit for bit. Each access
    /// attempt costs the guest ``guest_access_ns``. A write to a shared page the host mapped
    /// read-only (``mprotect``) ends in a memory-fault exit: KVM_RUN returns -EFAULT, which is
    /// counted (``memory_fault``) and charged ``userspace_exit_ns``; the access ends without
    /// its store (the selftest's host skips it) and the vCPU goes on with its list. The lists
    /// are copied before the run.
    ///
    /// Args:
    ///     gfns_per_vcpu: one 1-D numpy integer array per vCPU (a list; vCPU ``i`` makes the
    ///         accesses of item ``i``), 1..``self.vcpus`` of them; every gfn in ``0..max_gfn``
    ///         and in a memslot. An empty array is a vCPU that makes no access.
    ///     writes_per_vcpu: None (default) or True: every access writes; False: every access
    ///         reads; or a list with one item per vCPU, each a bool or a 1-D numpy bool array
    ///         with one entry per gfn of that vCPU.
    ///     private: True, False or None (default: by each gfn's memory attribute), as for
    ///         ``fault``.
    ///     passes: times each vCPU walks its list, >= 1 (default 1); 0 runs until the remover
    ///         is done (needs ``remove``).
    ///     mmu_lock: ``"shared"`` (default) or ``"exclusive"``, as for ``run_virtual``.
    ///     userfault: ``"none"`` (default), ``"MISSING"``, ``"MINOR"`` or ``"memory_fault"``,
    ///         as for ``run_virtual``.
    ///     uffd_all: one userfaultfd for all vCPUs, as for ``run_virtual``.
    ///     uffd_readers: reader threads per userfaultfd, 1..64 (default 1).
    ///     uffd_delay_ns: userspace handling delay per fault, ns, >= 0.
    ///     machine: the modeled host, as for ``run_virtual``.
    ///     tdx_module: ``"1.5"`` (default) or ``"1.0"``, as for ``run_virtual``.
    ///     remove: ``(gfn, npages)`` of private pages a host thread zaps while the vCPUs run, as
    ///         for ``run_virtual``.
    ///     cpus: vCPU ``i`` on CPU ``cpus[i]``, one distinct CPU per vCPU, as for
    ///         ``run_virtual`` (default None: CPU ``i``).
    ///
    /// Returns:
    ///     dict: ``tdpmmu.types.VirtualRecord``, as ``run_virtual`` returns it (per vCPU
    ///     ``accesses`` is its list's length times the passes unless the run stopped early).
    ///
    /// Raises:
    ///     ConfigError: naming ``gfns_per_vcpu`` (no list, more lists than vCPUs, a gfn beyond
    ///         ``max_gfn`` or in no memslot), ``writes_per_vcpu`` (a list of another length, an
    ///         array of another length than its gfns), ``private`` (True on a default VM), or an
    ///         option as ``run_virtual`` does; an access whose kind does not match its page's
    ///         attribute (KVM_EXIT_MEMORY_FAULT that no handler converts: the run stops);
    ///         ``clock`` on a VM with a hooks object. Refused before any access otherwise.
    ///     VmBugged: a fault or removal hit a KVM_BUG_ON (the run stops).
    ///     OutOfMemory: no page-table memory.
    ///     KeyboardInterrupt: Ctrl-C stopped the run; what it did stays.
    ///     TdpmmuError: a livelock (one access retried 2**20 times).
    ///     TypeError: an argument of the wrong type (an array not of integers or not of bools).
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (gfns_per_vcpu, writes_per_vcpu = None, private = None, *, passes = None, mmu_lock = "shared", userfault = "none", uffd_all = false, uffd_readers = None, uffd_delay_ns = 0.0, machine = None, tdx_module = "1.5", remove = None, cpus = None))]
    fn run_virtual_accesses<'py>(
        &self,
        py: Python<'py>,
        gfns_per_vcpu: &Bound<'py, PyAny>,
        writes_per_vcpu: Option<Bound<'py, PyAny>>,
        private: Option<bool>,
        passes: Option<Int>,
        mmu_lock: &str,
        userfault: &str,
        uffd_all: bool,
        uffd_readers: Option<Int>,
        uffd_delay_ns: f64,
        machine: Option<Bound<'py, PyDict>>,
        tdx_module: &str,
        remove: Option<(Int, Int)>,
        cpus: Option<Vec<Int>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        use core::vtime::{AccessList, VtArgs};
        // Copied here, with the GIL held: the run reads only its own vectors.
        let mut lists: Vec<AccessList> = Vec::new();
        for (v, item) in gfns_per_vcpu
            .try_iter()
            .map_err(|_| {
                PyTypeError::new_err(
                    "gfns_per_vcpu: expected a list of 1-D numpy integer arrays, one per vCPU",
                )
            })?
            .enumerate()
        {
            lists.push(AccessList {
                gfns: gfn_vec(&item?, &format!("gfns_per_vcpu[{v}]"))?,
                writes: Vec::new(),
            });
        }
        let one = |w: &Bound<'py, PyAny>, name: &str| -> PyResult<Vec<bool>> {
            if let Ok(b) = w.cast::<PyBool>() {
                Ok(vec![b.is_true()])
            } else if let Ok(a) = w.cast::<PyArray1<bool>>() {
                Ok(numpy::PyArrayMethods::readonly(a).as_array().to_vec())
            } else {
                Err(PyTypeError::new_err(format!(
                    "{name}: expected a bool or a 1-D numpy array of bools, got {}",
                    w.get_type().name()?
                )))
            }
        };
        match writes_per_vcpu {
            None => lists.iter_mut().for_each(|l| l.writes = vec![true]),
            Some(w) if w.cast::<PyBool>().is_ok() => {
                let w = one(&w, "writes_per_vcpu")?;
                lists.iter_mut().for_each(|l| l.writes = w.clone());
            }
            Some(w) => {
                let items: Vec<Bound<'py, PyAny>> = w
                    .try_iter()
                    .map_err(|_| {
                        PyTypeError::new_err(
                            "writes_per_vcpu: expected a bool or a list with one bool or bool array per vCPU",
                        )
                    })?
                    .collect::<PyResult<_>>()?;
                if items.len() != lists.len() {
                    return Err(config_err(
                        py,
                        format!(
                            "writes_per_vcpu: has {} items for {} vCPUs (gfns_per_vcpu); give one per vCPU",
                            items.len(),
                            lists.len()
                        ),
                    ));
                }
                for (v, (l, w)) in lists.iter_mut().zip(items.iter()).enumerate() {
                    l.writes = one(w, &format!("writes_per_vcpu[{v}]"))?;
                }
            }
        }
        let a = vt_args(
            py,
            self.inner.max_gfn(),
            VtArgs::default().ms,
            VtOptions {
                passes,
                mmu_lock,
                userfault,
                uffd_all,
                uffd_readers,
                uffd_delay_ns,
                machine,
                tdx_module,
                remove,
                cpus,
            },
        )?;
        let r = self.run(py, |vm| vm.run_virtual_accesses(&lists, private, &a))?;
        virtual_record(py, &self.inner.cfg.costs.rates(), &r)
    }

    /// Test hook: panic inside the engine to prove a panic surfaces as ``tdpmmu.TdpmmuError``.
    fn _inject_panic(&self, py: Python<'_>) -> PyResult<()> {
        call_detached(py, || -> core::Result<()> {
            panic!("injected panic (test hook)")
        })
    }
}

impl Vm {
    /// The memstress workload's arguments, checked: `ints` are vcpus, pages_per_vcpu,
    /// base_gfn, write_percent and seed.
    fn memstress_args(
        &self,
        py: Python<'_>,
        ints: [&Int; 6],
        overlap: bool,
        random_access: bool,
        private: Option<bool>,
    ) -> PyResult<MemstressArgs> {
        let [
            vcpus,
            pages_per_vcpu,
            base_gfn,
            write_percent,
            seed,
            rng_skip,
        ] = ints;
        let max_gfn = self.inner.max_gfn();
        Ok(MemstressArgs {
            vcpus: count_arg(py, "vcpus", vcpus, self.inner.cfg.vcpus as u64)? as u32,
            pages_per_vcpu: count_arg(py, "pages_per_vcpu", pages_per_vcpu, max_gfn)?,
            base_gfn: gfn_arg(py, "base_gfn", base_gfn, max_gfn)?,
            overlap,
            random_access,
            write_percent: in_range(py, "write_percent", write_percent, 101)? as u32,
            seed: in_range(py, "seed", seed, 1 << 64)?,
            rng_skip: in_range(py, "rng_skip", rng_skip, 1 << 64)?,
            private,
        })
    }

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

/// The options `run_virtual` and `run_virtual_accesses` share (their Python arguments).
struct VtOptions<'a, 'py> {
    passes: Option<Int>,
    mmu_lock: &'a str,
    userfault: &'a str,
    uffd_all: bool,
    uffd_readers: Option<Int>,
    uffd_delay_ns: f64,
    machine: Option<Bound<'py, PyDict>>,
    tdx_module: &'a str,
    remove: Option<(Int, Int)>,
    cpus: Option<Vec<Int>>,
}

/// A virtual-time run's arguments from its Python options, checked; `ms` is the memstress
/// shape (unused by access-list runs).
fn vt_args<'py>(
    py: Python<'py>,
    max_gfn: u64,
    ms: MemstressArgs,
    o: VtOptions<'_, 'py>,
) -> PyResult<core::vtime::VtArgs> {
    use core::vtime::{Machine, Userfault, VtArgs};
    let VtOptions {
        passes,
        mmu_lock,
        userfault,
        uffd_all,
        uffd_readers,
        uffd_delay_ns,
        machine,
        tdx_module,
        remove,
        cpus,
    } = o;
    let cpus = match cpus {
        None => Vec::new(),
        Some(l) => l
            .iter()
            .map(|c| in_range(py, "cpus", c, 1 << 31).map(|c| c as u32))
            .collect::<PyResult<Vec<u32>>>()?,
    };
    let exclusive = match mmu_lock {
        "shared" => false,
        "exclusive" => true,
        _ => {
            return Err(config_err(
                py,
                format!("mmu_lock: must be \"shared\" or \"exclusive\", got {mmu_lock:?}"),
            ));
        }
    };
    let Some(uf) = Userfault::parse(userfault) else {
        return Err(config_err(
            py,
            format!(
                "userfault: must be one of {}, got {userfault:?}",
                Userfault::NAMES.join(", ")
            ),
        ));
    };
    let tdx_1_0 = match tdx_module {
        "1.5" => false,
        "1.0" => true,
        _ => {
            return Err(config_err(
                py,
                format!("tdx_module: must be \"1.5\" or \"1.0\", got {tdx_module:?}"),
            ));
        }
    };
    let mut m = Machine::default();
    if let Some(d) = machine {
        for (k, v) in d.iter() {
            let k: String = k.extract()?;
            let int = |v: &Bound<'py, PyAny>| -> PyResult<u32> {
                let i: Int = v.extract()?;
                Ok(in_range(py, &format!("machine.{k}"), &i, 1 << 31)? as u32)
            };
            match k.as_str() {
                "sockets" => m.sockets = int(&v)?,
                "cores_per_socket" => m.cores_per_socket = int(&v)?,
                "threads_per_core" => m.threads_per_core = int(&v)?,
                "mem_bw_gbps" => m.mem_bw_gbps = v.extract()?,
                _ => {
                    return Err(config_err(
                        py,
                        format!(
                            "machine: unknown key {k:?}; allowed: sockets, cores_per_socket, \
                             threads_per_core, mem_bw_gbps"
                        ),
                    ));
                }
            }
        }
    }
    let remove = match remove {
        None => None,
        Some((g, n)) => Some((
            gfn_arg(py, "remove", &g, max_gfn)?,
            count_arg(py, "remove", &n, max_gfn)?,
        )),
    };
    Ok(VtArgs {
        ms,
        passes: match passes {
            Some(p) => in_range(py, "passes", &p, 1 << 32)? as u32,
            None => 1,
        },
        exclusive,
        userfault: uf,
        uffd_all,
        uffd_readers: match uffd_readers {
            Some(r) => in_range(py, "uffd_readers", &r, 1 << 32)? as u32,
            None => 1,
        },
        uffd_delay_ns,
        machine: m,
        tdx_module_1_0: tdx_1_0,
        remove,
        cpus,
    })
}

/// A virtual-time run's outcome as ``tdpmmu.types.VirtualRecord``.
fn virtual_record<'py>(
    py: Python<'py>,
    rates: &[f64],
    r: &core::vtime::VtResult,
) -> PyResult<Bound<'py, PyDict>> {
    let breakdown = |units: &[i64], waits: &[f64]| -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for ((n, u), rate) in core::COST_FIELDS.iter().zip(units).zip(rates.iter()) {
            d.set_item(*n, *u as f64 * rate)?;
        }
        for (n, w) in core::cost::WAIT_FIELDS.iter().zip(waits) {
            d.set_item(*n, *w)?;
        }
        Ok(d)
    };
    let out = PyDict::new(py);
    out.set_item("elapsed_ns", r.elapsed_ns)?;
    let vl = PyList::empty(py);
    for v in &r.vcpus {
        let d = PyDict::new(py);
        d.set_item("modeled_ns", v.modeled_ns)?;
        d.set_item("accesses", v.accesses)?;
        d.set_item("hits", v.hits)?;
        d.set_item("faults", v.faults)?;
        d.set_item("fixed", v.fixed)?;
        d.set_item("spurious", v.spurious)?;
        d.set_item("retry", v.retry)?;
        d.set_item("emulate", v.emulate)?;
        d.set_item("memory_fault", v.memory_fault)?;
        d.set_item("write_protected", v.write_protected)?;
        d.set_item("local_retries", v.local_retries)?;
        vl.append(d)?;
    }
    out.set_item("vcpus", vl)?;
    out.set_item("breakdown", breakdown(&r.units, &r.waits)?)?;
    out.set_item("host_breakdown", breakdown(&r.host_units, &r.host_waits)?)?;
    out.set_item("lock_acquires", r.lock_acquires)?;
    out.set_item("lock_contended", r.lock_contended)?;
    out.set_item("removed", r.removed)?;
    out.set_item("remove_ns", r.remove_ns)?;
    out.set_item("steps", r.steps)?;
    out.set_item("switches", r.switches)?;
    out.set_item("wall_s", r.wall_s)?;
    Ok(out)
}
