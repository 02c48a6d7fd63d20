//! Modeled time at scale: N simulated vCPUs (and the userfaultfd readers and the page
//! remover that serve or disturb them) run the real fault path on the real tables on one host
//! thread, interleaved in modeled-time order by a deterministic discrete-event engine
//! (`engine`). Shared resources — `mmu_lock`, the host memory path, userfaultfd, IPIs, the
//! TDX module's locks — are mechanisms whose parameters come from per-operation figures
//! (docs/costs.md), so how a design scales emerges from them.

mod engine;
mod machine;

pub use engine::{ActorKind, PCP_BATCH, Userfault};
pub use machine::{Machine, Place};

use std::cell::RefCell;
use std::time::Instant;

use corosensei::stack::DefaultStack;
use corosensei::{Coroutine, CoroutineResult};

use crate::cost::{NCOSTS, NWAITS, Wait};
use crate::error::{Error, Result, bad_arg};
use crate::memstress::{Lcg, MAX_ATTEMPTS_PER_ACCESS, MemstressArgs};
use crate::mmu::Mmu;
use crate::op::{MmuState, Ops};
use crate::page_fault::Ret;
use crate::sim::{self, Env};
use crate::stats::Ctx;
use engine::{Engine, EngineConfig};

/// Stack of each simulated thread (virtual memory; only the pages a thread touches are
/// committed).
const STACK_BYTES: usize = 256 * 1024;

/// Upper bound on simulated vCPUs.
pub const MAX_VIRTUAL_VCPUS: u32 = 4096;

/// A virtual-time run: memstress-shaped guest accesses on every vCPU plus the knobs of the
/// shared resources.
#[derive(Debug, Clone)]
pub struct VtArgs {
    pub ms: MemstressArgs,
    /// Times each vCPU walks its slice (1: first touch only). 0: until the remover is done.
    pub passes: u32,
    /// Faults take `mmu_lock` for write (KVM before parallel TDP MMU faults) instead of read.
    pub exclusive: bool,
    pub userfault: Userfault,
    /// One userfaultfd for all vCPUs (`-a`) instead of one per vCPU.
    pub uffd_all: bool,
    /// Reader threads per userfaultfd (`-r`).
    pub uffd_readers: u32,
    /// Userspace handling delay per fault (`-d`), ns.
    pub uffd_delay_ns: f64,
    pub machine: Machine,
    /// TDX module 1.0 lock table (AUG/SEPT.ADD exclusive) instead of 1.5's.
    pub tdx_module_1_0: bool,
    /// A host thread zapping these private pages one at a time under `mmu_lock` for write
    /// (`(gfn, npages)`), while the vCPUs run.
    pub remove: Option<(u64, u64)>,
    /// The selftests' `-c` pinning: vCPU `i` runs on CPU `cpus[i]` of `machine` (empty: on
    /// CPU `i`). The userfaultfd readers and the remover take the lowest CPUs no vCPU is
    /// pinned to.
    pub cpus: Vec<u32>,
}

impl Default for VtArgs {
    /// One vCPU writing one page at gfn 0, once, with every option at its default (faults
    /// take `mmu_lock` for read, anonymous memory, the default machine, TDX module 1.5).
    fn default() -> Self {
        Self {
            ms: MemstressArgs {
                vcpus: 1,
                pages_per_vcpu: 1,
                base_gfn: 0,
                overlap: false,
                random_access: false,
                write_percent: 100,
                seed: 0,
                rng_skip: 0,
                private: None,
            },
            passes: 1,
            exclusive: false,
            userfault: Userfault::None,
            uffd_all: false,
            uffd_readers: 1,
            uffd_delay_ns: 0.0,
            machine: Machine::default(),
            tdx_module_1_0: false,
            remove: None,
            cpus: Vec::new(),
        }
    }
}

/// One simulated vCPU's explicit guest accesses (a guest loop that is not memstress-shaped,
/// e.g. `kvm_page_table_test`'s stages): the pages it touches, in order.
#[derive(Debug, Clone, Default)]
pub struct AccessList {
    pub gfns: Vec<u64>,
    /// Whether each access writes: one entry for all of them, or one per gfn.
    pub writes: Vec<bool>,
}

impl AccessList {
    /// Whether access `i` writes.
    #[inline(always)]
    fn write(&self, i: usize) -> bool {
        self.writes[if self.writes.len() == 1 { 0 } else { i }]
    }
}

