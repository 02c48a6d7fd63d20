//! One VM: configuration, memslots, roots, vCPUs, `mmu_lock`, counters, and the public
//! operations (fault, populate, zaps, memslot changes). Each public operation counts into a
//! private `Ctx`, merges it once at the end, and ends a grace period for freed tables.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use parking_lot::{Mutex, RwLock};

use crate::arena::{Arena, NO_TABLE, SP_MIRROR, SP_NX_DISALLOWED, SP_ROOT};
use crate::attrs::PrivateRanges;
use crate::cost::{Cost, CostModel};
use crate::error::{Error, Result, bad_arg};
use crate::external::ExternalOps;
use crate::iter::TdpIter;
use crate::memslot::{Memslot, Memslots, backing_level};
use crate::snp::{Rmp, RmpTable, SnpHooks};
use crate::spte::{
    self, SHADOW_NONPRESENT_VALUE, access_allowed, is_frozen, is_large, is_last, is_mmio,
    is_shadow_present, make_leaf_spte, make_mmio_spte, mmio_generation, pages_per_level,
};
use crate::stats::{C, Ctx, Totals};
use crate::tdx::{TdxHooks, TdxModule, TdxOptions};

/// KVM's RET_PF_* codes, plus MEMORY_FAULT for a KVM_EXIT_MEMORY_FAULT (-EFAULT) exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Ret {
    Continue = 0,
    Retry = 1,
    Emulate = 2,
    WriteProtected = 3,
    Invalid = 4,
    Fixed = 5,
    Spurious = 6,
    MemoryFault = 7,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmType {
    Default,
    Tdx,
    Snp,
    SwProtected,
}

impl VmType {
    pub const NAMES: &'static [&'static str] = &["default", "tdx", "snp", "sw_protected"];
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "default" => Ok(Self::Default),
            "tdx" => Ok(Self::Tdx),
            "snp" => Ok(Self::Snp),
            "sw_protected" => Ok(Self::SwProtected),
            _ => Err(bad_arg(
                "vm_type",
                format!("unknown VM type {s:?}; allowed: {}", Self::NAMES.join(", ")),
            )),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::Default => "default",
            Self::Tdx => "tdx",
            Self::Snp => "snp",
            Self::SwProtected => "sw_protected",
        }
    }
    /// Has private memory (guest_memfd, memory attributes).
    pub fn confidential(self) -> bool {
        self != Self::Default
    }
}

#[derive(Debug, Clone)]
pub struct VmConfig {
    pub vm_type: String,
    pub memory: u64,
    pub vcpus: u32,
    pub levels: u8,
    pub backing: u64,
    pub hooks: String,
    pub costs: CostModel,
    pub seed: u64,
    pub trace: bool,
    pub nx_huge_pages: bool,
    pub slot_zap_all: bool,
    pub tdx: TdxOptions,
    /// SW_PROTECTED only: the seed's "mirrored page table with a shared bit" variant.
    pub mirror: bool,
    /// guest_memfd folio level: 1 (4K) or 2 (2M).
    pub folio_level: u8,
}

impl VmConfig {
    /// Set a type-specific option by name (`mirror`, `folio`, or a TDX option).
    pub fn set_option(&mut self, key: &str, value: &str) -> Result<()> {
        match key {
            "mirror" => {
                self.mirror = match value {
                    "true" | "True" | "1" => true,
                    "false" | "False" | "0" => false,
                    _ => return Err(bad_arg("mirror", format!("must be a bool, got {value:?}"))),
                }
            }
            "folio" => {
                self.folio_level = match value {
                    "4K" | "4096" => 1,
                    "2M" | "2097152" => 2,
                    _ => {
                        return Err(bad_arg(
                            "folio",
                            format!("guest_memfd folio size must be 4K or 2M, got {value:?}"),
                        ));
                    }
                }
            }
            _ => self.tdx.set(key, value)?,
        }
        Ok(())
    }
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            vm_type: "default".into(),
            memory: 1 << 30,
            vcpus: 1,
            levels: 4,
            backing: 4096,
            hooks: "none".into(),
            costs: CostModel::default(),
            seed: 0,
            trace: false,
            nx_huge_pages: false,
            slot_zap_all: true,
            tdx: TdxOptions::default(),
            mirror: false,
            folio_level: 1,
        }
    }
}

pub const MAX_VCPUS: u32 = 4096;

/// A TDP root: KVM's root `kvm_mmu_page` with its role word and reference count.
#[derive(Debug, Clone)]
pub struct Root {
    pub table: u32,
    pub role: u32,
    pub refcount: i32,
    pub invalid: bool,
    pub scheduled_to_zap: bool,
}

pub const ROLE_DIRECT: u32 = 1 << 7;
pub const ROLE_ACC_ALL: u32 = 7 << 8;
pub const ROLE_INVALID: u32 = 1 << 11;
pub const ROLE_EFER_NX: u32 = 1 << 12;
pub const ROLE_CR0_WP: u32 = 1 << 13;
pub const ROLE_IS_MIRROR: u32 = 1 << 19;

