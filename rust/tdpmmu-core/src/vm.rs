//! One VM and its public operations — the ioctls and guest events a user drives (x86.c,
//! kvm_main.c). Construction turns the typed configuration into a vendor backend, a hook
//! dispatch site and a TDP MMU; every operation validates its arguments, then runs in the `op`
//! bracket and calls the MMU, guest_memfd or the vendor.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::arena::Arena;
use crate::attrs::PrivateRanges;
use crate::check;
use crate::config::{Design, Variant, VmConfig, VmType};
use crate::cost::{COST_FIELDS, Cost, WAIT_FIELDS};
use crate::error::{Error, Result, bad_arg};
use crate::gmem;
use crate::hooks::{Dispatch, ExternalOps};
use crate::memslot::{Memslot, Memslots, backing_level};
use crate::memstress::{self, MemstressArgs, VcpuResult};
use crate::mmu::Mmu;
use crate::op::{self, MmuState, Ops};
use crate::page_fault::{FaultResult, Ret};
use crate::spte::{self, SHADOW_NONPRESENT_VALUE, pages_per_level};
use crate::stats::{C, COUNTER_NAMES, Event};
use crate::tdp_mmu::{Root, TdpMmu, TdpShape};

/// The backing level of memslot `id` (1 if it is gone).
fn slot_level_of(st: &MmuState, id: u32) -> u8 {
    st.memslots.by_id(id).map_or(1, |s| s.level)
}
use crate::vendor::Vendor;
use crate::vendor::plain::Plain;
use crate::vendor::rmp;
use crate::vendor::sev::Snp;
use crate::vendor::sw_mirror::SwMirror;
use crate::vendor::tdx::Tdx;
use crate::vendor::tdx_module::TdxModule;

pub const MAX_VCPUS: u32 = 4096;

/// Page tables needed to map `pages` 4K pages in one root of `levels` levels, root included.
pub fn tables_needed(pages: u64, levels: u8) -> u64 {
    let mut n = 1; // root
    let mut covered = pages;
    for _ in 1..levels {
        covered = covered.div_ceil(512);
        n += covered;
    }
    n
}

fn host_ram_bytes() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let (pages, size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    if pages <= 0 || size <= 0 {
        1 << 34
    } else {
        pages as u64 * size as u64
    }
}

/// Bytes a memslot can commit: the page tables of every tree that can map it (fully mapped at
/// 4K: the direct tree, or a mirror tree plus the external tree that shadows it), its
/// first-touch bitmaps, and the vendor's per-page metadata of its guest_memfd (SNP's RMP).
pub fn slot_bytes(npages: u64, level: u8, levels: u8, trees: u64, gmem_meta: u64) -> u64 {
    let tables = tables_needed(npages, levels)
        .saturating_mul(4096)
        .saturating_mul(trees);
    let bitmap = (npages / pages_per_level(level)).div_ceil(64) * 8;
    let bitmaps = if gmem_meta > 0 { 2 * bitmap } else { bitmap };
    tables.saturating_add(bitmaps).saturating_add(gmem_meta)
}

/// A memslot as users see it: (id, gfn, npages, backing bytes, has guest_memfd, host pfn).
pub type MemslotInfo = (u32, u64, u64, u64, bool, u64);

pub struct Vm {
    pub cfg: VmConfig,
    pub variant: &'static Variant,
    pub design: Design,
    pub mmu: Mmu,
    pub ops: Ops,
    /// The hooks go to a caller's backend (e.g. a Python object), not to the vendor's model.
    pub user_hooks: bool,
    /// Bytes of page tables and metadata the VM may commit.
    pub budget: u64,
}

impl Vm {
    pub fn new(cfg: VmConfig) -> Result<Self> {
        Self::build(cfg, None)
    }

    /// A VM whose mirror-table hooks go to a caller-supplied backend (e.g. a Python object)
    /// instead of the vendor's model. Only for VM types with a mirror root; the hooks fire as
    /// under the `mirror` design.
    pub fn with_hooks(mut cfg: VmConfig, hooks: Arc<dyn ExternalOps>) -> Result<Self> {
        cfg.hooks = Some(Design::Mirror);
        let v = crate::config::variant(cfg.vm_type, cfg.mirror)?;
        if !v.mirror_root {
            return Err(bad_arg(
                "hooks",
                format!(
                    "a hook object needs a VM with a mirror root (tdx, or sw_protected with mirror=True), not {:?}",
                    cfg.vm_type.name()
                ),
            ));
        }
        Self::build(cfg, Some(hooks))
    }

    fn build(cfg: VmConfig, user_hooks: Option<Arc<dyn ExternalOps>>) -> Result<Self> {
        if cfg.levels != 4 && cfg.levels != 5 {
            return Err(bad_arg(
                "levels",
                format!("must be 4 or 5, got {}", cfg.levels),
            ));
        }
        if cfg.vcpus == 0 || cfg.vcpus > MAX_VCPUS {
            return Err(bad_arg(
                "vcpus",
                format!("must be in 1..={MAX_VCPUS}, got {}", cfg.vcpus),
            ));
        }
        let level = backing_level(cfg.backing, "backing")?;
        let (variant, design) = cfg.resolve()?;
        let shared_bit = if cfg.levels == 4 {
            1u64 << 35
        } else {
            1u64 << 39
        };
        let gfn_direct_bits = if variant.mirror_root { shared_bit } else { 0 };
        // A guest with a shared bit has the half of its guest-physical space below it.
        let max_gfn: u64 = if gfn_direct_bits != 0 {
            gfn_direct_bits
        } else if cfg.levels == 4 {
            1 << 36
        } else {
            1 << 40
        };
        if cfg.memory == 0 || !cfg.memory.is_multiple_of(4096) {
            return Err(bad_arg(
                "memory",
                format!(
                    "must be a positive multiple of 4096 bytes, got {}",
                    cfg.memory
                ),
            ));
        }
        if !cfg.memory.is_multiple_of(cfg.backing) {
            return Err(bad_arg(
                "memory",
                format!(
                    "must be a multiple of the backing page size {} bytes, got {}",
                    cfg.backing, cfg.memory
                ),
            ));
        }
        let pages = cfg.memory / 4096;
        if pages > max_gfn {
            return Err(bad_arg(
                "memory",
                format!(
                    "{} bytes exceeds the {}-level guest-physical limit of {} bytes",
                    cfg.memory,
                    cfg.levels,
                    max_gfn * 4096
                ),
            ));
        }
        let ram = host_ram_bytes();
        let budget = cfg.budget.unwrap_or(ram);
        let trees = if variant.mirror_root { 2 } else { 1 };
        // Vendor metadata of slot 0's guest_memfd (SNP's RMP), as the vendor will allocate it.
        let gmem_meta = if cfg.vm_type == VmType::Snp {
            crate::vendor::rmp::Rmp::bytes_for(pages)
        } else {
            u64::from(cfg.vm_type.has_private_mem())
        };
        let need = slot_bytes(pages, level, cfg.levels, trees, gmem_meta);
        if need > budget {
            return Err(Error::OutOfMemory(format!(
                "memory: {} bytes of guest memory needs {need} bytes of page tables ({} tree{}, fully mapped at 4K) and metadata, more than the budget of {budget} bytes{}",
                cfg.memory,
                trees,
                if trees > 1 { "s" } else { "" },
                if cfg.budget.is_none() {
                    " (this machine's RAM)"
                } else {
                    ""
                }
            )));
        }
        // Reserve address space for every table the host could hold; pages are only backed when used.
        let capacity = (ram / 4096).min(u32::MAX as u64 - 1) as usize;
        let arena = Arena::new(capacity)?;
        let has_private_mem = cfg.vm_type.has_private_mem();
        let mut memslots = Memslots::new();
        memslots.add(0, pages, level, has_private_mem)?;
        memslots.generation = 0;
        let mut attrs = PrivateRanges::default();
        if has_private_mem {
            // As a VMM does for a confidential guest: all initial memory is private.
            attrs.set(0, pages, true);
        }

        let module_hooked = user_hooks.is_none();
        let (vendor, model_hooks): (Box<dyn Vendor>, Option<Arc<dyn ExternalOps>>) =
            match (cfg.vm_type, variant.mirror) {
                (VmType::Tdx, _) => {
                    let t = Tdx::new(
                        cfg.levels,
                        cfg.vcpus,
                        capacity,
                        cfg.tdx.clone(),
                        cfg.seed,
                        module_hooked,
                    )?;
                    let h = t.hooks();
                    (Box::new(t), Some(h))
                }
                (VmType::SwProtected, true) => {
                    let s = SwMirror::new(
                        cfg.levels,
                        cfg.vcpus,
                        capacity,
                        cfg.tdx.clone(),
                        cfg.seed,
                        module_hooked,
                    )?;
                    let h = s.hooks();
                    (Box::new(s), Some(h))
                }
                (VmType::Snp, _) => {
                    let s = Snp::new(design, cfg.folio_level)?;
                    let h = s.private_hooks();
                    (Box::new(s), Some(h))
                }
                (VmType::Default | VmType::SwProtected, _) => (
                    Box::new(Plain {
                        vm_type: cfg.vm_type,
                    }),
                    None,
                ),
            };
        let ext = match design {
            Design::None | Design::Gmem => None,
            Design::Mirror | Design::Private => user_hooks.or(model_hooks),
        };
        let slot0 = &memslots.slots[0];
        if slot0.gmem {
            vendor.gmem_bind(slot0.gmem_pfn, slot0.npages)?;
        }
        let shape = TdpShape {
            levels: cfg.levels,
            vcpus: cfg.vcpus,
            has_mirror: variant.mirror_root,
            gfn_direct_bits,
            max_gfn,
            nx_huge_pages: cfg.nx_huge_pages,
            ad_bits: cfg.ad_bits,
        };
        let tdp = TdpMmu::new(arena, shape, Dispatch::new(design, cfg.tdx.interface, ext));
        let mmu = Mmu::new(tdp, vendor, has_private_mem, cfg.folio_level);
        let ops = Ops::new(
            MmuState {
                memslots,
                attrs,
                committed: need,
            },
            cfg.costs,
            cfg.trace,
            cfg.vcpus,
        );
        Ok(Self {
            variant,
            design,
            mmu,
            ops,
            user_hooks: !module_hooked,
            budget,
            cfg,
        })
    }