/// Where the simulated vCPUs' guest accesses come from.
#[derive(Debug, Clone, Copy)]
enum Source<'a> {
    /// `VtArgs::ms`: memstress's slices.
    Memstress,
    /// vCPU `i` walks `lists[i]`.
    Lists(&'a [AccessList]),
}

/// One vCPU's next guest access (gfn, write), from its source. Nothing is allocated per
/// access.
enum Feed<'a> {
    Memstress {
        ms: &'a MemstressArgs,
        rng: Lcg,
        base: u64,
        i: u64,
    },
    List {
        list: &'a AccessList,
        i: usize,
    },
}

impl Feed<'_> {
    /// Back to the first access of the slice or list (a new pass); memstress's generator
    /// keeps its state, as the guest's does.
    fn rewind(&mut self) {
        match self {
            Feed::Memstress { i, .. } => *i = 0,
            Feed::List { i, .. } => *i = 0,
        }
    }

    #[inline(always)]
    fn next(&mut self) -> Option<(u64, bool)> {
        match self {
            Feed::Memstress { ms, rng, base, i } => {
                if *i >= ms.pages_per_vcpu {
                    return None;
                }
                let off = if ms.random_access {
                    rng.next_u32() as u64 % ms.pages_per_vcpu
                } else {
                    *i
                };
                let write = ms.write_percent == 100 || (rng.next_u32() % 100) < ms.write_percent;
                *i += 1;
                Some((*base + off, write))
            }
            Feed::List { list, i } => {
                let gfn = *list.gfns.get(*i)?;
                let write = list.write(*i);
                *i += 1;
                Some((gfn, write))
            }
        }
    }
}

/// One simulated vCPU's outcome.
#[derive(Debug, Clone, Copy, Default)]
pub struct VtVcpu {
    /// Its modeled clock when it finished.
    pub modeled_ns: f64,
    /// Guest accesses made; each is a hit or ends in one final fault outcome.
    pub accesses: u64,
    pub hits: u64,
    /// Fault attempts (every exit, retries included).
    pub faults: u64,
    pub fixed: u64,
    pub spurious: u64,
    pub retry: u64,
    pub emulate: u64,
    /// Memory-fault exits of writes to shared pages the host mapped read-only (mprotect):
    /// KVM_RUN returned -EFAULT, userspace skipped the store and re-entered; the access
    /// ends there.
    pub memory_fault: u64,
    pub write_protected: u64,
    /// Retries KVM did inside one exit (TDX local retries).
    pub local_retries: u64,
}

/// A virtual-time run's outcome.
#[derive(Debug, Clone)]
pub struct VtResult {
    pub vcpus: Vec<VtVcpu>,
    /// Modeled time from the start to the last vCPU's end.
    pub elapsed_ns: f64,
    /// The vCPUs' ledger (units per cost field) and waits, summed over vCPUs.
    pub units: [i64; NCOSTS],
    pub waits: [f64; NWAITS],
    /// The same for the userfaultfd readers and the remover (host threads).
    pub host_units: [i64; NCOSTS],
    pub host_waits: [f64; NWAITS],
    pub lock_acquires: u64,
    pub lock_contended: u64,
    /// Pages the remover zapped and its modeled time doing it.
    pub removed: u64,
    pub remove_ns: f64,
    /// Engine scheduling points and thread switches.
    pub steps: u64,
    pub switches: u64,
    pub wall_s: f64,
}

/// What the VM tells the run about itself.
pub struct VmSide<'a> {
    pub mmu: &'a Mmu,
    pub ops: &'a Ops,
    pub max_vcpus: u32,
    /// A TD whose vCPUs enter through the TDX module (TDH.VP.ENTER takes the epoch lock).
    pub td: bool,
    /// Modeled exit + re-entry of this VM type.
    pub exit_ns: f64,
}