impl Root {
    pub fn is_mirror(&self) -> bool {
        self.role & ROLE_IS_MIRROR != 0
    }
    pub fn role_word(&self) -> u32 {
        self.role | if self.invalid { ROLE_INVALID } else { 0 }
    }
}

/// Which roots an operation visits (KVM_DIRECT_ROOTS, KVM_MIRROR_ROOTS, KVM_INVALID_ROOTS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RootTypes(pub u8);
impl RootTypes {
    pub const INVALID: Self = Self(1);
    pub const DIRECT: Self = Self(2);
    pub const MIRROR: Self = Self(4);
    pub const VALID: Self = Self(6);
    pub const fn or(self, o: Self) -> Self {
        Self(self.0 | o.0)
    }
    pub fn matches(self, r: &Root) -> bool {
        if r.invalid {
            return self.0 & 1 != 0;
        }
        if r.is_mirror() {
            self.0 & 4 != 0
        } else {
            self.0 & 2 != 0
        }
    }
}

/// Result of one fault.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FaultResult {
    pub ret: Ret,
    pub level: u8,
    pub retries: u32,
    pub modeled_ns: f64,
    pub spte: u64,
    pub gfn: u64,
    pub private: bool,
}

/// `struct kvm_page_fault`, reduced.
pub(crate) struct KvmPageFault {
    pub gfn: u64,
    pub write: bool,
    pub exec: bool,
    pub prefetch: bool,
    pub max_level: u8,
    pub req_level: u8,
    pub goal_level: u8,
    pub pfn: u64,
    pub huge_page_disallowed: bool,
    pub mmio: bool,
    pub level: u8,
    pub spte: u64,
}

/// State protected by `mmu_lock` (faults hold it for read, zaps and memslot updates for write).
pub struct MmuState {
    pub memslots: Memslots,
    pub attrs: PrivateRanges,
}

/// Which side the hooks follow (architecture §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookDesign {
    None,
    /// Every SPTE change in a table whose role has `is_mirror` (upstream TDX).
    Mirror,
    /// Every SPTE change made for a private fault or a PRIVATE-filtered zap.
    Private,
    /// guest_memfd prepare/invalidate only (upstream SNP); NPT changes call nothing.
    Gmem,
}

pub struct Vm {
    pub cfg: VmConfig,
    pub vm_type: VmType,
    pub costs: CostModel,
    pub arena: Arena,
    pub mmu_lock: RwLock<MmuState>,
    /// `tdp_mmu_pages_lock`: the root list, newest first.
    pub roots: Mutex<Vec<Root>>,
    /// Per vCPU: the direct root it has loaded (`root.hpa`) and its mirror root.
    pub vcpu_root: Box<[AtomicU32]>,
    pub vcpu_mirror_root: Box<[AtomicU32]>,
    pub totals: Totals,
    pub bugged: AtomicBool,
    pub bug_msg: Mutex<Option<String>>,
    pub has_mirror: bool,
    /// Shared (direct) alias bit as a gfn bit; 0 for VMs without one.
    pub gfn_direct_bits: u64,
    pub max_gfn: u64,
    pub external: Option<Arc<dyn ExternalOps>>,
    pub tdx: Option<Arc<TdxHooks>>,
    pub design: HookDesign,
    pub destroyed: AtomicBool,
    /// SEV-SNP: the RMP, indexed by host pfn.
    pub rmp: Option<Arc<RmpTable>>,
    /// Mirror hooks go to a caller's backend: the TDX module model is not driven.
    pub user_hooks: bool,
}

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

impl Vm {
    pub fn new(cfg: VmConfig) -> Result<Self> {
        Self::build(cfg, None)
    }

    /// A VM whose mirror-table hooks go to a caller-supplied backend (e.g. a Python object)
    /// instead of the TDX module model. Only for VM types with a mirror root; the hooks fire
    /// as under the `mirror` design.
    pub fn with_hooks(mut cfg: VmConfig, hooks: Arc<dyn ExternalOps>) -> Result<Self> {
        cfg.hooks = "mirror".into();
        let mirror = cfg.vm_type == "tdx" || (cfg.vm_type == "sw_protected" && cfg.mirror);
        if !mirror {
            return Err(bad_arg(
                "hooks",
                format!(
                    "a hook object needs a VM with a mirror root (tdx, or sw_protected with mirror=True), not {:?}",
                    cfg.vm_type
                ),
            ));
        }
        Self::build(cfg, Some(hooks))
    }