    // ----- properties --------------------------------------------------------------------

    pub fn levels(&self) -> u8 {
        self.cfg.levels
    }
    /// Exclusive bound of guest gfns (on a VM with a mirror root: the shared bit).
    pub fn max_gfn(&self) -> u64 {
        self.mmu.tdp.shape.max_gfn
    }
    /// The shared (direct) alias bit as a gfn bit value; 0 if the VM has none.
    pub fn shared_bit(&self) -> u64 {
        self.mmu.tdp.shape.gfn_direct_bits
    }
    pub fn has_mirror(&self) -> bool {
        self.mmu.tdp.shape.has_mirror
    }
    pub fn bugged(&self) -> bool {
        self.ops.bugged()
    }
    pub fn destroyed(&self) -> bool {
        self.ops.destroyed()
    }
    /// TDX: the TD was finalized (is runnable).
    pub fn finalized(&self) -> bool {
        self.mmu.vendor.finalized()
    }
    pub fn arena(&self) -> &Arena {
        &self.mmu.tdp.arena
    }
    pub fn counter(&self, c: C) -> i64 {
        self.ops.totals.get(c)
    }
    pub fn events(&self) -> Vec<Event> {
        self.ops.totals.events()
    }

    /// Counters by KVM name, the modeled clock (the ledger's exact sum) and memory gauges.
    pub fn stats(&self) -> Vec<(&'static str, f64)> {
        let t = self.ops.totals.snapshot();
        let mut v: Vec<(&'static str, f64)> = COUNTER_NAMES
            .iter()
            .zip(t.c.iter())
            .map(|(n, c)| (*n, *c as f64))
            .collect();
        v.push(("modeled_ns", t.ledger_ns()));
        v.push(("page_table_bytes", (self.arena().live() * 4096) as f64));
        v.push(("page_table_peak_bytes", (self.arena().peak() * 4096) as f64));
        v
    }

    /// Modeled nanoseconds charged to each `CostModel` field, in field order; the values add up
    /// (in this order) to exactly `modeled_ns` of `stats()`.
    pub fn cost_breakdown(&self) -> Vec<(&'static str, f64)> {
        let t = self.ops.totals.snapshot();
        let rates = self.cfg.costs.rates();
        COST_FIELDS
            .iter()
            .zip(t.units.iter().zip(rates.iter()))
            .map(|(n, (u, r))| (*n, *u as f64 * r))
            .chain(
                WAIT_FIELDS
                    .iter()
                    .zip(t.waits.iter())
                    .map(|(n, w)| (*n, *w)),
            )
            .collect()
    }

    pub fn roots_snapshot(&self) -> Vec<Root> {
        self.mmu.tdp.roots_snapshot()
    }

    /// The newest valid root of the given kind (what `walk`/`spte` inspect).
    pub fn current_root(&self, mirror: bool) -> Option<u32> {
        self.mmu.tdp.current_root(mirror)
    }

    pub fn memslots(&self) -> Vec<MemslotInfo> {
        let st = self.ops.mmu_lock.read();
        st.memslots
            .slots
            .iter()
            .map(|s| (s.id, s.gfn, s.npages, s.backing_bytes(), s.gmem, s.host_pfn))
            .collect()
    }

    pub fn memslot_generation(&self) -> u64 {
        self.ops.mmu_lock.read().memslots.generation
    }

    /// What a slot commits against the budget (`slot_bytes` with this VM's trees and vendor).
    fn slot_cost(&self, npages: u64, level: u8, gmem: bool) -> u64 {
        let trees = if self.has_mirror() { 2 } else { 1 };
        let meta = if gmem {
            self.mmu.vendor.gmem_metadata_bytes(npages)
        } else {
            0
        };
        // A gmem slot always has a second first-touch bitmap, even without vendor metadata.
        slot_bytes(
            npages,
            level,
            self.cfg.levels,
            trees,
            meta.max(u64::from(gmem)),
        )
    }

    /// Bytes of the budget committed so far (page tables of every tree, fully mapped, and
    /// metadata of every memslot).
    pub fn committed_bytes(&self) -> u64 {
        self.ops.mmu_lock.read().committed
    }

    // ----- argument checks ---------------------------------------------------------------

    pub fn check_gfn(&self, gfn: u64, arg: &str) -> Result<()> {
        if gfn >= self.max_gfn() {
            return Err(bad_arg(
                arg,
                format!(
                    "gfn {gfn:#x} is beyond the guest-physical limit; allowed 0..{:#x}",
                    self.max_gfn()
                ),
            ));
        }
        Ok(())
    }

    pub fn check_range(&self, gfn: u64, npages: u64) -> Result<()> {
        self.check_gfn(gfn, "gfn")?;
        if npages == 0 {
            return Err(bad_arg("npages", "must be > 0"));
        }
        if gfn.checked_add(npages).is_none_or(|e| e > self.max_gfn()) {
            return Err(bad_arg(
                "npages",
                format!(
                    "range [{gfn:#x}, +{npages:#x}) runs past the guest-physical limit {:#x}",
                    self.max_gfn()
                ),
            ));
        }
        Ok(())
    }

    pub fn check_vcpu(&self, vcpu: u32) -> Result<()> {
        if vcpu >= self.cfg.vcpus {
            return Err(bad_arg(
                "vcpu",
                format!("must be in 0..{}, got {vcpu}", self.cfg.vcpus),
            ));
        }
        Ok(())
    }

    pub fn check_private(&self, private: Option<bool>) -> Result<Option<bool>> {
        if private == Some(true) && !self.mmu.has_private_mem {
            return Err(bad_arg(
                "private",
                "a default VM has no private memory; use private=False or None",
            ));
        }
        Ok(private)
    }

    fn check_confidential(&self, what: &str) -> Result<()> {
        if !self.mmu.has_private_mem {
            return Err(bad_arg(
                what,
                format!("a {} VM has no private memory", self.cfg.vm_type.name()),
            ));
        }
        Ok(())
    }

    /// Every gfn of [gfn, end) must be in a memslot (with guest_memfd if `need_gmem`).
    fn check_covered(st: &MmuState, gfn: u64, end: u64, need_gmem: bool) -> Result<()> {
        let mut g = gfn;
        while g < end {
            match st.memslots.find(g) {
                Some(s) if !need_gmem || s.gmem => g = s.end(),
                Some(s) => {
                    return Err(bad_arg(
                        "gfn",
                        format!("memslot {} holding gfn {g:#x} has no guest_memfd", s.id),
                    ));
                }
                None => {
                    return Err(bad_arg(
                        "gfn",
                        format!("gfn {g:#x} of [{gfn:#x}, {end:#x}) is not in any memslot"),
                    ));
                }
            }
        }
        Ok(())
    }

    // ----- faults ------------------------------------------------------------------------

    /// One EPT-violation-style fault, as the guest would take it.
    pub fn fault(
        &self,
        gfn: u64,
        private: Option<bool>,
        write: bool,
        exec: bool,
        vcpu: u32,
    ) -> Result<FaultResult> {
        self.ops.ensure_alive()?;
        self.check_gfn(gfn, "gfn")?;
        self.check_vcpu(vcpu)?;
        let private = self.check_private(private)?;
        let _vcpu = self.ops.vcpu(vcpu as usize);
        self.ops.read(self.arena(), |st, ctx| {
            self.mmu
                .page_fault(st, ctx, gfn, private, write, exec, vcpu as usize, false)
        })
    }

    /// Faults for a batch of gfns on one vCPU, one read-lock hold per batch; `out` receives
    /// each fault's `Ret` code.
    pub fn fault_batch(
        &self,
        gfns: &[u64],
        private: Option<bool>,
        write: bool,
        exec: bool,
        vcpu: u32,
        out: &mut [u8],
    ) -> Result<()> {
        self.ops.ensure_alive()?;
        self.check_vcpu(vcpu)?;
        let private = self.check_private(private)?;
        if let Some((i, g)) = gfns.iter().enumerate().find(|(_, g)| **g >= self.max_gfn()) {
            return Err(bad_arg(
                "gfns",
                format!(
                    "gfns[{i}] = {g:#x} is beyond the guest-physical limit; allowed 0..{:#x}",
                    self.max_gfn()
                ),
            ));
        }
        if gfns.len() != out.len() {
            return Err(bad_arg(
                "out",
                format!("has {} entries for {} gfns", out.len(), gfns.len()),
            ));
        }
        let _vcpu = self.ops.vcpu(vcpu as usize);
        self.ops.read(self.arena(), |st, ctx| {
            for (i, (g, o)) in gfns.iter().zip(out.iter_mut()).enumerate() {
                if (i as u64 + 1).is_multiple_of(op::INTERRUPT_EVERY) && op::interrupted() {
                    return Err(Error::Interrupted);
                }
                let r =
                    self.mmu
                        .page_fault(st, ctx, *g, private, write, exec, vcpu as usize, false)?;
                *o = r.ret as u8;
                if ctx.bug.is_some() {
                    break;
                }
            }
            Ok(())
        })
    }

    /// KVM_PRE_FAULT_MEMORY: prefetch faults over [gfn, gfn + npages), each continuing after the
    /// page it mapped. Returns the number of leaves installed.
    pub fn populate(&self, gfn: u64, npages: u64, private: Option<bool>, vcpu: u32) -> Result<u64> {
        self.ops.ensure_alive()?;
        self.check_range(gfn, npages)?;
        self.check_vcpu(vcpu)?;
        let private = self.check_private(private)?;
        let end = gfn + npages;
        let _vcpu = self.ops.vcpu(vcpu as usize);
        self.ops.read(self.arena(), |st, ctx| {
            // Reject the whole request before changing anything.
            let mut g = gfn;
            while g < end {
                let Some(s) = st.memslots.find(g) else {
                    return Err(bad_arg(
                        "gfn",
                        format!("gfn {g:#x} of the range is not in any memslot"),
                    ));
                };
                g = s.end();
            }
            if self.mmu.has_private_mem {
                let want = self.mmu.is_private(st, gfn, private);
                if st.attrs.uniform(gfn, end) != Some(want) {
                    return Err(bad_arg(
                        "private",
                        format!(
                            "the range's memory attributes are not all {}",
                            if want { "private" } else { "shared" }
                        ),
                    ));
                }
                if want {
                    let mut g = gfn;
                    while g < end {
                        let s = st.memslots.find(g).expect("covered: checked above");
                        if !s.gmem {
                            return Err(bad_arg(
                                "private",
                                format!(
                                    "private memory needs guest_memfd; memslot {} holding gfn {g:#x} has none",
                                    s.id
                                ),
                            ));
                        }
                        g = s.end();
                    }
                }
                self.mmu.vendor.populate_allowed(want)?;
            }
            let mut installed = 0;
            let mut g = gfn;
            let mut steps = 0u64;
            while g < end {
                steps += 1;
                if steps.is_multiple_of(op::INTERRUPT_EVERY) && op::interrupted() {
                    return Err(Error::Interrupted);
                }
                let r = self
                    .mmu
                    .page_fault(st, ctx, g, private, true, false, vcpu as usize, true)?;
                if ctx.bug.is_some() {
                    // KVM's pre-fault loop ends with -EIO once the VM is bugged.
                    break;
                }
                match r.ret {
                    Ret::Retry => continue,
                    Ret::Fixed => {
                        installed += 1;
                        if r.private {
                            self.mmu
                                .vendor
                                .post_populate(ctx, g, spte::spte_to_pfn(r.spte));
                        }
                    }
                    _ => {}
                }
                if ctx.bug.is_some() {
                    break;
                }
                g = (g | (pages_per_level(r.level) - 1)) + 1;
            }
            Ok(installed)
        })
    }

    // ----- zaps and memslots -------------------------------------------------------------

    /// `kvm_zap_gfn_range`: leaves in all valid roots; one flush if anything was zapped.
    pub fn zap_gfn_range(&self, gfn: u64, npages: u64) -> Result<u64> {
        self.ops.ensure_alive()?;
        self.check_range(gfn, npages)?;
        self.ops.write(self.arena(), |_, ctx| {
            Ok(self.mmu.tdp.zap_gfn_range(ctx, gfn, gfn + npages))
        })
    }

    /// Host mm invalidation (`kvm_tdp_mmu_unmap_gfn_range` with the SHARED filter).
    pub fn mmu_notifier_invalidate(&self, gfn: u64, npages: u64) -> Result<u64> {
        self.ops.ensure_alive()?;
        self.check_range(gfn, npages)?;
        self.ops.write(self.arena(), |_, ctx| {
            Ok(self
                .mmu
                .tdp
                .unmap_gfn_range(ctx, false, true, gfn, gfn + npages))
        })
    }

    /// `kvm_mmu_zap_all_fast`: direct roots only.
    pub fn zap_all_fast(&self) -> Result<()> {
        self.ops.write(self.arena(), |_, ctx| {
            self.mmu.tdp.zap_all_fast(ctx);
            Ok(())
        })
    }

    /// KVM_SET_USER_MEMORY_REGION2 (create): a slot of `npages` at `gfn` backed by host pages
    /// of `backing` bytes, with guest_memfd if `gmem`. Returns the slot id.
    pub fn add_memslot(&self, gfn: u64, npages: u64, backing: u64, gmem: bool) -> Result<u32> {
        self.add_memslot_flags(gfn, npages, backing, gmem, false)
    }

    /// `add_memslot` with KVM_MEM_READONLY (`readonly`): guest writes to the slot exit to
    /// userspace as MMIO; KVM has no read-only memory on VMs with protected state (TDX, SNP)
    /// and none with guest_memfd.
    pub fn add_memslot_flags(
        &self,
        gfn: u64,
        npages: u64,
        backing: u64,
        gmem: bool,
        readonly: bool,
    ) -> Result<u32> {
        if readonly && (gmem || matches!(self.cfg.vm_type, VmType::Tdx | VmType::Snp)) {
            return Err(bad_arg(
                "readonly",
                "KVM_MEM_READONLY is not available on a VM with protected state (TDX, SNP) or \
                 with guest_memfd",
            ));
        }
        let level = backing_level(backing, "backing")?;
        if gmem && !self.mmu.has_private_mem {
            return Err(bad_arg(
                "gmem",
                "a default VM has no guest_memfd; use gmem=False",
            ));
        }
        self.ops.ensure_alive()?;
        self.ops.write(self.arena(), |st, _| {
            st.memslots.check_add(gfn, npages, level, self.max_gfn())?;
            let need = self.slot_cost(npages, level, gmem);
            if st.committed.saturating_add(need) > self.budget {
                return Err(Error::OutOfMemory(format!(
                    "add_memslot: {npages} pages need {need} bytes of page tables (every tree, fully mapped at 4K) and metadata; the VM's budget of {} bytes has {} committed",
                    self.budget, st.committed
                )));
            }
            let id = st.memslots.add(gfn, npages, level, gmem)?;
            st.memslots.by_id_mut(id).expect("just added").readonly = readonly;
            let slot: &Memslot = st.memslots.by_id(id).expect("just added");
            if gmem && let Err(e) = self.mmu.vendor.gmem_bind(slot.gmem_pfn, npages) {
                st.memslots.remove(id);
                return Err(e);
            }
            st.committed += need;
            Ok(id)
        })
    }

    // ----- dirty logging, aging, splitting (spec §7) ---------------------------------------

    fn slot_range(st: &MmuState, id: u32) -> Result<(u64, u64)> {
        match st.memslots.by_id(id) {
            Some(s) => Ok((s.gfn, s.end())),
            None => Err(bad_arg("slot", format!("no memslot with id {id}"))),
        }
    }

    /// Toggle `KVM_MEM_LOG_DIRTY_PAGES` on memslot `id` (`kvm_mmu_slot_apply_flags`).
    /// Enabling allocates the dirty bitmap (all set with `initially_set`) and, unless manual
    /// protection with initially-set is asked for, splits huge pages (`eager_split`) and
    /// write-protects every leaf of the slot; disabling frees the bitmap and recovers huge
    /// mappings. guest_memfd slots cannot log dirty pages. Returns the SPTEs changed
    /// (write-protected, or made huge again).
    #[allow(clippy::too_many_arguments)]
    pub fn set_dirty_logging(
        &self,
        id: u32,
        enable: bool,
        manual_protect: bool,
        initially_set: bool,
        eager_split: bool,
        pml: bool,
    ) -> Result<u64> {
        self.ops.ensure_alive()?;
        if initially_set && !manual_protect {
            return Err(bad_arg(
                "initially_set",
                "KVM_DIRTY_LOG_INITIALLY_SET needs manual_protect=True \
                 (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)",
            ));
        }
        if enable && pml && !self.cfg.ad_bits {
            return Err(bad_arg(
                "pml",
                "PML needs EPT A/D bits (KVM turns enable_pml off when enable_ept_ad_bits is \
                 off); this VM has ad_bits=False, so dirty logging write-protects (pml=False)",
            ));
        }
        self.ops.write(self.arena(), |st, ctx| {
            let (start, end) = Self::slot_range(st, id)?;
            let slot = st.memslots.by_id(id).expect("found above");
            if slot.gmem {
                return Err(bad_arg(
                    "slot",
                    format!(
                        "memslot {id} has guest_memfd: KVM refuses KVM_MEM_LOG_DIRTY_PAGES on \
                         guest_memfd slots (private memory cannot be dirty-logged)"
                    ),
                ));
            }
            if enable && slot.readonly {
                return Err(bad_arg(
                    "slot",
                    format!("memslot {id} is read-only: KVM refuses dirty logging on it"),
                ));
            }
            if slot.dirty.is_some() == enable {
                return Ok(0);
            }
            let npages = end - start;
            let bytes = crate::memslot::DirtyLog::bytes(npages);
            let tdp = &self.mmu.tdp;
            let mut changed = 0;
            if enable {
                if st.committed.saturating_add(bytes) > self.budget {
                    return Err(Error::OutOfMemory(format!(
                        "set_dirty_logging: the dirty bitmap of {npages} pages needs {bytes} \
                         bytes; the VM's budget of {} bytes has {} committed",
                        self.budget, st.committed
                    )));
                }
                let log = crate::memslot::DirtyLog::new(
                    npages,
                    manual_protect,
                    initially_set,
                    eager_split,
                    pml,
                )?;
                st.memslots.by_id_mut(id).expect("found above").dirty = Some(log);
                st.committed += bytes;
                st.memslots.generation += 2;
                if !(manual_protect && initially_set) {
                    if eager_split {
                        tdp.try_split_huge_pages(ctx, start, end, 1)?;
                    }
                    changed = if pml {
                        // PML: 4K leaves are armed by clearing D; huge ones still lose W.
                        tdp.clear_dirty_range(ctx, start, end)
                            + tdp.wrprot_range(ctx, start, end, 2)
                    } else {
                        tdp.wrprot_range(ctx, start, end, 1)
                    };
                }
            } else {
                st.memslots.by_id_mut(id).expect("found above").dirty = None;
                st.committed -= bytes;
                st.memslots.generation += 2;
                let level = slot_level_of(st, id);
                changed = tdp
                    .recover_huge_pages(ctx, start, end, |g, l| self.may_map_huge(st, g, l, level));
            }
            if changed > 0 {
                tdp.flush_remote_tlbs(ctx);
            }
            Ok(changed)
        })
    }

    /// Whether the huge range of `level` at `gfn`, in a slot backed at `backing`, may be
    /// mapped huge on the direct root: the backing allows it and, on a VM with private memory,
    /// the whole range is shared (KVM_LPAGE_MIXED_FLAG).
    fn may_map_huge(&self, st: &MmuState, gfn: u64, level: u8, backing: u8) -> bool {
        if level > backing {
            return false;
        }
        let end = gfn + pages_per_level(level);
        // A write-tracked page disallows a huge mapping over it (disallow_lpage).
        if st
            .memslots
            .find(gfn)
            .is_some_and(|s| s.any_write_tracked(gfn, end))
        {
            return false;
        }
        !self.mmu.has_private_mem || st.attrs.uniform(gfn, end) == Some(false)
    }

    /// KVM_GET_DIRTY_LOG for memslot `id`: the bitmap as 64-bit words (bit i of word w = page
    /// `64 * w + i` of the slot). Without manual protection the bits are taken (cleared) and
    /// those pages write-protected again, under `mmu_lock` for write, with one flush; with it
    /// the bitmap is only copied (KVM_CLEAR_DIRTY_LOG re-arms).
    pub fn get_dirty_log(&self, id: u32) -> Result<Vec<u64>> {
        self.ops.ensure_alive()?;
        self.ops.write(self.arena(), |st, ctx| {
            let (start, _) = Self::slot_range(st, id)?;
            let slot = st.memslots.by_id(id).expect("found above");
            let Some(log) = &slot.dirty else {
                return Err(bad_arg(
                    "slot",
                    format!("memslot {id} does not log dirty pages (set_dirty_logging first)"),
                ));
            };
            let mut out = Vec::with_capacity(log.bits.len());
            let mut changed = 0;
            for (w, word) in log.bits.iter().enumerate() {
                if log.manual_protect {
                    out.push(word.load(Ordering::Acquire));
                    continue;
                }
                let mask = word.swap(0, Ordering::AcqRel);
                out.push(mask);
                if mask != 0 {
                    changed += self.mmu.tdp.clear_dirty_pt_masked(
                        ctx,
                        start + 64 * w as u64,
                        mask,
                        !log.pml,
                    );
                }
            }
            if changed > 0 {
                self.mmu.tdp.flush_remote_tlbs(ctx);
            }
            Ok(out)
        })
    }

    /// KVM_CLEAR_DIRTY_LOG for memslot `id` (manual protection only): clear the bits of pages
    /// [first_page, first_page + npages) of the slot and write-protect those that were set;
    /// with initially-set, huge pages over them are first split (eager split) or
    /// write-protected. `first_page` must be a multiple of 64 and `npages` too unless the range
    /// reaches the slot's end (KVM's rule). Returns the SPTEs write-protected.
    pub fn clear_dirty_log(&self, id: u32, first_page: u64, npages: u64) -> Result<u64> {
        self.ops.ensure_alive()?;
        self.ops.write(self.arena(), |st, ctx| {
            let (start, end) = Self::slot_range(st, id)?;
            let slot = st.memslots.by_id(id).expect("found above");
            let Some(log) = &slot.dirty else {
                return Err(bad_arg(
                    "slot",
                    format!("memslot {id} does not log dirty pages (set_dirty_logging first)"),
                ));
            };
            if !log.manual_protect {
                return Err(bad_arg(
                    "slot",
                    "KVM_CLEAR_DIRTY_LOG needs manual_protect=True \
                     (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)",
                ));
            }
            let size = end - start;
            if !first_page.is_multiple_of(64) || first_page >= size {
                return Err(bad_arg(
                    "first_page",
                    format!("must be a multiple of 64 below {size}, got {first_page}"),
                ));
            }
            if npages == 0
                || first_page + npages > size
                || (!npages.is_multiple_of(64) && first_page + npages != size)
            {
                return Err(bad_arg(
                    "npages",
                    format!(
                        "must be > 0, a multiple of 64 unless the range reaches the slot's end \
                         ({size} pages), and within the slot; got {npages}"
                    ),
                ));
            }
            let tdp = &self.mmu.tdp;
            let mut changed = 0;
            let last = first_page + npages;
            let mut p = first_page;
            while p < last {
                let n = (last - p).min(64);
                let range = if n == 64 { !0 } else { (1u64 << n) - 1 };
                let mask = log.bits[(p / 64) as usize].fetch_and(!range, Ordering::AcqRel) & range;
                if mask != 0 {
                    let g = start + p;
                    if log.initially_set {
                        // Huge pages over the first and last cleared page: split, or
                        // write-protect at 2M+ (kvm_arch_mmu_enable_log_dirty_pt_masked).
                        let lo = g + mask.trailing_zeros() as u64;
                        let hi = g + 64 - mask.leading_zeros() as u64;
                        if log.eager_split {
                            tdp.try_split_huge_pages(ctx, lo, hi, 1)?;
                        } else {
                            // Only the huge pages holding the first and the last one.
                            changed += tdp.wrprot_range(ctx, lo, lo + 1, 2);
                            changed += tdp.wrprot_range(ctx, hi - 1, hi, 2);
                        }
                    }
                    changed += tdp.clear_dirty_pt_masked(ctx, g, mask, !log.pml);
                }
                p += n;
            }
            if changed > 0 {
                tdp.flush_remote_tlbs(ctx);
            }
            Ok(changed)
        })
    }

    /// The MMU notifier's clear_young (`kvm_tdp_mmu_age_gfn_range`): age every young shared
    /// leaf in [gfn, gfn + npages) (clear A; with A/D off, mark it for access tracking);
    /// whether any was young. Lockless in KVM.
    pub fn age_gfn_range(&self, gfn: u64, npages: u64) -> Result<bool> {
        self.ops.ensure_alive()?;
        self.check_range(gfn, npages)?;
        self.ops.read(self.arena(), |_, ctx| {
            Ok(self.mmu.tdp.age_gfn_range(ctx, gfn, gfn + npages))
        })
    }

    /// The MMU notifier's test_young (`kvm_tdp_mmu_test_age_gfn`): whether a shared leaf in
    /// [gfn, gfn + npages) is young (A set; with A/D off, not access-tracked). Changes nothing.
    pub fn test_age_gfn(&self, gfn: u64, npages: u64) -> Result<bool> {
        self.ops.ensure_alive()?;
        self.check_range(gfn, npages)?;
        self.ops.read(self.arena(), |_, _| {
            Ok(self.mmu.tdp.test_age_gfn(gfn, gfn + npages))
        })
    }

    /// Eager huge-page splitting (`kvm_tdp_mmu_try_split_huge_pages`) of [gfn, gfn + npages)
    /// down to `target_level` (1 = 4K, 2 = 2M), under `mmu_lock` for read; no flush (the
    /// translation does not change). Returns the huge pages split.
    pub fn split_huge_pages(&self, gfn: u64, npages: u64, target_level: u8) -> Result<u64> {
        self.ops.ensure_alive()?;
        self.check_range(gfn, npages)?;
        if !(1..=2).contains(&target_level) {
            return Err(bad_arg(
                "target_level",
                format!("must be 1 (4K) or 2 (2M), got {target_level}"),
            ));
        }
        self.ops.read(self.arena(), |_, ctx| {
            self.mmu
                .tdp
                .try_split_huge_pages(ctx, gfn, gfn + npages, target_level)
        })
    }

    /// `kvm_mmu_recover_huge_pages` for memslot `id` (mmu_lock for read): tables whose range
    /// the slot's backing (and, on a confidential VM, the attributes) allow to map huge become
    /// one huge leaf again; one flush if any did. Not for a slot that logs dirty pages.
    /// Returns the huge leaves made.
    pub fn recover_huge_pages(&self, id: u32) -> Result<u64> {
        self.ops.ensure_alive()?;
        self.ops.read(self.arena(), |st, ctx| {
            let (start, end) = Self::slot_range(st, id)?;
            let slot = st.memslots.by_id(id).expect("found above");
            if slot.dirty.is_some() {
                return Err(bad_arg(
                    "slot",
                    format!(
                        "memslot {id} logs dirty pages: huge pages are recovered when logging stops"
                    ),
                ));
            }
            let level = slot.level;
            let made = self
                .mmu
                .tdp
                .recover_huge_pages(ctx, start, end, |g, l| self.may_map_huge(st, g, l, level));
            if made > 0 {
                self.mmu.tdp.flush_remote_tlbs(ctx);
            }
            Ok(made)
        })
    }

    /// Page write tracking (`kvm_write_track_add_gfn` / `_remove_gfn`, as KVMGT uses it):
    /// adding the first tracker of `gfn` disallows huge pages over it and write-protects every
    /// leaf mapping it (W and MMU-writable cleared, one flush); a guest write then returns
    /// RET_PF_WRITE_PROTECTED (the write is emulated). Removing the last tracker lets the next
    /// fault map the page writable again. Returns the page's tracker count.
    pub fn write_track_gfn(&self, gfn: u64, add: bool) -> Result<u32> {
        self.ops.ensure_alive()?;
        self.check_gfn(gfn, "gfn")?;
        self.ops.write(self.arena(), |st, ctx| {
            let Some(slot) = st.memslots.find(gfn) else {
                return Err(bad_arg("gfn", format!("gfn {gfn:#x} is in no memslot")));
            };
            let id = slot.id;
            if slot.gmem {
                return Err(bad_arg(
                    "gfn",
                    format!("gfn {gfn:#x} is in a guest_memfd slot: KVM tracks shared memory only"),
                ));
            }
            let npages = slot.npages;
            let untracked = slot.write_track.is_none();
            if untracked && !add {
                return Err(bad_arg("gfn", format!("gfn {gfn:#x} is not write-tracked")));
            }
            let bytes = npages * 4;
            if untracked {
                if st.committed.saturating_add(bytes) > self.budget {
                    return Err(Error::OutOfMemory(format!(
                        "write_track_gfn: the slot's tracking counts need {bytes} bytes; the \
                         VM's budget of {} bytes has {} committed",
                        self.budget, st.committed
                    )));
                }
                st.committed += bytes;
            }
            let slot = st.memslots.by_id_mut(id).expect("found above");
            if slot.write_track.is_none() {
                let mut v = Vec::new();
                v.try_reserve_exact(npages as usize).map_err(|_| {
                    Error::OutOfMemory("the memslot's write-tracking counts".into())
                })?;
                v.resize_with(npages as usize, || std::sync::atomic::AtomicU32::new(0));
                slot.write_track = Some(v.into_boxed_slice());
            }
            let t = &slot.write_track.as_ref().expect("allocated above")[(gfn - slot.gfn) as usize];
            let n = t.load(Ordering::Relaxed);
            if add {
                t.store(n + 1, Ordering::Relaxed);
                if n == 0 && self.mmu.tdp.write_protect_gfn(ctx, gfn) {
                    self.mmu.tdp.flush_remote_tlbs(ctx);
                }
                Ok(n + 1)
            } else if n == 0 {
                Err(bad_arg("gfn", format!("gfn {gfn:#x} is not write-tracked")))
            } else {
                t.store(n - 1, Ordering::Relaxed);
                Ok(n - 1)
            }
        })
    }

    /// One run of the NX huge page recovery worker (`kvm_recover_nx_huge_pages`, the TDP
    /// MMU's v6.17+ form under `mmu_lock` for read): zap ⌈nx_lpage_splits / ratio⌉ of the
    /// oldest tables exec faults had to create under the NX huge page mitigation, so the next
    /// non-exec faults there can map huge; tables of slots that log dirty pages are only taken
    /// off the list. One flush if any was zapped. `ratio` 0 does nothing (KVM's
    /// `nx_huge_pages_recovery_ratio`; its default is 60). Returns the tables zapped.
    pub fn nx_recover(&self, ratio: u32) -> Result<u64> {
        self.ops.ensure_alive()?;
        self.ops.read(self.arena(), |st, ctx| {
            let skip = |gfn: u64| st.memslots.find(gfn).is_some_and(|s| s.dirty.is_some());
            let zapped = self.mmu.tdp.recover_nx_huge_pages(ctx, ratio, skip);
            if zapped > 0 {
                self.mmu.tdp.flush_remote_tlbs(ctx);
            }
            Ok(zapped)
        })
    }

    /// KVM_MR_MOVE: memslot `id` now starts at `new_gfn` (same host memory, same flags and
    /// dirty log). KVM first flushes the old range as for a deletion (the fast zap on a default
    /// VM with the slot-zap-all quirk, otherwise the slot's leaves in every root), then
    /// installs the moved slot; the generation grows. guest_memfd slots cannot move.
    pub fn move_memslot(&self, id: u32, new_gfn: u64) -> Result<()> {
        self.ops.ensure_alive()?;
        self.check_gfn(new_gfn, "new_gfn")?;
        self.ops.write(self.arena(), |st, ctx| {
            let Some(slot) = st.memslots.by_id(id) else {
                return Err(bad_arg("slot", format!("no memslot {id}")));
            };
            if slot.gmem {
                return Err(bad_arg(
                    "slot",
                    format!("memslot {id} has guest_memfd: KVM refuses KVM_MR_MOVE for it"),
                ));
            }
            let (start, end, npages, level) = (slot.gfn, slot.end(), slot.npages, slot.level);
            let align = pages_per_level(level);
            if !new_gfn.is_multiple_of(align) {
                return Err(bad_arg(
                    "new_gfn",
                    format!(
                        "must be a multiple of the backing page ({align} pages), got {new_gfn:#x}"
                    ),
                ));
            }
            if new_gfn
                .checked_add(npages)
                .is_none_or(|e| e > self.max_gfn())
            {
                return Err(bad_arg(
                    "new_gfn",
                    format!(
                        "the moved slot would end past the guest's gfn limit {:#x}",
                        self.max_gfn()
                    ),
                ));
            }
            if let Some(o) = st
                .memslots
                .slots
                .iter()
                .find(|s| s.id != id && new_gfn < s.end() && s.gfn < new_gfn + npages)
            {
                return Err(bad_arg(
                    "new_gfn",
                    format!(
                        "the moved slot would overlap memslot {} [{:#x}, {:#x})",
                        o.id,
                        o.gfn,
                        o.end()
                    ),
                ));
            }
            if self.cfg.vm_type == VmType::Default && self.cfg.slot_zap_all {
                self.mmu.tdp.zap_all_fast(ctx);
            } else {
                self.mmu.tdp.unmap_gfn_range(ctx, true, true, start, end);
            }
            st.memslots.by_id_mut(id).expect("found above").gfn = new_gfn;
            st.memslots.resort();
            Ok(())
        })
    }

    /// Memslot deletion: a fast zap for default VMs with KVM_X86_QUIRK_SLOT_ZAP_ALL, otherwise
    /// a leaf zap of the slot in every root (`kvm_mmu_zap_memslot`).
    pub fn delete_memslot(&self, id: u32) -> Result<()> {
        self.ops.ensure_alive()?;
        self.ops.write(self.arena(), |st, ctx| {
            let Some(slot) = st.memslots.by_id(id) else {
                let ids: Vec<String> = st.memslots.slots.iter().map(|s| s.id.to_string()).collect();
                return Err(bad_arg(
                    "slot",
                    format!("no memslot {id}; existing: [{}]", ids.join(", ")),
                ));
            };
            let (start, end) = (slot.gfn, slot.end());
            if self.cfg.vm_type == VmType::Default && self.cfg.slot_zap_all {
                self.mmu.tdp.zap_all_fast(ctx);
            } else {
                self.mmu.tdp.unmap_gfn_range(ctx, true, true, start, end);
            }
            if let Some(slot) = st.memslots.remove(id) {
                if slot.gmem {
                    self.mmu.vendor.gmem_unbind(slot.gmem_pfn, slot.npages);
                }
                st.committed -= self.slot_cost(slot.npages, slot.level, slot.gmem);
                // What the slot committed while it lived: a dirty bitmap, tracking counts.
                if slot.dirty.is_some() {
                    st.committed -= crate::memslot::DirtyLog::bytes(slot.npages);
                }
                if slot.write_track.is_some() {
                    st.committed -= slot.npages * 4;
                }
            }
            Ok(())
        })
    }

    // ----- private memory ----------------------------------------------------------------

    /// KVM_SET_MEMORY_ATTRIBUTES: before the change, unmap the range under the *old*
    /// attribute's filter (to-shared zaps private mappings, to-private zaps shared ones).
    /// Returns the number of leaves zapped.
    pub fn set_memory_attributes(&self, gfn: u64, npages: u64, private: bool) -> Result<u64> {
        self.check_confidential("private")?;
        self.ops.ensure_alive()?;
        self.check_range(gfn, npages)?;
        let end = gfn + npages;
        self.ops.write(self.arena(), |st, ctx| {
            Self::check_covered(st, gfn, end, false)?;
            if st.attrs.uniform(gfn, end) == Some(private) {
                return Ok(0);
            }
            // The guest's conversion request exits to the host (SNP page-state change, TDX
            // MapGPA), and guest_memfd does its bookkeeping.
            ctx.inc(C::conversions);
            ctx.charge(Cost::psc_exit_ns, 1);
            Ok(self.change_attributes(st, ctx, gfn, end, private))
        })
    }

    /// The attribute change itself, once the caller knows it changes something: guest_memfd's
    /// bookkeeping (a 2M folio only partly converted is split), then the unmap under the old
    /// attribute's filter (`kvm_arch_pre_set_memory_attributes`). Returns the leaves zapped.
    fn change_attributes(
        &self,
        st: &mut MmuState,
        ctx: &mut crate::stats::Ctx,
        gfn: u64,
        end: u64,
        private: bool,
    ) -> u64 {
        ctx.charge(Cost::gmem_convert_ns, 1);
        if self.cfg.folio_level == 2 {
            let mut splits = 0;
            for edge in [gfn, end] {
                let inside_gmem = st.memslots.find(edge.min(end - 1)).is_some_and(|s| s.gmem);
                if !edge.is_multiple_of(512) && inside_gmem {
                    splits += 1;
                }
            }
            if gfn / 512 == (end - 1) / 512 && splits == 2 {
                splits = 1; // both edges inside one folio
            }
            ctx.add(C::gmem_splits, splits);
            ctx.charge(Cost::gmem_split_2m_ns, splits as u64);
        }
        let zapped = self
            .mmu
            .tdp
            .unmap_gfn_range(ctx, !private, private, gfn, end);
        st.attrs.set(gfn, end, private);
        zapped
    }

    /// The guest's request to convert `[gfn, gfn + npages)` (`private`: to private, else to
    /// shared), as KVM forwards it to the VMM: a KVM_HC_MAP_GPA_RANGE exit to userspace, which
    /// answers with KVM_SET_MEMORY_ATTRIBUTES. An SEV-SNP guest asks with a page-state-change
    /// VMGEXIT (`snp_begin_psc` makes one exit per run of contiguous entries of one page size
    /// and operation: one call here); a TD asks with TDG.VP.VMCALL<MapGPA>, which KVM splits
    /// into one exit per 2 MiB (`TDX_MAP_GPA_MAX_LEN`); a sw_protected guest makes the
    /// hypercall directly (one exit). Every exit is charged (`psc_exit_ns`) and counted
    /// (`conversions`) even when the range already has the requested attribute; the change
    /// itself, if any, is `set_memory_attributes`' (guest_memfd's bookkeeping, the split of a
    /// partly converted 2M folio, the unmap under the old attribute's filter), once per call.
    /// Returns the number of leaves zapped.
    pub fn map_gpa_range(&self, gfn: u64, npages: u64, private: bool) -> Result<u64> {
        self.check_confidential("private")?;
        self.ops.ensure_alive()?;
        self.check_range(gfn, npages)?;
        let end = gfn + npages;
        let exits = if self.cfg.vm_type == VmType::Tdx {
            npages.div_ceil(512)
        } else {
            1
        };
        self.ops.write(self.arena(), |st, ctx| {
            Self::check_covered(st, gfn, end, false)?;
            ctx.add(C::conversions, exits as i64);
            ctx.charge(Cost::psc_exit_ns, exits);
            if st.attrs.uniform(gfn, end) == Some(private) {
                return Ok(0);
            }
            Ok(self.change_attributes(st, ctx, gfn, end, private))
        })
    }

    /// guest_memfd punch hole: `kvm_gmem_invalidate_begin` unmaps with the PRIVATE filter, then
    /// guest_memfd frees the pages (the vendor's invalidate). Returns the leaves zapped.
    pub fn punch_hole(&self, gfn: u64, npages: u64) -> Result<u64> {
        self.check_confidential("vm_type")?;
        self.ops.ensure_alive()?;
        self.check_range(gfn, npages)?;
        let end = gfn + npages;
        self.ops.write(self.arena(), |st, ctx| {
            Self::check_covered(st, gfn, end, true)?;
            let zapped = self.mmu.tdp.unmap_gfn_range(ctx, true, false, gfn, end);
            gmem::invalidate(&*self.mmu.vendor, ctx, &st.memslots, gfn, end);
            Ok(zapped)
        })
    }

    /// KVM_TDX_FINALIZE_VM: the TD becomes runnable.
    pub fn finalize(&self) -> Result<()> {
        self.mmu.vendor.finalize_supported()?;
        self.ops.ensure_alive()?;
        self.ops
            .write(self.arena(), |_, _| self.mmu.vendor.finalize())
    }

    /// Tear the VM down in KVM's order: release guest_memfd (zap every private leaf, HKID still
    /// assigned), the vendor's pre-destroy (TDX: release the HKID), then invalidate and zap
    /// every root exclusively (on a TD only `free_external_spt` → RECLAIM runs then).
    /// Afterwards every operation is refused.
    pub fn destroy(&self) -> Result<()> {
        self.ops.ensure_alive()?;
        self.ops.write(self.arena(), |st, ctx| {
            let tdp = &self.mmu.tdp;
            // KVM_TDX_TERMINATE_VM: the key goes first, so private pages are reclaimed.
            if self.mmu.vendor.release_before_private_zap() {
                self.mmu.vendor.vm_pre_destroy(ctx);
            }
            let gmem: Vec<(u64, u64)> = st
                .memslots
                .slots
                .iter()
                .filter(|s| s.gmem)
                .map(|s| (s.gfn, s.end()))
                .collect();
            for (s, e) in gmem {
                tdp.unmap_gfn_range(ctx, true, false, s, e);
                gmem::invalidate(&*self.mmu.vendor, ctx, &st.memslots, s, e);
            }
            if self.mmu.vendor.zap_mirror_before_pre_destroy()
                && let Some(mirror) = tdp.current_root(true)
            {
                // Pre-upstream order: tear the (now leaf-less) mirror tree down while the
                // HKID is still assigned, so each S-EPT table goes by SEPT.REMOVE.
                tdp.zap_root(ctx, mirror, false);
            }
            self.mmu.vendor.vm_pre_destroy(ctx);
            tdp.uninit(ctx);
            self.ops.mark_destroyed();
            Ok(())
        })
    }

    fn snp(&self, what: &str) -> Result<&Snp> {
        self.mmu
            .vendor
            .as_any()
            .downcast_ref::<Snp>()
            .ok_or_else(|| bad_arg("vm_type", what))
    }

    /// The external tree of a VM with a mirror root (TDX's S-EPT or the software mirror).
    fn external_tree(&self) -> Option<&TdxModule> {
        let v = self.mmu.vendor.as_any();
        v.downcast_ref::<Tdx>()
            .map(|t| &*t.module)
            .or_else(|| v.downcast_ref::<SwMirror>().map(|s| &*s.module))
    }

    /// The guest's PVALIDATE over [gfn, gfn + npages) at 4K or 2M. Validation of a page that
    /// is not assigned to the guest is bad input (checked before anything changes); other
    /// architectural failures (double validation, size mismatch) are counted and returned.
    pub fn pvalidate(
        &self,
        gfn: u64,
        npages: u64,
        size_2m: bool,
        validate: bool,
    ) -> Result<Vec<(&'static str, u64)>> {
        let snp = self.snp("PVALIDATE is an SEV-SNP guest instruction")?;
        self.ops.ensure_alive()?;
        self.check_range(gfn, npages)?;
        let step = if size_2m { 512 } else { 1 };
        if size_2m && !gfn.is_multiple_of(512) {
            return Err(bad_arg(
                "gfn",
                format!("2M PVALIDATE needs a 2M-aligned gfn (a multiple of 512), got {gfn:#x}"),
            ));
        }
        if size_2m && !npages.is_multiple_of(512) {
            return Err(bad_arg(
                "npages",
                format!("2M PVALIDATE needs a multiple of 512 pages, got {npages}"),
            ));
        }
        self.ops.write(self.arena(), |st, ctx| {
            for g in (gfn..gfn + npages).step_by(step as usize) {
                let Some(slot) = st.memslots.find(g).filter(|s| s.gmem) else {
                    return Err(bad_arg(
                        "gfn",
                        format!("gfn {g:#x} is not guest_memfd memory of an SNP guest"),
                    ));
                };
                let e = snp.rmp.get(slot.gmem_pfn(g));
                if !rmp::assigned(e) || rmp::entry_gfn(e) != g {
                    return Err(bad_arg(
                        "gfn",
                        format!(
                            "gfn {g:#x} is not assigned to the guest in the RMP (validate an assigned page)"
                        ),
                    ));
                }
            }
            let mut out: Vec<(&'static str, u64)> = Vec::new();
            for g in (gfn..gfn + npages).step_by(step as usize) {
                let slot = st.memslots.find(g).expect("checked");
                let s = snp
                    .rmp
                    .pvalidate(ctx, slot.gmem_pfn(g), g, size_2m, validate);
                match out.iter_mut().find(|(n, _)| *n == s.name()) {
                    Some((_, c)) => *c += 1,
                    None => out.push((s.name(), 1)),
                }
            }
            Ok(out)
        })
    }

    /// An NPF with the RMP size-mismatch bit (`sev_handle_rmp_fault`): PSMASH the 2M RMP entry
    /// (tolerating one already split) and zap the 512-page gfn range so the NPT is rebuilt.
    pub fn rmp_fault(&self, gfn: u64) -> Result<()> {
        let snp = self.snp("RMP faults exist only on SEV-SNP")?;
        self.ops.ensure_alive()?;
        self.check_gfn(gfn, "gfn")?;
        self.ops.write(self.arena(), |st, ctx| {
            let Some(slot) = st.memslots.find(gfn).filter(|s| s.gmem) else {
                return Err(bad_arg(
                    "gfn",
                    format!("gfn {gfn:#x} is not guest_memfd memory"),
                ));
            };
            snp.handle_rmp_fault(ctx, slot.gmem_pfn(gfn));
            let base = gfn & !511;
            self.mmu.tdp.zap_gfn_range(ctx, base, base + 512);
            Ok(())
        })
    }

    /// RMP entry of the guest_memfd page behind `gfn`: (assigned, validated, 2M, gfn).
    pub fn rmp_entry(&self, gfn: u64) -> Result<(bool, bool, bool, u64)> {
        self.check_gfn(gfn, "gfn")?;
        let no_entry = || {
            bad_arg(
                "gfn",
                format!("gfn {gfn:#x} has no RMP entry (not SNP guest_memfd memory)"),
            )
        };
        let snp = self
            .mmu
            .vendor
            .as_any()
            .downcast_ref::<Snp>()
            .ok_or_else(no_entry)?;
        let st = self.ops.mmu_lock.read();
        let slot = st
            .memslots
            .find(gfn)
            .filter(|s| s.gmem)
            .ok_or_else(no_entry)?;
        let e = snp.rmp.get(slot.gmem_pfn(gfn));
        Ok((
            rmp::assigned(e),
            rmp::validated(e),
            rmp::is_2m(e),
            rmp::entry_gfn(e),
        ))
    }

    /// The external tree's entries (not FREE) in tree order: (gfn, level, state, pfn).
    pub fn sept_entries(&self) -> Result<Vec<(u64, u8, &'static str, u64)>> {
        match self.external_tree() {
            Some(m) => Ok(m.dump()),
            None => Err(Error::Config(
                "vm_type: only TDX VMs (and sw_protected with mirror=True) have an S-EPT".into(),
            )),
        }
    }

    // ----- inspection --------------------------------------------------------------------

    /// Entries on the path to `gfn` in the current root of the kind `private` selects.
    pub fn walk(&self, gfn: u64, private: bool) -> Result<Vec<(u8, u64)>> {
        self.check_gfn(gfn, "gfn")?;
        let mirror = self.has_mirror() && private;
        if private && !self.has_mirror() {
            self.check_private(Some(true))?;
        }
        let _st = self.ops.mmu_lock.read();
        let tdp = &self.mmu.tdp;
        Ok(match tdp.current_root(mirror) {
            Some(root) => tdp.walk_root(root, gfn, tdp.root_gfn_bits(mirror)),
            None => Vec::new(),
        })
    }

    /// The leaf for `gfn` (or the entry where the walk stopped).
    pub fn spte(&self, gfn: u64, private: bool) -> Result<u64> {
        Ok(self
            .walk(gfn, private)?
            .last()
            .map(|e| e.1)
            .unwrap_or(SHADOW_NONPRESENT_VALUE))
    }

    /// Every invariant (`check::check`); after `destroy()`, the teardown audit.
    pub fn check(&self) -> Result<()> {
        // Take the lock first: a check() that overlaps destroy() is then either the live check
        // before it or the teardown audit after it.
        let st = self.ops.mmu_lock.write();
        if self.destroyed() {
            return check::check_teardown(&self.mmu, &st);
        }
        self.ops.ensure_alive()?;
        let totals = self.ops.totals.snapshot();
        check::check(&self.mmu, &st, &totals)
    }

    /// The memstress-shaped workload on real threads (`memstress::run`).
    pub fn run_memstress(&self, a: &MemstressArgs) -> Result<Vec<VcpuResult>> {
        self.check_private(a.private)?;
        memstress::run(&self.mmu, &self.ops, a, self.cfg.vcpus, |g, n| {
            self.check_gfn(g, "base_gfn")?;
            if g.checked_add(n).is_none_or(|e| e > self.max_gfn()) {
                return Err(bad_arg(
                    "pages_per_vcpu",
                    format!(
                        "the workload's region [{g:#x}, +{n:#x}) runs past the guest-physical limit {:#x}",
                        self.max_gfn()
                    ),
                ));
            }
            Ok(())
        })
    }

    /// The memstress-shaped workload in virtual time (`vtime::run`): every simulated vCPU on
    /// this thread, interleaved in modeled-time order. One operation: it holds `mmu_lock` for
    /// read throughout (other host threads' writers wait for it to end).
    pub fn run_virtual(&self, a: &crate::vtime::VtArgs) -> Result<crate::vtime::VtResult> {
        self.check_virtual(a.ms.private)?;
        let span = if a.ms.overlap {
            a.ms.pages_per_vcpu
        } else {
            a.ms.pages_per_vcpu.saturating_mul(a.ms.vcpus as u64)
        };
        self.check_gfn(a.ms.base_gfn, "base_gfn")?;
        if a.ms
            .base_gfn
            .checked_add(span)
            .is_none_or(|e| e > self.max_gfn())
        {
            return Err(bad_arg(
                "pages_per_vcpu",
                format!(
                    "the workload's region [{:#x}, +{span:#x}) runs past the guest-physical limit {:#x}",
                    a.ms.base_gfn,
                    self.max_gfn()
                ),
            ));
        }
        if let Some((g, n)) = a.remove {
            self.check_confidential("remove")?;
            self.check_range(g, n)?;
        }
        self.ops.ensure_alive()?;
        let st = self.ops.mmu_lock.read();
        self.ops.ensure_alive()?;
        let covered = |start: u64, n: u64, arg: &str| -> Result<()> {
            let mut g = start;
            while g < start + n {
                let Some(s) = st.memslots.find(g) else {
                    return Err(bad_arg(
                        arg,
                        format!("gfn {g:#x} of the range is not in any memslot"),
                    ));
                };
                g = s.end();
            }
            Ok(())
        };
        covered(a.ms.base_gfn, span, "base_gfn")?;
        if let Some((g, n)) = a.remove {
            covered(g, n, "remove")?;
        }
        let r = crate::vtime::run(&self.vt_side(), &st, a);
        drop(st);
        self.ops.grace_period(self.arena());
        r
    }

    /// What a virtual-time run refuses up front: a VM with a Python hooks object (its hooks
    /// run on host threads), and an access kind the VM cannot have.
    fn check_virtual(&self, private: Option<bool>) -> Result<()> {
        if self.user_hooks {
            return Err(bad_arg(
                "clock",
                "virtual time runs the built-in hook designs only; a VM with a hooks object \
                 runs on host threads (clock=\"host\")",
            ));
        }
        self.check_private(private).map(|_| ())
    }

    /// The VM as the virtual-time engine sees it.
    fn vt_side(&self) -> crate::vtime::VmSide<'_> {
        crate::vtime::VmSide {
            mmu: &self.mmu,
            ops: &self.ops,
            max_vcpus: self.cfg.vcpus,
            td: self.cfg.vm_type == VmType::Tdx,
            exit_ns: self.cfg.costs.rates()[self.mmu.exit_cost() as usize],
        }
    }

    /// Explicit per-vCPU access lists in virtual time (`run_lists`): vCPU `i` walks
    /// `lists[i]` with the same actor, engine and shared resources as `run_virtual`; `a` gives
    /// the run's options (`passes`, `mmu_lock`, userfault, machine, TDX module, `remove`,
    /// `cpus`) and its memstress shape `a.ms` is not used. `private` is the accesses' kind
    /// (None: by each gfn's attribute). Every gfn must be in a memslot; refused before any
    /// access otherwise. One operation: it holds `mmu_lock` for read throughout.
    pub fn run_virtual_accesses(
        &self,
        lists: &[crate::vtime::AccessList],
        private: Option<bool>,
        a: &crate::vtime::VtArgs,
    ) -> Result<crate::vtime::VtResult> {
        self.check_virtual(private)?;
        if lists.is_empty() || lists.len() > self.cfg.vcpus as usize {
            return Err(bad_arg(
                "gfns_per_vcpu",
                format!(
                    "one list per vCPU, 1..={} (the VM's vcpus), got {}",
                    self.cfg.vcpus,
                    lists.len()
                ),
            ));
        }
        let max = self.max_gfn();
        for (v, l) in lists.iter().enumerate() {
            if let Some((i, g)) = l.gfns.iter().enumerate().find(|(_, g)| **g >= max) {
                return Err(bad_arg(
                    "gfns_per_vcpu",
                    format!(
                        "gfns_per_vcpu[{v}][{i}] = {g:#x} is beyond the guest-physical limit; \
                         allowed 0..{max:#x}"
                    ),
                ));
            }
        }
        if let Some((g, n)) = a.remove {
            self.check_confidential("remove")?;
            self.check_range(g, n)?;
        }
        self.ops.ensure_alive()?;
        let st = self.ops.mmu_lock.read();
        self.ops.ensure_alive()?;
        for (v, l) in lists.iter().enumerate() {
            // Consecutive gfns mostly fall in the slot found last.
            let (mut lo, mut hi) = (1u64, 0u64);
            for (i, &g) in l.gfns.iter().enumerate() {
                if g >= lo && g < hi {
                    continue;
                }
                let Some(s) = st.memslots.find(g) else {
                    return Err(bad_arg(
                        "gfns_per_vcpu",
                        format!("gfns_per_vcpu[{v}][{i}] = {g:#x} is not in any memslot"),
                    ));
                };
                (lo, hi) = (s.gfn, s.end());
            }
        }
        if let Some((g, n)) = a.remove {
            let mut x = g;
            while x < g + n {
                let Some(s) = st.memslots.find(x) else {
                    return Err(bad_arg(
                        "remove",
                        format!("gfn {x:#x} of the range is not in any memslot"),
                    ));
                };
                x = s.end();
            }
        }
        let r = crate::vtime::run_lists(&self.vt_side(), &st, lists, private, a);
        drop(st);
        self.ops.grace_period(self.arena());
        r
    }

    /// Guest accesses to a list of pages on one vCPU, in order (a guest loop that is not
    /// memstress-shaped, e.g. `kvm_page_table_test`'s stages). Each access whose current
    /// mapping allows it is served by the "hardware" walk (no exit, no modeled time, as
    /// `run_memstress` on the host clock); any other takes the fault path and, on RETRY,
    /// faults again. `writes[i]` says whether access `i` writes (one entry: all of them).
    /// Returns (faults taken, RETRYs included; modeled ns charged).
    pub fn access_batch(
        &self,
        gfns: &[u64],
        writes: &[bool],
        private: Option<bool>,
        vcpu: u32,
    ) -> Result<(u64, f64)> {
        self.ops.ensure_alive()?;
        self.check_vcpu(vcpu)?;
        let private = self.check_private(private)?;
        // KVM_RUN is refused before the vCPUs may run (a TD before KVM_TDX_FINALIZE_VM).
        self.mmu.vendor.vcpu_run_allowed()?;
        if writes.len() != 1 && writes.len() != gfns.len() {
            return Err(bad_arg(
                "write",
                format!(
                    "has {} entries for {} gfns; give one or one per gfn",
                    writes.len(),
                    gfns.len()
                ),
            ));
        }
        if let Some((i, g)) = gfns.iter().enumerate().find(|(_, g)| **g >= self.max_gfn()) {
            return Err(bad_arg(
                "gfns",
                format!(
                    "gfns[{i}] = {g:#x} is beyond the guest-physical limit; allowed 0..{:#x}",
                    self.max_gfn()
                ),
            ));
        }
        let v = vcpu as usize;
        let _vcpu = self.ops.vcpu(v);
        self.ops.read(self.arena(), |st, ctx| {
            let tdp = &self.mmu.tdp;
            let mut pml = memstress::Pml::default();
            let mut faults = 0u64;
            for (i, &gfn) in gfns.iter().enumerate() {
                if (i as u64 + 1).is_multiple_of(op::INTERRUPT_EVERY) && op::interrupted() {
                    return Err(Error::Interrupted);
                }
                let write = writes[if writes.len() == 1 { 0 } else { i }];
                let acc = self.mmu.guest_access(st, gfn, private);
                let mut attempts = 0u64;
                loop {
                    let root = tdp.vcpu_root(v, acc.mirror);
                    if acc.may_hit
                        && root != crate::arena::NO_TABLE
                        && let Some(logged) = tdp.hw_access(root, gfn, acc.gfn_bits, write)
                    {
                        if logged {
                            pml.log(&self.mmu, st, ctx, gfn);
                        }
                        break;
                    }
                    faults += 1;
                    let r = self
                        .mmu
                        .page_fault(st, ctx, gfn, private, write, false, v, false)?;
                    if ctx.bug.is_some() || r.ret != Ret::Retry {
                        break;
                    }
                    attempts += 1 + r.retries as u64;
                    if attempts >= memstress::MAX_ATTEMPTS_PER_ACCESS {
                        return Err(Error::Livelock(format!(
                            "vCPU {v}: the fault at gfn {gfn:#x} was retried {attempts} times without progress"
                        )));
                    }
                }
                if ctx.bug.is_some() {
                    break;
                }
            }
            Ok((faults, ctx.modeled_ns))
        })
    }

    // ----- host mm operations on the memslots' shared mappings ----------------------------

    /// The host range [gfn, end) must lie in memslots (without guest_memfd if `shared_only`)
    /// and start and end on each slot's backing-page boundary (hugetlb mappings are changed
    /// in whole huge pages).
    fn check_host_range(st: &MmuState, gfn: u64, end: u64, shared_only: bool) -> Result<()> {
        Self::check_covered(st, gfn, end, false)?;
        for s in st.memslots.overlapping(gfn, end) {
            if shared_only && s.gmem {
                return Err(bad_arg(
                    "gfn",
                    format!(
                        "memslot {} holding [{gfn:#x}, {end:#x}) has guest_memfd: its private \
                         pages are freed with punch_hole, not MADV_DONTNEED",
                        s.id
                    ),
                ));
            }
            let align = pages_per_level(s.level);
            for (arg, g) in [("gfn", gfn), ("npages", end)] {
                if g > s.gfn && g < s.end() && !(g - s.gfn).is_multiple_of(align) {
                    return Err(bad_arg(
                        arg,
                        format!(
                            "the range [{gfn:#x}, {end:#x}) must start and end on a backing \
                             page boundary of memslot {} ({align} pages)",
                            s.id
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// `madvise(MADV_DONTNEED)` of the host mapping behind [gfn, gfn + npages): the MMU
    /// notifier zaps the range's shared SPTEs (as `mmu_notifier_invalidate`) and the host
    /// frees the pages, so the next guest touch allocates and zeroes them again. Shared
    /// memory only (guest_memfd slots are refused). Returns the leaves zapped.
    pub fn madvise_dontneed(&self, gfn: u64, npages: u64) -> Result<u64> {
        self.ops.ensure_alive()?;
        self.check_range(gfn, npages)?;
        let end = gfn + npages;
        self.ops.write(self.arena(), |st, ctx| {
            Self::check_host_range(st, gfn, end, true)?;
            let zapped = self.mmu.tdp.unmap_gfn_range(ctx, false, true, gfn, end);
            for s in st.memslots.overlapping(gfn, end) {
                s.untouch(gfn, end);
            }
            Ok(zapped)
        })
    }

    /// `mprotect` of the host mapping behind [gfn, gfn + npages): the MMU notifier zaps the
    /// range's shared SPTEs (the kernel notifies for any protection change); while read-only
    /// a guest write there cannot get a writable host page and the fault ends in a
    /// memory-fault exit (-EFAULT from KVM_RUN), and a read maps the page without W or the
    /// host-writable bit. `writable` true restores write access. Private (guest_memfd)
    /// accesses are not affected. Returns the leaves zapped.
    pub fn mprotect(&self, gfn: u64, npages: u64, writable: bool) -> Result<u64> {
        self.ops.ensure_alive()?;
        self.check_range(gfn, npages)?;
        let end = gfn + npages;
        self.ops.write(self.arena(), |st, ctx| {
            Self::check_host_range(st, gfn, end, false)?;
            let ids: Vec<u32> = st.memslots.overlapping(gfn, end).map(|s| s.id).collect();
            for id in ids {
                let slot = st.memslots.by_id_mut(id).expect("listed above");
                slot.set_host_writable(gfn, end, writable)?;
            }
            Ok(self.mmu.tdp.unmap_gfn_range(ctx, false, true, gfn, end))
        })
    }
}