/// The run's options, for `n` vCPUs making accesses of kind `private`; the memstress shape
/// only when the accesses come from it.
fn validate(a: &VtArgs, n: u32, private: Option<bool>, src: Source<'_>) -> Result<()> {
    a.machine.validate()?;
    let vcpus_arg = match src {
        Source::Memstress => "vcpus",
        Source::Lists(_) => "gfns_per_vcpu",
    };
    if n == 0 || n > MAX_VIRTUAL_VCPUS {
        return Err(bad_arg(
            vcpus_arg,
            format!("must give 1..={MAX_VIRTUAL_VCPUS} vCPUs, got {n}"),
        ));
    }
    if let Source::Memstress = src {
        if a.ms.pages_per_vcpu == 0 {
            return Err(bad_arg("pages_per_vcpu", "must be > 0"));
        }
        if a.ms.write_percent > 100 {
            return Err(bad_arg(
                "write_percent",
                format!("must be in 0..=100, got {}", a.ms.write_percent),
            ));
        }
    }
    if a.passes == 0 && a.remove.is_none() {
        return Err(bad_arg(
            "passes",
            "must be >= 1 (0 = until the remover is done, which needs `remove`)",
        ));
    }
    if a.userfault != Userfault::None && !(1..=64).contains(&a.uffd_readers) {
        return Err(bad_arg(
            "uffd_readers",
            format!("must be in 1..=64, got {}", a.uffd_readers),
        ));
    }
    if !(a.uffd_delay_ns.is_finite() && a.uffd_delay_ns >= 0.0) {
        return Err(bad_arg(
            "uffd_delay",
            format!("must be a finite number >= 0, got {}", a.uffd_delay_ns),
        ));
    }
    if !a.cpus.is_empty() {
        if a.cpus.len() != n as usize {
            return Err(bad_arg(
                "cpus",
                format!(
                    "pinning is all or nothing: {} CPUs given for {n} vCPUs",
                    a.cpus.len(),
                ),
            ));
        }
        let ncpus = a.machine.cpus();
        let mut seen = std::collections::HashSet::new();
        for (i, &c) in a.cpus.iter().enumerate() {
            if c >= ncpus {
                return Err(bad_arg(
                    "cpus",
                    format!("vCPU {i}: CPU {c} is not in the machine's 0..{ncpus}"),
                ));
            }
            if !seen.insert(c) {
                return Err(bad_arg(
                    "cpus",
                    format!(
                        "vCPU {i}: CPU {c} already runs another vCPU (two vCPUs time-sharing \
                         one CPU are not modeled)"
                    ),
                ));
            }
        }
    }
    if a.userfault != Userfault::None && private == Some(true) {
        return Err(bad_arg(
            "userfault",
            "userfaultfd and memory-fault exits resolve shared (host-mapped) memory; the \
             workload is private",
        ));
    }
    Ok(())
}

#[derive(Default)]
struct Slot {
    ctx: Option<Ctx>,
    vcpu: VtVcpu,
    err: Option<Error>,
    removed: u64,
}

/// Run `a` in virtual time. The caller holds `mmu_lock` for read (`st`) for the whole run:
/// the run is one operation on the VM; inside it the engine's own `mmu_lock` orders the
/// simulated threads.
pub fn run(vm: &VmSide<'_>, st: &MmuState, a: &VtArgs) -> Result<VtResult> {
    run_source(vm, st, a, a.ms.vcpus, a.ms.private, Source::Memstress)
}

/// Run explicit per-vCPU access lists in virtual time: vCPU `i` walks `lists[i]` (`passes`
/// times), with `a`'s options; `a.ms` (the memstress shape) is not used. The caller has
/// checked that every gfn is in a memslot and holds `mmu_lock` for read (`st`), as for `run`.
pub fn run_lists(
    vm: &VmSide<'_>,
    st: &MmuState,
    lists: &[AccessList],
    private: Option<bool>,
    a: &VtArgs,
) -> Result<VtResult> {
    for (v, l) in lists.iter().enumerate() {
        if l.writes.len() != 1 && l.writes.len() != l.gfns.len() {
            return Err(bad_arg(
                "writes_per_vcpu",
                format!(
                    "vCPU {v}: {} entries for {} gfns; give one or one per gfn",
                    l.writes.len(),
                    l.gfns.len()
                ),
            ));
        }
    }
    let n = u32::try_from(lists.len()).unwrap_or(u32::MAX);
    run_source(vm, st, a, n, private, Source::Lists(lists))
}