    fn build(cfg: VmConfig, user_hooks: Option<Arc<dyn ExternalOps>>) -> Result<Self> {
        let vm_type = VmType::parse(&cfg.vm_type)?;
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
        let sw_mirror = vm_type == VmType::SwProtected && cfg.mirror;
        if cfg.mirror && vm_type != VmType::SwProtected {
            return Err(bad_arg("mirror", "only sw_protected VMs take mirror=True"));
        }
        let design = match (vm_type, cfg.hooks.as_str(), sw_mirror) {
            (VmType::Default, "none", _) => HookDesign::None,
            (VmType::Tdx, "mirror", _) | (VmType::SwProtected, "mirror", true) => {
                HookDesign::Mirror
            }
            (VmType::Tdx | VmType::Snp, "private", _) | (VmType::SwProtected, "private", true) => {
                HookDesign::Private
            }
            (VmType::Snp, "gmem", _) => HookDesign::Gmem,
            (VmType::SwProtected, "none", false) => HookDesign::None,
            (t, h, m) => {
                let allowed = match (t, m) {
                    (VmType::Default, _) => "none",
                    (VmType::Tdx, _) => "mirror, private",
                    (VmType::Snp, _) => "gmem, private",
                    (VmType::SwProtected, false) => "none (mirror and private need mirror=True)",
                    (VmType::SwProtected, true) => "mirror, private",
                };
                return Err(bad_arg(
                    "hooks",
                    format!(
                        "{h:?} is not valid for a {} VM; allowed: {allowed}",
                        t.name()
                    ),
                ));
            }
        };
        if cfg.tdx.given && vm_type != VmType::Tdx && !sw_mirror {
            return Err(bad_arg(
                "tdx",
                format!(
                    "TDX options apply to tdx VMs (and sw_protected with mirror=True), not {}",
                    vm_type.name()
                ),
            ));
        }
        if !(1..=2).contains(&cfg.folio_level) {
            return Err(bad_arg("folio", "guest_memfd folio size must be 4K or 2M"));
        }
        let shared_bit = if cfg.levels == 4 {
            1u64 << 35
        } else {
            1u64 << 39
        };
        let (has_mirror, gfn_direct_bits) = match vm_type {
            VmType::Tdx => (true, shared_bit),
            VmType::SwProtected if sw_mirror => (true, shared_bit),
            _ => (false, 0),
        };
        // A TD's guest-physical space is the half below the shared bit.
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
        let need = tables_needed(pages, cfg.levels);
        if need.saturating_mul(4096) > ram {
            return Err(bad_arg(
                "memory",
                format!(
                    "{} bytes of guest memory needs {} bytes of page tables when fully mapped at 4K, more than this machine's {} bytes of RAM",
                    cfg.memory,
                    need * 4096,
                    ram
                ),
            ));
        }
        // Reserve address space for every table the host could hold; pages are only backed when used.
        let capacity = (ram / 4096).min(u32::MAX as u64 - 1) as usize;
        let arena = Arena::new(capacity)?;
        let mut memslots = Memslots::new();
        memslots.add(0, pages, level, vm_type.confidential());
        memslots.generation = 0;
        let mut attrs = PrivateRanges::default();
        if vm_type.confidential() {
            // As a VMM does for a confidential guest: all initial memory is private.
            attrs.set(0, pages, true);
        }
        let tdx = if vm_type == VmType::Tdx || sw_mirror {
            Some(Arc::new(TdxHooks {
                module: TdxModule::new(
                    cfg.levels,
                    cfg.vcpus,
                    capacity,
                    cfg.tdx.clone(),
                    cfg.seed,
                    sw_mirror,
                )?,
            }))
        } else {
            None
        };
        let rmp = (vm_type == VmType::Snp).then(|| Arc::new(RmpTable::default()));
        if let Some(table) = &rmp {
            let slot = &mut memslots.slots[0];
            let r = Arc::new(Rmp::new(slot.npages, cfg.folio_level));
            table.insert(slot.gmem_pfn, slot.npages, r.clone());
            slot.rmp = Some(r);
        }
        let user = user_hooks.is_some();
        let external: Option<Arc<dyn ExternalOps>> = match (&tdx, &rmp, design) {
            _ if user => user_hooks,
            (_, _, HookDesign::None | HookDesign::Gmem) => None,
            (Some(t), _, _) => Some(t.clone()),
            (None, Some(table), HookDesign::Private) => Some(Arc::new(SnpHooks {
                table: table.clone(),
            })),
            _ => None,
        };
        let n = cfg.vcpus as usize;
        let costs = cfg.costs;
        let totals = Totals::default();
        totals.set_rates(&costs);
        Ok(Self {
            vm_type,
            costs,
            arena,
            mmu_lock: RwLock::new(MmuState { memslots, attrs }),
            roots: Mutex::new(Vec::new()),
            vcpu_root: (0..n).map(|_| AtomicU32::new(NO_TABLE)).collect(),
            vcpu_mirror_root: (0..n).map(|_| AtomicU32::new(NO_TABLE)).collect(),
            totals,
            bugged: AtomicBool::new(false),
            bug_msg: Mutex::new(None),
            has_mirror,
            gfn_direct_bits,
            max_gfn,
            external,
            tdx,
            design,
            destroyed: AtomicBool::new(false),
            rmp,
            user_hooks: user,
            cfg,
        })
    }

    pub fn levels(&self) -> u8 {
        self.cfg.levels
    }

    // ----- operation bracketing -------------------------------------------------------------

    pub fn ensure_alive(&self) -> Result<()> {
        if self.destroyed.load(Ordering::Acquire) {
            return Err(bad_arg("vm", "the VM was destroyed; create a new one"));
        }
        if self.bugged.load(Ordering::Acquire) {
            let msg = self.bug_msg.lock().clone().unwrap_or_default();
            return Err(Error::Bugged(msg));
        }
        Ok(())
    }

    /// Merge an operation's counters; a KVM_BUG_ON recorded in it marks the VM bugged.
    pub(crate) fn finish(&self, ctx: &Ctx) -> Result<()> {
        self.totals.merge(ctx);
        if let Some(msg) = &ctx.bug {
            let mut m = self.bug_msg.lock();
            if m.is_none() {
                *m = Some(msg.clone());
            }
            self.bugged.store(true, Ordering::Release);
            return Err(Error::Bugged(msg.clone()));
        }
        Ok(())
    }

    /// End of a read-locked operation: if it freed tables, wait for all walkers (take the
    /// write lock) so they can be reused — the model's RCU grace period.
    pub(crate) fn grace_period(&self) {
        let _w = self.mmu_lock.write();
        self.arena.quiesce();
    }

    pub(crate) fn check_gfn(&self, gfn: u64, arg: &str) -> Result<()> {
        if gfn >= self.max_gfn {
            return Err(bad_arg(
                arg,
                format!(
                    "gfn {gfn:#x} is beyond the guest-physical limit; allowed 0..{:#x}",
                    self.max_gfn
                ),
            ));
        }
        Ok(())
    }

    pub(crate) fn check_range(&self, gfn: u64, npages: u64) -> Result<()> {
        self.check_gfn(gfn, "gfn")?;
        if npages == 0 {
            return Err(bad_arg("npages", "must be > 0"));
        }
        if gfn.checked_add(npages).is_none_or(|e| e > self.max_gfn) {
            return Err(bad_arg(
                "npages",
                format!(
                    "range [{gfn:#x}, +{npages:#x}) runs past the guest-physical limit {:#x}",
                    self.max_gfn
                ),
            ));
        }
        Ok(())
    }

    pub(crate) fn check_vcpu(&self, vcpu: u32) -> Result<()> {
        if vcpu >= self.cfg.vcpus {
            return Err(bad_arg(
                "vcpu",
                format!("must be in 0..{}, got {vcpu}", self.cfg.vcpus),
            ));
        }
        Ok(())
    }

    pub(crate) fn check_private(&self, private: Option<bool>) -> Result<Option<bool>> {
        match (self.vm_type, private) {
            (VmType::Default, Some(true)) => Err(bad_arg(
                "private",
                "a default VM has no private memory; use private=False or None",
            )),
            (_, p) => Ok(p),
        }
    }

    /// Do the hooks fire for a change of an entry in `table` during this operation?
    #[inline(always)]
    pub(crate) fn hooks_fire(&self, table: u32, ctx: &Ctx) -> bool {
        match self.design {
            HookDesign::None | HookDesign::Gmem => false,
            HookDesign::Mirror => self.is_mirror_table(table),
            HookDesign::Private => ctx.op_private,
        }
    }

    pub fn finalized(&self) -> bool {
        self.tdx.as_ref().is_some_and(|t| t.module.finalized())
    }

    pub(crate) fn flush_remote_tlbs(&self, ctx: &mut Ctx) {
        ctx.inc(C::remote_tlb_flush_requests);
        ctx.inc(C::remote_tlb_flush);
        ctx.charge(Cost::tlb_flush_base_ns, 1);
        ctx.charge(Cost::tlb_flush_per_vcpu_ns, self.cfg.vcpus as u64);
    }

    // ----- roots -----------------------------------------------------------------------------

    pub fn root_role(&self, mirror: bool) -> u32 {
        self.cfg.levels as u32
            | ROLE_DIRECT
            | ROLE_ACC_ALL
            | ROLE_EFER_NX
            | ROLE_CR0_WP
            | if mirror { ROLE_IS_MIRROR } else { 0 }
    }

    /// `kvm_tdp_mmu_alloc_root`: reuse a valid root with the identical role word, else make a
    /// new one with refcount 2 (this vCPU + the TDP MMU).
    fn alloc_root(&self, ctx: &mut Ctx, mirror: bool) -> Result<u32> {
        let role = self.root_role(mirror);
        let mut roots = self.roots.lock();
        if let Some(r) = roots
            .iter_mut()
            .find(|r| !r.invalid && r.role == role && r.refcount > 0)
        {
            r.refcount += 1;
            return Ok(r.table);
        }
        let flags = SP_ROOT | if mirror { SP_MIRROR } else { 0 };
        let table = self.arena.alloc(self.cfg.levels, 0, flags)?;
        roots.insert(
            0,
            Root {
                table,
                role,
                refcount: 2,
                invalid: false,
                scheduled_to_zap: false,
            },
        );
        ctx.inc(C::roots_allocated);
        Ok(table)
    }

    /// `kvm_mmu_load` for a vCPU without roots: mirror root first (if the VM has one), then
    /// the direct root.
    fn mmu_load(&self, ctx: &mut Ctx, vcpu: usize) -> Result<()> {
        if self.has_mirror && self.vcpu_mirror_root[vcpu].load(Ordering::Acquire) == NO_TABLE {
            let t = self.alloc_root(ctx, true)?;
            self.vcpu_mirror_root[vcpu].store(t, Ordering::Release);
        }
        if self.vcpu_root[vcpu].load(Ordering::Acquire) == NO_TABLE {
            let t = self.alloc_root(ctx, false)?;
            self.vcpu_root[vcpu].store(t, Ordering::Release);
        }
        Ok(())
    }