fn run_source(
    vm: &VmSide<'_>,
    st: &MmuState,
    a: &VtArgs,
    n: u32,
    private: Option<bool>,
    src: Source<'_>,
) -> Result<VtResult> {
    validate(a, n, private, src)?;
    if n > vm.max_vcpus {
        return Err(bad_arg(
            match src {
                Source::Memstress => "vcpus",
                Source::Lists(_) => "gfns_per_vcpu",
            },
            format!(
                "must give 1..={} vCPUs (the VM's vcpus), got {n}",
                vm.max_vcpus
            ),
        ));
    }
    let stock_uffd = matches!(a.userfault, Userfault::Missing | Userfault::Minor);
    let nuffd = if !stock_uffd {
        0
    } else if a.uffd_all {
        1
    } else {
        n as usize
    };
    let vcpu_cpu = |v: u32| a.cpus.get(v as usize).copied().unwrap_or(v);
    let mut actors: Vec<(ActorKind, u32, usize)> = (0..n)
        .map(|v| {
            let uffd = if a.uffd_all { 0 } else { v as usize };
            (ActorKind::Vcpu, vcpu_cpu(v), uffd)
        })
        .collect();
    // Host threads: the next CPUs after the vCPUs' (unpinned), or the lowest free ones.
    let taken: std::collections::HashSet<u32> = actors.iter().map(|x| x.1).collect();
    let mut cpu = if a.cpus.is_empty() { n } else { 0 };
    let mut next_cpu = || {
        while !a.cpus.is_empty() && taken.contains(&cpu) {
            cpu += 1;
        }
        cpu += 1;
        cpu - 1
    };
    for u in 0..nuffd {
        for _ in 0..a.uffd_readers {
            actors.push((ActorKind::Reader, next_cpu(), u));
        }
    }
    if a.remove.is_some() {
        actors.push((ActorKind::Remover, next_cpu(), 0));
    }
    let engine = Engine::new(
        EngineConfig {
            machine: a.machine,
            costs: *vm.ops.costs(),
            exclusive_faults: a.exclusive,
            userfault: a.userfault,
            uffds: nuffd,
            uffd_delay_ns: a.uffd_delay_ns,
            tdx_sept_exclusive_aug: a.tdx_module_1_0,
            exit_ns: vm.exit_ns,
        },
        actors.clone(),
    );
    let slots: RefCell<Vec<Slot>> =
        RefCell::new((0..actors.len()).map(|_| Slot::default()).collect());
    let start = Instant::now();
    let engine_ref = &engine;
    let slots_ref = &slots;
    let mut cos: Vec<Coroutine<(), (), ()>> = Vec::with_capacity(actors.len());
    for (i, &(kind, _, _)) in actors.iter().enumerate() {
        let stack = DefaultStack::new(STACK_BYTES)
            .map_err(|e| Error::OutOfMemory(format!("simulated thread stack: {e}")))?;
        let i = i as u32;
        let body = move |y: &corosensei::Yielder<(), ()>, ()| {
            engine_ref.set_yielder(i, y);
            let mut ctx = vm.ops.ctx();
            let mut slot = Slot::default();
            match kind {
                ActorKind::Vcpu => {
                    let feed = match src {
                        Source::Memstress => Feed::Memstress {
                            ms: &a.ms,
                            rng: Lcg::for_vcpu(&a.ms, i),
                            base: if a.ms.overlap {
                                a.ms.base_gfn
                            } else {
                                a.ms.base_gfn + i as u64 * a.ms.pages_per_vcpu
                            },
                            i: 0,
                        },
                        Source::Lists(l) => Feed::List {
                            list: &l[i as usize],
                            i: 0,
                        },
                    };
                    vcpu(vm, st, a, private, feed, engine_ref, i, &mut ctx, &mut slot)
                }
                ActorKind::Reader => engine_ref.reader(&mut ctx),
                ActorKind::Remover => remover(vm, a, engine_ref, &mut ctx, &mut slot),
            }
            if slot.err.is_some() || ctx.bug.is_some() {
                engine_ref.stop(ctx.modeled_ns);
            }
            slot.ctx = Some(ctx);
            slots_ref.borrow_mut()[i as usize] = slot;
        };
        // SAFETY: every coroutine borrows only data that outlives `cos` (declared after
        // them), and each is run to completion or unwound when `cos` is dropped.
        cos.push(unsafe { Coroutine::with_stack_unchecked(stack, body) });
    }
    let mut vcpus_left = n;
    let mut interrupted = false;
    let mut pops = 0u64;
    sim::with_env(&engine, || {
        while let Some(i) = engine.pop() {
            if let CoroutineResult::Return(()) = cos[i as usize].resume(()) {
                engine.finish_actor(i);
                let kind = actors[i as usize].0;
                if kind == ActorKind::Vcpu {
                    vcpus_left -= 1;
                }
                let t = slots.borrow()[i as usize]
                    .ctx
                    .as_ref()
                    .map_or(0.0, |c| c.modeled_ns);
                // Readers serve until the vCPUs are done; vCPUs of an open-ended run until
                // the remover is.
                if (vcpus_left == 0 || kind == ActorKind::Remover) && !engine.stopped() {
                    engine.stop(t);
                }
            }
            pops += 1;
            if pops.is_multiple_of(1 << 16) && !interrupted && crate::op::interrupted() {
                interrupted = true;
                engine.stop(0.0);
            }
        }
    });
    let stuck = engine.stuck();
    drop(cos);
    let wall_s = start.elapsed().as_secs_f64();
    let slots = slots.into_inner();
    // Merge every thread's counters and ledger into the VM (their work is real).
    let mut first_err = None;
    for s in &slots {
        if let Some(c) = &s.ctx
            && let Err(e) = vm.ops.finish(c)
        {
            first_err = first_err.or(Some(e));
        }
    }
    for s in slots.iter() {
        if let Some(e) = &s.err
            && (first_err.is_none() || matches!(e, Error::Bugged(_)))
        {
            first_err = Some(e.clone());
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    if interrupted {
        return Err(Error::Interrupted);
    }
    if !stuck.is_empty() {
        return Err(Error::Invariant(format!(
            "virtual-time run ended with {} simulated threads blocked forever: {:?}",
            stuck.len(),
            &stuck[..stuck.len().min(8)]
        )));
    }
    let (steps, switches, lock_acquires, lock_contended) = engine.counts();
    let mut r = VtResult {
        vcpus: Vec::with_capacity(n as usize),
        elapsed_ns: 0.0,
        units: [0; NCOSTS],
        waits: [0.0; NWAITS],
        host_units: [0; NCOSTS],
        host_waits: [0.0; NWAITS],
        lock_acquires,
        lock_contended,
        removed: 0,
        remove_ns: 0.0,
        steps,
        switches,
        wall_s,
    };
    for (s, &(kind, _, _)) in slots.iter().zip(actors.iter()) {
        let Some(c) = &s.ctx else { continue };
        let (units, waits) = if kind == ActorKind::Vcpu {
            r.vcpus.push(s.vcpu);
            r.elapsed_ns = r.elapsed_ns.max(c.modeled_ns);
            (&mut r.units, &mut r.waits)
        } else {
            (&mut r.host_units, &mut r.host_waits)
        };
        for (x, y) in units.iter_mut().zip(c.units.iter()) {
            *x += *y;
        }
        for (x, y) in waits.iter_mut().zip(c.waits.iter()) {
            *x += *y;
        }
        if kind == ActorKind::Remover {
            r.removed = s.removed;
            r.remove_ns = c.modeled_ns;
        }
    }
    Ok(r)
}

/// Whether a fault that returned MEMORY_FAULT did so because the host maps the shared page
/// read-only (mprotect: `hva_to_pfn` cannot get a writable page, KVM_RUN returns -EFAULT)
/// rather than because the access does not match the page's attribute (or private memory
/// has no guest_memfd). Mirrors the order of the checks in `Mmu::page_fault`.
fn host_readonly_fault(
    mmu: &Mmu,
    st: &MmuState,
    gfn: u64,
    private: Option<bool>,
    write: bool,
) -> bool {
    let is_private = mmu.is_private(st, gfn, private);
    let mismatch = mmu.has_private_mem && st.attrs.is_private(gfn);
    write
        && !is_private
        && !mismatch
        && st
            .memslots
            .find(gfn)
            .is_some_and(|s| !s.readonly && s.host_readonly(gfn))
}

/// One simulated vCPU: the guest loop over its accesses (`feed`: memstress's slice or an
/// explicit list), every access that its mapping does not allow taking the real fault path.
#[allow(clippy::too_many_arguments)]
fn vcpu(
    vm: &VmSide<'_>,
    st: &MmuState,
    a: &VtArgs,
    private: Option<bool>,
    mut feed: Feed<'_>,
    e: &Engine,
    v: u32,
    ctx: &mut Ctx,
    slot: &mut Slot,
) {
    let mmu = vm.mmu;
    let tdp = &mmu.tdp;
    if tdp.vcpu_root(v as usize, false) == crate::arena::NO_TABLE
        && let Err(err) = tdp.mmu_load(ctx, v as usize)
    {
        slot.err = Some(err);
        return;
    }
    let r = &mut slot.vcpu;
    let mut pml = crate::memstress::Pml::default();
    let mut pass = 0;
    'run: while a.passes == 0 || pass < a.passes {
        pass += 1;
        feed.rewind();
        loop {
            if e.stopped() {
                break 'run;
            }
            let Some((gfn, write)) = feed.next() else {
                break;
            };
            let acc = mmu.guest_access(st, gfn, private);
            r.accesses += 1;
            let mut attempts = 0u64;
            loop {
                // The "hardware" walk at the start of the access: no exit if the current
                // mapping allows it; the guest's own time for the access follows.
                e.step(ctx);
                ctx.wait(Wait::guest_ns, ctx.rate(crate::cost::Cost::guest_access_ns));
                let root = tdp.vcpu_root(v as usize, acc.mirror);
                if acc.may_hit
                    && root != crate::arena::NO_TABLE
                    && let Some(logged) = tdp.hw_access(root, gfn, acc.gfn_bits, write)
                {
                    if logged {
                        pml.log(mmu, st, ctx, gfn);
                    }
                    r.hits += 1;
                    break;
                }
                r.faults += 1;
                e.set_in_guest(false);
                let res = mmu.page_fault(st, ctx, gfn, private, write, false, v as usize, false);
                // A write the read-only host mapping refused: KVM_RUN returns to userspace
                // (-EFAULT with KVM_EXIT_MEMORY_FAULT), which skips the store and runs the
                // vCPU again.
                let efault = matches!(&res, Ok(x) if x.ret == Ret::MemoryFault)
                    && host_readonly_fault(mmu, st, gfn, private, write);
                if efault {
                    ctx.charge(crate::cost::Cost::userspace_exit_ns, 1);
                }
                if vm.td {
                    e.td_enter(ctx);
                }
                e.set_in_guest(true);
                let res = match res {
                    Ok(res) => res,
                    Err(err) => {
                        slot.err = Some(err);
                        break 'run;
                    }
                };
                r.local_retries += res.retries as u64;
                match res.ret {
                    Ret::Fixed => r.fixed += 1,
                    Ret::Spurious => r.spurious += 1,
                    Ret::Retry => r.retry += 1,
                    Ret::Emulate => r.emulate += 1,
                    Ret::MemoryFault => r.memory_fault += 1,
                    Ret::WriteProtected => r.write_protected += 1,
                    Ret::Continue | Ret::Invalid => {}
                }
                if ctx.bug.is_some() {
                    break 'run;
                }
                match res.ret {
                    Ret::Retry => {
                        attempts += 1 + res.retries as u64;
                        if attempts >= MAX_ATTEMPTS_PER_ACCESS {
                            slot.err = Some(Error::Livelock(format!(
                                "vCPU {v}: the fault at gfn {gfn:#x} was retried {attempts} times without progress"
                            )));
                            break 'run;
                        }
                    }
                    // Userspace handled the -EFAULT: the access ends without its store.
                    Ret::MemoryFault if efault => break,
                    // KVM_EXIT_MEMORY_FAULT for an access that does not match the page's
                    // attribute: without a handler converting the page it cannot complete.
                    Ret::MemoryFault => {
                        slot.err = Some(bad_arg(
                            "private",
                            format!(
                                "vCPU {v}: gfn {gfn:#x} exits with KVM_EXIT_MEMORY_FAULT (the access does not match the page's attribute)"
                            ),
                        ));
                        break 'run;
                    }
                    // Fixed, spurious, emulated: the access completes.
                    _ => break,
                }
            }
        }
    }
    r.modeled_ns = ctx.modeled_ns;
}

/// The host thread that removes private pages one at a time (KVM's private-memory zap:
/// `mmu_lock` for write, the vendor's removal — BLOCK, TRACK, kick, REMOVE on TDX).
fn remover(vm: &VmSide<'_>, a: &VtArgs, e: &Engine, ctx: &mut Ctx, slot: &mut Slot) {
    let Some((gfn, npages)) = a.remove else {
        return;
    };
    for g in gfn..gfn + npages {
        e.lock(ctx, true);
        let z = vm.mmu.tdp.unmap_gfn_range(ctx, true, false, g, g + 1);
        e.unlock(ctx, true);
        slot.removed += z;
        if ctx.bug.is_some() {
            return;
        }
    }
}