    /// `kvm_tdp_mmu_put_root`: drop one reference; free at zero (must already be invalid).
    pub(crate) fn put_root_locked(&self, ctx: &mut Ctx, roots: &mut Vec<Root>, table: u32) {
        let Some(pos) = roots.iter().position(|r| r.table == table) else {
            ctx.bug(format!("put of unknown root table {table}"));
            return;
        };
        roots[pos].refcount -= 1;
        if roots[pos].refcount == 0 {
            if !roots[pos].invalid {
                ctx.bug("root refcount reached zero while the root is still valid");
            }
            roots.remove(pos);
            self.arena.free_deferred(table);
            ctx.inc(C::roots_freed);
        }
    }

    /// The newest valid root of the given kind (what `walk`/`spte` inspect).
    pub fn current_root(&self, mirror: bool) -> Option<u32> {
        self.roots
            .lock()
            .iter()
            .find(|r| !r.invalid && r.is_mirror() == mirror)
            .map(|r| r.table)
    }

    pub fn roots_snapshot(&self) -> Vec<Root> {
        self.roots.lock().clone()
    }

    #[inline(always)]
    pub(crate) fn root_gfn_bits(&self, mirror: bool) -> u64 {
        if mirror { 0 } else { self.gfn_direct_bits }
    }

    // ----- the fault path ----------------------------------------------------------------------

    /// One EPT-violation-style fault, as the guest would take it.
    pub fn fault(
        &self,
        gfn: u64,
        private: Option<bool>,
        write: bool,
        exec: bool,
        vcpu: u32,
    ) -> Result<FaultResult> {
        self.ensure_alive()?;
        self.check_gfn(gfn, "gfn")?;
        self.check_vcpu(vcpu)?;
        let is_private = self.check_private(private)?;
        let mut ctx = Ctx::new(&self.costs, self.cfg.trace);
        let r = {
            let st = self.mmu_lock.read();
            self.page_fault(
                &st,
                &mut ctx,
                gfn,
                is_private,
                write,
                exec,
                vcpu as usize,
                false,
            )
        };
        if self.arena_has_deferred() {
            self.grace_period();
        }
        let r = r?;
        self.finish(&ctx)?;
        Ok(r)
    }

    #[inline(always)]
    pub(crate) fn arena_has_deferred(&self) -> bool {
        self.arena.has_deferred()
    }

    /// Faults for a batch of gfns on one vCPU, one read-lock hold per batch.
    pub fn fault_batch(
        &self,
        gfns: &[u64],
        private: Option<bool>,
        write: bool,
        exec: bool,
        vcpu: u32,
        out: &mut [u8],
    ) -> Result<()> {
        self.ensure_alive()?;
        self.check_vcpu(vcpu)?;
        let is_private = self.check_private(private)?;
        if let Some((i, g)) = gfns.iter().enumerate().find(|(_, g)| **g >= self.max_gfn) {
            return Err(bad_arg(
                "gfns",
                format!(
                    "gfns[{i}] = {g:#x} is beyond the guest-physical limit; allowed 0..{:#x}",
                    self.max_gfn
                ),
            ));
        }
        assert_eq!(gfns.len(), out.len());
        let mut ctx = Ctx::new(&self.costs, self.cfg.trace);
        let mut err = None;
        {
            let st = self.mmu_lock.read();
            for (g, o) in gfns.iter().zip(out.iter_mut()) {
                match self.page_fault(
                    &st,
                    &mut ctx,
                    *g,
                    is_private,
                    write,
                    exec,
                    vcpu as usize,
                    false,
                ) {
                    Ok(r) => *o = r.ret as u8,
                    Err(e) => {
                        err = Some(e);
                        break;
                    }
                }
                if ctx.bug.is_some() {
                    break;
                }
            }
        }
        if self.arena_has_deferred() {
            self.grace_period();
        }
        let fin = self.finish(&ctx);
        if let Some(e) = err {
            return Err(e);
        }
        fin
    }

    /// One fault as the vCPU takes it: the exit, then `kvm_mmu_page_fault`; a TDX private
    /// fault that returns RETRY is retried inside KVM without re-entering the guest.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn page_fault(
        &self,
        st: &MmuState,
        ctx: &mut Ctx,
        gfn: u64,
        private: Option<bool>,
        write: bool,
        exec: bool,
        vcpu: usize,
        prefetch: bool,
    ) -> Result<FaultResult> {
        let start_ns = ctx.modeled_ns;
        let is_private = match private {
            Some(p) => p,
            None => self.vm_type.confidential() && st.attrs.is_private(gfn),
        };
        if let Some(t) = &self.tdx
            && !prefetch
            && !t.module.finalized()
        {
            return Err(bad_arg(
                "vm",
                "the TD is not finalized: no vCPU can run yet (use populate, then finalize)",
            ));
        }
        let exit_ns = if self.vm_type == VmType::Tdx {
            Cost::td_exit_entry_ns
        } else {
            Cost::exit_entry_ns
        };
        if !prefetch {
            ctx.charge(exit_ns, 1);
        }
        // TDX forces private faults to writes (private pages are always RWX in S-EPT).
        let write = write || (is_private && self.vm_type == VmType::Tdx);
        let mut retries = 0;
        loop {
            let mut r =
                self.kvm_mmu_page_fault(st, ctx, gfn, is_private, write, exec, vcpu, prefetch)?;
            let local_retry = r.ret == Ret::Retry
                && is_private
                && self.vm_type == VmType::Tdx
                && !prefetch
                && ctx.bug.is_none()
                && retries < self.cfg.tdx.max_local_retries;
            if local_retry {
                retries += 1;
                ctx.inc(C::tdx_local_retries);
                continue;
            }
            if matches!(r.ret, Ret::Fixed | Ret::Spurious)
                && is_private
                && !prefetch
                && let Some(t) = &self.tdx
                && self.design != HookDesign::None
                && !self.user_hooks
            {
                // Back in the guest, TDG.MEM.PAGE.ACCEPT turns the AUGed page into a mapped one.
                t.module.accept(ctx, gfn);
            }
            r.retries = retries;
            r.modeled_ns = ctx.modeled_ns - start_ns;
            return Ok(r);
        }
    }

    /// `kvm_mmu_do_page_fault` + `kvm_tdp_mmu_page_fault` + `kvm_tdp_mmu_map`, under the read lock.
    #[allow(clippy::too_many_arguments)]
    fn kvm_mmu_page_fault(
        &self,
        st: &MmuState,
        ctx: &mut Ctx,
        gfn: u64,
        is_private: bool,
        write: bool,
        exec: bool,
        vcpu: usize,
        prefetch: bool,
    ) -> Result<FaultResult> {
        // An exit's handling is charged per fault; a pre-fault (populate) only per leaf it
        // installs (docs/model.md).
        if !prefetch {
            ctx.charge(Cost::fault_handling_ns, 1);
        }
        if self.vcpu_root[vcpu].load(Ordering::Acquire) == NO_TABLE {
            self.mmu_load(ctx, vcpu)?;
        }
        let mirror = self.has_mirror && is_private;
        let root = if mirror {
            self.vcpu_mirror_root[vcpu].load(Ordering::Acquire)
        } else {
            self.vcpu_root[vcpu].load(Ordering::Acquire)
        };
        let gfn_bits = self.root_gfn_bits(mirror);
        let slot = st.memslots.find(gfn);
        let done = |ret, level, spte| FaultResult {
            ret,
            level,
            retries: 0,
            modeled_ns: 0.0,
            spte,
            gfn,
            private: is_private,
        };

        // MMIO cache: a current-generation MMIO SPTE is handled without a page fault.
        if slot.is_none() && !prefetch && !is_private {
            let (level, s) = self.lookup(root, gfn, gfn_bits);
            if level == 1
                && is_mmio(s)
                && mmio_generation(s) == st.memslots.generation & spte::MMIO_GEN_MASK
            {
                return Ok(done(Ret::Emulate, 1, s));
            }
        }
        if !prefetch {
            ctx.inc(C::pf_taken);
        }
        // kvm_mmu_faultin_pfn: the access must match the attribute, and private memory must
        // come from guest_memfd; otherwise userspace gets KVM_EXIT_MEMORY_FAULT.
        let mismatch = self.vm_type.confidential() && is_private != st.attrs.is_private(gfn);
        let no_gmem = is_private && slot.is_none_or(|s| !s.gmem);
        if mismatch || no_gmem {
            if !prefetch {
                ctx.inc(C::pf_memory_fault);
            }
            let (level, s) = self.lookup(root, gfn, gfn_bits);
            return Ok(done(Ret::MemoryFault, level, s));
        }
        let mut f = KvmPageFault {
            gfn,
            write,
            exec,
            prefetch,
            max_level: 1,
            req_level: 1,
            goal_level: 1,
            pfn: 0,
            huge_page_disallowed: false,
            mmio: slot.is_none(),
            level: 1,
            spte: SHADOW_NONPRESENT_VALUE,
        };
        if let Some(s) = slot {
            self.faultin_pfn(ctx, s, &mut f, is_private);
            if self.vm_type.confidential() {
                // Mixed private/shared ranges cannot be mapped huge (KVM_LPAGE_MIXED_FLAG).
                while f.max_level > 1 {
                    let base = spte::round_gfn(gfn, f.max_level);
                    if st.attrs.uniform(base, base + pages_per_level(f.max_level))
                        == Some(is_private)
                    {
                        break;
                    }
                    f.max_level -= 1;
                }
            }
            self.hugepage_adjust(&mut f);
        } else {
            // MMIO: 4K, but an exec fault still marks the tables it links NX-disallowed.
            self.hugepage_adjust(&mut f);
        }
        ctx.op_private = is_private;
        let ret = self.tdp_mmu_map(ctx, &mut f, root, gfn_bits, st.memslots.generation);
        ctx.op_private = false;
        let ret = ret?;
        if prefetch && ret == Ret::Fixed {
            ctx.charge(Cost::fault_handling_ns, 1);
        }
        if !prefetch {
            match ret {
                Ret::Fixed => ctx.inc(C::pf_fixed),
                Ret::Spurious => ctx.inc(C::pf_spurious),
                Ret::Emulate => ctx.inc(C::pf_emulate),
                Ret::Retry => ctx.inc(C::pf_retry),
                Ret::WriteProtected => ctx.inc(C::pf_write_protected),
                Ret::MemoryFault => ctx.inc(C::pf_memory_fault),
                Ret::Continue | Ret::Invalid => {}
            }
        }
        if ret == Ret::Fixed
            && is_private
            && !prefetch
            && self.vm_type == VmType::Snp
            && let Some(s) = slot
        {
            self.snp_guest_validate(ctx, s, gfn);
        }
        Ok(done(ret, f.level, f.spte))
    }

    /// `kvm_mmu_faultin_pfn`: shared pages come from the host mapping (allocated on first
    /// touch), private ones from guest_memfd, whose folio size and (SNP) RMP entry cap the level.
    fn faultin_pfn(&self, ctx: &mut Ctx, slot: &Memslot, f: &mut KvmPageFault, private: bool) {
        let first = if private {
            slot.touch_gmem(f.gfn)
        } else {
            slot.touch(f.gfn)
        };
        if first {
            ctx.inc(C::host_pages_allocated);
            ctx.charge(Cost::host_page_alloc_ns, 1);
            ctx.charge(Cost::host_zero_4k_ns, pages_per_level(slot.level) - 1);
        }
        if !private {
            f.pfn = slot.pfn(f.gfn);
            f.max_level = slot.level;
            return;
        }
        f.pfn = slot.gmem_pfn(f.gfn);
        f.max_level = if self.has_mirror {
            // TDX (and the mirrored SW_PROTECTED variant): private memory is mapped at 4K.
            1
        } else {
            slot.level.min(self.cfg.folio_level)
        };
        if let Some(rmp) = slot.rmp.as_ref() {
            let off = f.gfn - slot.gfn;
            if self.design == HookDesign::Gmem && !Rmp::assigned(rmp.get(off)) {
                // kvm_gmem_get_pfn → kvm_arch_gmem_prepare (sev_gmem_prepare).
                ctx.inc(C::gmem_prepare);
                let st = rmp.gmem_prepare(ctx, off, f.gfn);
                if st != crate::snp::RmpStatus::Success {
                    ctx.bug(format!(
                        "gmem prepare RMPUPDATE failed for gfn {:#x}: {}",
                        f.gfn,
                        st.name()
                    ));
                }
            }
            // sev_private_max_mapping_level: the RMP entry's size, 4K if unassigned.
            f.max_level = f.max_level.min(rmp.level(off));
        }
    }

    /// The SNP guest validates a page it has just been given (PVALIDATE), if it is not yet.
    fn snp_guest_validate(&self, ctx: &mut Ctx, slot: &Memslot, gfn: u64) {
        let Some(rmp) = slot.rmp.as_ref() else { return };
        let off = gfn - slot.gfn;
        let e = rmp.get(off);
        if !Rmp::assigned(e) || Rmp::validated(e) {
            return;
        }
        let (o, g, two_m) = if Rmp::is_2m(e) {
            (off & !511, gfn & !511, true)
        } else {
            (off, gfn, false)
        };
        let st = rmp.pvalidate(ctx, o, g, two_m, true);
        if st != crate::snp::RmpStatus::Success {
            ctx.bug(format!(
                "guest PVALIDATE of gfn {gfn:#x} failed: {}",
                st.name()
            ));
        }
    }

    /// `kvm_mmu_hugepage_adjust`.
    fn hugepage_adjust(&self, f: &mut KvmPageFault) {
        f.huge_page_disallowed = f.exec && self.cfg.nx_huge_pages;
        if f.max_level == 1 {
            return;
        }
        f.req_level = f.max_level;
        if f.huge_page_disallowed {
            return;
        }
        f.goal_level = f.req_level;
        f.pfn &= !(pages_per_level(f.goal_level) - 1);
    }

    /// `disallowed_hugepage_adjust`: do not re-create a huge page over a table that an exec
    /// fault had to split for the NX workaround.
    #[inline(always)]
    fn disallowed_hugepage_adjust(&self, f: &mut KvmPageFault, spte: u64, level: u8) {
        if level > 1
            && level == f.goal_level
            && is_shadow_present(spte)
            && !is_large(spte)
            && self.child_nx_disallowed(spte)
        {
            let mask = pages_per_level(level) - pages_per_level(level - 1);
            f.pfn |= f.gfn & mask;
            f.goal_level -= 1;
        }
    }

    fn child_nx_disallowed(&self, spte: u64) -> bool {
        match self.arena.idx_of_pfn(spte::spte_to_pfn(spte)) {
            Some(c) => self.arena.meta(c).flags.load(Ordering::Relaxed) & SP_NX_DISALLOWED != 0,
            None => false,
        }
    }

    /// `kvm_tdp_mmu_map`.
    fn tdp_mmu_map(
        &self,
        ctx: &mut Ctx,
        f: &mut KvmPageFault,
        root: u32,
        gfn_bits: u64,
        generation: u64,
    ) -> Result<Ret> {
        let mirror = self.has_mirror && self.is_mirror_table(root);
        let mut it = TdpIter::start(&self.arena, root, self.cfg.levels, 1, f.gfn, gfn_bits);
        let end = f.gfn + 1;
        let mut at_goal = false;
        while it.in_range(end) {
            if self.cfg.nx_huge_pages {
                self.disallowed_hugepage_adjust(f, it.old_spte, it.level);
            }
            if is_frozen(it.old_spte) {
                return Ok(Ret::Retry);
            }
            if it.level == f.goal_level {
                at_goal = true;
                break;
            }
            let s = it.old_spte;
            if is_shadow_present(s) && !is_large(s) {
                it.next_single();
                continue;
            }
            let flags = (if mirror { SP_MIRROR } else { 0 })
                | if f.huge_page_disallowed {
                    SP_NX_DISALLOWED
                } else {
                    0
                };
            let child = self.arena.alloc(it.level - 1, it.gfn, flags)?;
            let r = if is_shadow_present(s) {
                if mirror {
                    ctx.bug("fault would split a huge mirror SPTE");
                    self.arena.free_now(child);
                    return Ok(Ret::Retry);
                }
                self.split_huge_page(ctx, &mut it, child)
            } else {
                self.link_sp(ctx, &mut it, child)
            };
            if r.is_err() {
                self.arena.free_now(child);
                return Ok(Ret::Retry);
            }
            it.next_single();
        }
        if !at_goal {
            return Ok(Ret::Retry);
        }
        self.map_handle_target_level(ctx, f, &mut it, generation)
    }

    /// `tdp_mmu_map_handle_target_level`.
    fn map_handle_target_level(
        &self,
        ctx: &mut Ctx,
        f: &mut KvmPageFault,
        it: &mut TdpIter<'_>,
        generation: u64,
    ) -> Result<Ret> {
        let old = it.old_spte;
        f.level = it.level;
        f.spte = old;
        if is_shadow_present(old)
            && is_last(old, it.level)
            && (f.prefetch || access_allowed(old, f.write, f.exec))
        {
            return Ok(Ret::Spurious);
        }
        let new = if f.mmio {
            make_mmio_spte(f.gfn, generation)
        } else {
            let exec = !(self.cfg.nx_huge_pages && it.level > 1);
            make_leaf_spte(f.pfn, it.level, exec, f.prefetch)
        };
        if new == old {
            return Ok(Ret::Spurious);
        }
        if self.set_spte_atomic(ctx, it, new).is_err() {
            return Ok(Ret::Retry);
        }
        f.spte = new;
        if is_shadow_present(old) && !is_last(old, it.level) {
            self.flush_remote_tlbs(ctx);
        }
        if f.mmio {
            ctx.inc(C::pf_mmio_spte_created);
            return Ok(Ret::Emulate);
        }
        Ok(Ret::Fixed)
    }

    /// The entry that maps `gfn` in `root` (a leaf, or the first non-present entry): (level, spte).
    pub(crate) fn lookup(&self, root: u32, gfn: u64, gfn_bits: u64) -> (u8, u64) {
        // No allocation: memstress's "hardware walk" calls this for every access.
        let mut last = (self.cfg.levels, SHADOW_NONPRESENT_VALUE);
        self.walk_path(root, gfn, gfn_bits, |level, s| last = (level, s));
        last
    }

    /// Entries on the path from `root` to `gfn`, stopping after a leaf or a non-present entry.
    pub fn walk_root(&self, root: u32, gfn: u64, gfn_bits: u64) -> Vec<(u8, u64)> {
        let mut out = Vec::with_capacity(self.cfg.levels as usize);
        self.walk_path(root, gfn, gfn_bits, |level, s| out.push((level, s)));
        out
    }

    /// Visit the path from `root` to `gfn`; an already-aliased gfn visits nothing (as
    /// `tdp_iter_start` refuses it).
    fn walk_path(&self, root: u32, gfn: u64, gfn_bits: u64, mut visit: impl FnMut(u8, u64)) {
        if gfn_bits != 0 && gfn >= gfn_bits {
            return;
        }
        let mut table = root;
        let mut level = self.cfg.levels;
        loop {
            let s = self
                .arena
                .entry(table, spte::index(gfn | gfn_bits, level))
                .load(Ordering::Acquire);
            visit(level, s);
            if !is_shadow_present(s) || is_last(s, level) {
                return;
            }
            match self.arena.idx_of_pfn(spte::spte_to_pfn(s)) {
                Some(c) => table = c,
                None => return,
            }
            level -= 1;
        }
    }

    pub fn walk(&self, gfn: u64, private: bool) -> Result<Vec<(u8, u64)>> {
        self.check_gfn(gfn, "gfn")?;
        let mirror = self.has_mirror && private;
        if private && !self.has_mirror {
            self.check_private(Some(true))?;
        }
        let _st = self.mmu_lock.read();
        Ok(match self.current_root(mirror) {
            Some(root) => self.walk_root(root, gfn, self.root_gfn_bits(mirror)),
            None => Vec::new(),
        })
    }

    pub fn spte(&self, gfn: u64, private: bool) -> Result<u64> {
        Ok(self
            .walk(gfn, private)?
            .last()
            .map(|e| e.1)
            .unwrap_or(SHADOW_NONPRESENT_VALUE))
    }
}
