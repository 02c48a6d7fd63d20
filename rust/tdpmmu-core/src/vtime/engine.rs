//! The discrete-event engine: simulated threads (vCPUs, userfaultfd readers, a page remover)
//! are stackful coroutines on the calling host thread; each has its own modeled clock (its
//! `Ctx::modeled_ns`). At every scheduling point the running thread continues only while its
//! clock is the earliest (ties broken by thread index); otherwise it suspends and the earliest
//! runs. Shared resources are acted on in modeled-time order, so the outcome of a race is
//! decided by modeled time alone: the same inputs give the same run, bit for bit.
//!
//! The shared resources are mechanisms with their own parameters (docs/model.md):
//! cache lines (an atomic on a line waits for the line's previous transfer and costs a
//! transfer by CPU distance), `mmu_lock` as a queued reader/writer lock (qrwlock: FIFO
//! waiters, a waiting writer blocks new readers, consecutive readers are granted together),
//! the host first-touch path (VMA lock line, per-CPU page lists refilled under the zone lock,
//! zeroing bounded by each socket's memory bandwidth), userfaultfd contexts (wait-queue lock,
//! FIFO of faults, reader threads woken from poll, wake-ups that scan every waiter), IPIs over
//! the machine topology, and the TDX module's try-locks (a SEAMCALL overlapping a conflicting
//! one in modeled time gets OPERAND_BUSY).

use std::cell::{Cell, RefCell};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

use corosensei::Yielder;

use super::Machine;
use crate::cost::{Cost, CostModel, Wait};
use crate::sim::{Env, TdxLock};
use crate::stats::Ctx;

/// Pages a CPU's per-CPU page list takes from the zone per refill (`zone_batchsize()` gives
/// 63 for zones above 256 MiB; mm/page_alloc.c).
pub const PCP_BATCH: u32 = 63;

/// How a vCPU's first touch of a shared page is resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Userfault {
    /// Anonymous memory: the host allocates and zeroes the page in the fault.
    None,
    /// userfaultfd MISSING: a reader thread resolves with UFFDIO_COPY.
    Missing,
    /// userfaultfd MINOR (shmem): a reader fills the page cache, then UFFDIO_CONTINUE.
    Minor,
    /// KVM_EXIT_MEMORY_FAULT: the vCPU thread resolves its own fault (UFFDIO_COPY), no queue.
    MemoryFault,
}

impl Userfault {
    pub const NAMES: &[&str] = &["none", "MISSING", "MINOR", "memory_fault"];
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "none" => Self::None,
            "MISSING" => Self::Missing,
            "MINOR" => Self::Minor,
            "memory_fault" => Self::MemoryFault,
            _ => return None,
        })
    }
    pub fn name(self) -> &'static str {
        Self::NAMES[self as usize]
    }
}

/// Multiply-shift hashing of pfns (std's SipHash costs more than the rest of a simulated
/// first touch; keys here are not attacker-chosen).
#[derive(Default)]
struct PfnHasher(u64);
impl Hasher for PfnHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(5) ^ *b as u64).wrapping_mul(0x517c_c1b7_2722_0a95);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}
type PfnMap<V> = HashMap<u64, V, BuildHasherDefault<PfnHasher>>;

/// A cache line holding a contended word.
#[derive(Debug, Default, Clone, Copy)]
pub struct Line {
    free_at: f64,
    owner: Option<u32>,
}

/// A lock held for a fixed time per acquisition, with a FIFO of waiters (a spinlock).
#[derive(Debug, Default, Clone, Copy)]
struct Spinlock {
    line: Line,
    free_at: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActorKind {
    Vcpu,
    Reader,
    Remover,
}

#[derive(Debug, Clone)]
pub struct Actor {
    pub kind: ActorKind,
    pub cpu: u32,
    /// vCPUs: which userfaultfd they fault into; readers: which one they serve.
    pub uffd: usize,
    pub in_guest: bool,
    pub done: bool,
    blocked: bool,
    wake_at: f64,
    /// Time taken from this thread by others (IPIs), applied at its next scheduling point.
    steal: f64,
    /// The VMA (true) or guest_memfd (false) lock this thread still holds: released at its
    /// next scheduling point, which comes at the same modeled time.
    holds_map_lock: Option<bool>,
}

#[derive(Debug, Default)]
struct Uffd {
    wq: Spinlock,
    /// Faults not yet read, oldest first.
    pending: VecDeque<(u32, u64)>,
    /// Faults read, waiting for their page (moved to `fault_wqh`).
    waiting: usize,
    /// Readers asleep in poll().
    idle: Vec<u32>,
}

/// The queued reader/writer lock (qrwlock).
#[derive(Debug, Default)]
struct RwLockState {
    readers: u32,
    writer: bool,
    queue: VecDeque<(u32, bool)>,
    line: Line,
    acquires: u64,
    contended: u64,
}

#[derive(Debug, Default)]
struct TdxLocks {
    sept_excl_until: f64,
    sept_shared_until: f64,
    epoch_excl_until: f64,
    epoch_shared_until: f64,
    /// KVM's `wait_for_sept_zap`: vCPUs may not enter until the remover's retry is done.
    entry_blocked: bool,
    entry_waiters: Vec<u32>,
}

/// What the run configures in the engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub machine: Machine,
    pub costs: CostModel,
    pub exclusive_faults: bool,
    pub userfault: Userfault,
    pub uffds: usize,
    pub uffd_delay_ns: f64,
    /// TDX module 1.0 lock table: AUG and SEPT.ADD take the S-EPT lock exclusive.
    pub tdx_sept_exclusive_aug: bool,
    /// The VM type's exit + re-entry cost (what an IPI costs a vCPU in guest mode).
    pub exit_ns: f64,
}

struct State {
    heap: BinaryHeap<Reverse<(u64, u32)>>,
    actors: Vec<Actor>,
    cur: u32,
    mmu_lock: RwLockState,
    vma: Line,
    gmem: Line,
    zone: Spinlock,
    /// Pages left on each CPU's per-CPU list.
    pcp_left: Vec<u32>,
    bus_free: Vec<f64>,
    uffds: Vec<Uffd>,
    /// Host pages being resolved (by pfn): threads that touched them meanwhile wait here.
    inflight: PfnMap<Vec<u32>>,
    /// The thread the one that suspended last chose to run next (it took its place at the
    /// top of the heap, saving a pop and a push).
    next: Option<u32>,
    tdx: TdxLocks,
    pub stop: bool,
    steps: u64,
    switches: u64,
}

/// The engine. Lives on the run's stack; coroutines borrow it.
pub struct Engine {
    pub cfg: EngineConfig,
    st: RefCell<State>,
    yielders: Vec<Cell<*const Yielder<(), ()>>>,
}

#[inline(always)]
fn key(t: f64) -> u64 {
    // Non-negative finite f64s order like their bit patterns.
    debug_assert!(t >= 0.0 && t.is_finite());
    t.to_bits()
}

impl Engine {
    pub fn new(cfg: EngineConfig, actors: Vec<(ActorKind, u32, usize)>) -> Self {
        let n = actors.len();
        let uffds = (0..cfg.uffds).map(|_| Uffd::default()).collect();
        let sockets = cfg.machine.sockets as usize;
        let mut heap = BinaryHeap::with_capacity(n);
        for i in 0..n {
            heap.push(Reverse((key(0.0), i as u32)));
        }
        Self {
            st: RefCell::new(State {
                heap,
                actors: actors
                    .into_iter()
                    .map(|(kind, cpu, uffd)| Actor {
                        kind,
                        cpu,
                        uffd,
                        in_guest: kind == ActorKind::Vcpu,
                        done: false,
                        blocked: false,
                        wake_at: 0.0,
                        steal: 0.0,
                        holds_map_lock: None,
                    })
                    .collect(),
                cur: 0,
                mmu_lock: RwLockState::default(),
                vma: Line::default(),
                gmem: Line::default(),
                zone: Spinlock::default(),
                pcp_left: vec![0; cfg.machine.cpus() as usize + n],
                bus_free: vec![0.0; sockets],
                uffds,
                inflight: PfnMap::default(),
                next: None,
                tdx: TdxLocks::default(),
                stop: false,
                steps: 0,
                switches: 0,
            }),
            yielders: (0..n).map(|_| Cell::new(std::ptr::null())).collect(),
            cfg,
        }
    }

    // ----- scheduling -------------------------------------------------------------------

    /// Register the running coroutine's yielder (called first thing in each coroutine).
    pub fn set_yielder(&self, actor: u32, y: &Yielder<(), ()>) {
        self.yielders[actor as usize].set(y);
    }

    fn suspend(&self) {
        let me = self.st.borrow().cur as usize;
        let y = self.yielders[me].get();
        // SAFETY: set by the coroutine itself before its first scheduling point; the yielder
        // lives as long as the coroutine, which is suspended only from its own stack.
        unsafe { (*y).suspend(()) };
    }

    /// Next thread to run and the clock it resumes at; None when nothing is runnable.
    pub fn pop(&self) -> Option<u32> {
        let mut st = self.st.borrow_mut();
        st.switches += 1;
        let a = match st.next.take() {
            Some(a) => a,
            None => st.heap.pop()?.0.1,
        };
        st.cur = a;
        Some(a)
    }

    pub fn finish_actor(&self, a: u32) {
        self.st.borrow_mut().actors[a as usize].done = true;
    }

    pub fn stopped(&self) -> bool {
        self.st.borrow().stop
    }

    /// Ask every thread to stop: vCPUs end at their next access, readers wake and return.
    pub fn stop(&self, t: f64) {
        let mut st = self.st.borrow_mut();
        st.stop = true;
        for u in 0..st.uffds.len() {
            let idle = std::mem::take(&mut st.uffds[u].idle);
            for r in idle {
                Self::wake_locked(&mut st, r, t);
            }
        }
    }

    pub fn counts(&self) -> (u64, u64, u64, u64) {
        let st = self.st.borrow();
        (
            st.steps,
            st.switches,
            st.mmu_lock.acquires,
            st.mmu_lock.contended,
        )
    }

    /// Threads that are neither done nor runnable (a deadlock if vCPUs remain).
    pub fn stuck(&self) -> Vec<(u32, ActorKind)> {
        let st = self.st.borrow();
        st.actors
            .iter()
            .enumerate()
            .filter(|(_, a)| !a.done)
            .map(|(i, a)| (i as u32, a.kind))
            .collect()
    }

    /// Continue if this thread is still the earliest, else let the earlier ones run first.
    #[inline]
    fn sched(&self, ctx: &mut Ctx) {
        loop {
            {
                let mut st = self.st.borrow_mut();
                st.steps += 1;
                let me = st.cur;
                let steal = std::mem::take(&mut st.actors[me as usize].steal);
                if steal > 0.0 {
                    ctx.wait(Wait::wait_ipi, steal);
                }
                let k = (key(ctx.modeled_ns), me);
                let later = st.heap.peek().is_some_and(|top| k > top.0);
                if later {
                    // Trade places with the earliest: one sift instead of a push and a pop.
                    let mut top = st.heap.peek_mut().expect("peeked");
                    let next = top.0.1;
                    *top = Reverse(k);
                    drop(top);
                    st.next = Some(next);
                } else {
                    let Some(gmem) = st.actors[me as usize].holds_map_lock.take() else {
                        return;
                    };
                    // A deferred unlock, now that it is this thread's turn.
                    let cpu = st.actors[me as usize].cpu;
                    let t = ctx.modeled_ns;
                    let line = if gmem { &mut st.gmem } else { &mut st.vma };
                    let mut l = *line;
                    let got = self.line_op(&mut l, cpu, t);
                    *line = l;
                    ctx.wait(Wait::wait_lock_line, got - t);
                    continue;
                }
            }
            self.suspend();
        }
    }

    /// Sleep until another thread wakes this one; the time asleep is charged to `w`.
    fn block(&self, ctx: &mut Ctx, w: Wait) {
        {
            let mut st = self.st.borrow_mut();
            let me = st.cur as usize;
            st.actors[me].blocked = true;
        }
        self.suspend();
        let wake_at = {
            let st = self.st.borrow();
            st.actors[st.cur as usize].wake_at
        };
        ctx.wait(w, wake_at - ctx.modeled_ns);
    }

    fn wake_locked(st: &mut State, a: u32, t: f64) {
        let ac = &mut st.actors[a as usize];
        if !ac.blocked {
            return;
        }
        ac.blocked = false;
        ac.wake_at = t;
        st.heap.push(Reverse((key(t), a)));
    }

    fn my_cpu(&self) -> u32 {
        let st = self.st.borrow();
        st.actors[st.cur as usize].cpu
    }

    /// One atomic on `line` by CPU `cpu` at time `t`: returns when it completes.
    fn line_op(&self, line: &mut Line, cpu: u32, t: f64) -> f64 {
        let start = t.max(line.free_at);
        let d = self.cfg.machine.line_ns(&self.cfg.costs, line.owner, cpu);
        line.free_at = start + d;
        line.owner = Some(cpu);
        start + d
    }

    /// Take `lock` for `hold` ns (charged to the ledger field `hold_field` if given, else to
    /// `w`), after the line transfer and any queueing (charged to `w`).
    fn spin_hold(
        &self,
        ctx: &mut Ctx,
        pick: impl Fn(&mut State) -> &mut Spinlock,
        hold: Option<Cost>,
        hold_ns: f64,
        w: Wait,
    ) {
        self.sched(ctx);
        let cpu = self.my_cpu();
        let t = ctx.modeled_ns;
        let start = {
            let mut st = self.st.borrow_mut();
            let l = pick(&mut st);
            let mut line = l.line;
            let got = self.line_op(&mut line, cpu, t);
            let start = got.max(l.free_at);
            l.line = line;
            l.free_at = start + hold_ns;
            start
        };
        ctx.wait(w, start - t);
        match hold {
            Some(f) => ctx.charge(f, 1),
            None => ctx.wait(w, hold_ns),
        }
    }

    // ----- mmu_lock -----------------------------------------------------------------------

    pub fn lock(&self, ctx: &mut Ctx, excl: bool) {
        self.sched(ctx);
        let cpu = self.my_cpu();
        let t = ctx.modeled_ns;
        let (got, granted) = {
            let mut st = self.st.borrow_mut();
            let mut line = st.mmu_lock.line;
            let got = self.line_op(&mut line, cpu, t);
            let me = st.cur;
            let l = &mut st.mmu_lock;
            l.line = line;
            l.acquires += 1;
            let free = !l.writer && l.queue.is_empty() && (!excl || l.readers == 0);
            if free {
                if excl {
                    l.writer = true;
                } else {
                    l.readers += 1;
                }
            } else {
                l.contended += 1;
                l.queue.push_back((me, excl));
            }
            (got, free)
        };
        ctx.wait(Wait::wait_lock_line, got - t);
        if !granted {
            self.block(ctx, Wait::wait_mmu_lock);
        }
    }

    pub fn unlock(&self, ctx: &mut Ctx, excl: bool) {
        self.sched(ctx);
        let cpu = self.my_cpu();
        let t = ctx.modeled_ns;
        let got = {
            let mut st = self.st.borrow_mut();
            let mut line = st.mmu_lock.line;
            let got = self.line_op(&mut line, cpu, t);
            st.mmu_lock.line = line;
            if excl {
                st.mmu_lock.writer = false;
            } else {
                st.mmu_lock.readers -= 1;
            }
            // Hand the lock to the queue's head: a writer once no reader holds it, or every
            // reader up to the next writer.
            while let Some(&(a, wexcl)) = st.mmu_lock.queue.front() {
                let l = &st.mmu_lock;
                if l.writer || (wexcl && l.readers > 0) {
                    break;
                }
                st.mmu_lock.queue.pop_front();
                if wexcl {
                    st.mmu_lock.writer = true;
                } else {
                    st.mmu_lock.readers += 1;
                }
                let to = st.actors[a as usize].cpu;
                let seen = got + self.cfg.machine.line_ns(&self.cfg.costs, Some(cpu), to);
                Self::wake_locked(&mut st, a, seen);
                if wexcl {
                    break;
                }
            }
            got
        };
        ctx.wait(Wait::wait_lock_line, got - t);
    }

    // ----- vCPU state ---------------------------------------------------------------------

    pub fn set_in_guest(&self, in_guest: bool) {
        let mut st = self.st.borrow_mut();
        let me = st.cur as usize;
        st.actors[me].in_guest = in_guest;
    }

    /// TDH.VP.ENTER: waits while S-EPT removal keeps vCPUs out, and retries while a TRACK
    /// holds the epoch lock (OPERAND_BUSY); the entry holds the epoch lock shared for half
    /// of the exit/entry round trip.
    pub fn td_enter(&self, ctx: &mut Ctx) {
        loop {
            self.sched(ctx);
            let blocked = {
                let mut st = self.st.borrow_mut();
                if st.tdx.entry_blocked {
                    let me = st.cur;
                    st.tdx.entry_waiters.push(me);
                    true
                } else {
                    false
                }
            };
            if blocked {
                self.block(ctx, Wait::wait_entry);
                continue;
            }
            let t = ctx.modeled_ns;
            let hold = self.cfg.costs.td_exit_entry_ns / 2.0;
            let mut st = self.st.borrow_mut();
            if st.tdx.epoch_excl_until > t {
                let until = st.tdx.epoch_excl_until;
                drop(st);
                ctx.wait(Wait::wait_entry, until - t);
                continue;
            }
            st.tdx.epoch_shared_until = st.tdx.epoch_shared_until.max(t + hold);
            return;
        }
    }

    // ----- host memory --------------------------------------------------------------------

    /// Allocate and zero (or copy into) `pages` 4 KiB pages on the calling thread: the VMA
    /// (or guest_memfd) lock line, the per-CPU list refilled under the zone lock, zeroing at
    /// the core's rate bounded by the socket's bandwidth. Charges the host-mode ledger fields
    /// (`host_page_alloc_ns` + `host_zero_4k_ns` x (pages - 1)) plus the waits.
    fn alloc_and_fill(&self, ctx: &mut Ctx, pages: u64, gmem: bool) {
        self.sched(ctx);
        let cpu = self.my_cpu();
        let t = ctx.modeled_ns;
        let got = {
            let mut st = self.st.borrow_mut();
            let mut line = if gmem { st.gmem } else { st.vma };
            let got = self.line_op(&mut line, cpu, t);
            if gmem {
                st.gmem = line;
            } else {
                st.vma = line;
            }
            got
        };
        ctx.wait(Wait::wait_lock_line, got - t);
        let refill = {
            let mut st = self.st.borrow_mut();
            let left = &mut st.pcp_left[cpu as usize];
            if pages > 1 || *left == 0 {
                *left = if pages > 1 { *left } else { PCP_BATCH - 1 };
                true
            } else {
                *left -= 1;
                false
            }
        };
        if refill {
            self.spin_hold(
                ctx,
                |st| &mut st.zone,
                Some(Cost::zone_lock_hold_ns),
                self.cfg.costs.zone_lock_hold_ns,
                Wait::wait_host_mem,
            );
        }
        let t = ctx.modeled_ns;
        ctx.charge(Cost::host_page_alloc_ns, 1);
        ctx.charge(Cost::host_zero_4k_ns, pages - 1);
        let core_done = ctx.modeled_ns;
        let bytes = 4096.0 * pages as f64;
        let bw_done = {
            let mut st = self.st.borrow_mut();
            let s = self.cfg.machine.place(cpu).socket as usize;
            let start = t.max(st.bus_free[s]);
            st.bus_free[s] = start + bytes / self.cfg.machine.mem_bw_gbps;
            st.bus_free[s]
        };
        ctx.wait(Wait::wait_host_mem, bw_done - core_done);
        // Unlocked at the next scheduling point (see `sched`).
        let mut st = self.st.borrow_mut();
        let me = st.cur as usize;
        st.actors[me].holds_map_lock = Some(gmem);
    }

    /// The wait-queue lock of userfaultfd `u`, held for its hold time plus `extra_ns`.
    fn uffd_wq(&self, ctx: &mut Ctx, u: usize, extra_ns: f64) {
        let hold = self.cfg.costs.uffd_wq_hold_ns + extra_ns;
        self.spin_hold(
            ctx,
            |st| &mut st.uffds[u].wq,
            None,
            hold,
            Wait::wait_lock_line,
        );
    }

    /// A vCPU's stock userfaultfd fault: queue it, wake the readers asleep in poll(), sleep
    /// until a reader's wake-up.
    fn uffd_fault(&self, ctx: &mut Ctx, pfn: u64) {
        let u = {
            let st = self.st.borrow();
            st.actors[st.cur as usize].uffd
        };
        self.uffd_wq(ctx, u, 0.0);
        let t = ctx.modeled_ns;
        {
            let mut st = self.st.borrow_mut();
            let me = st.cur;
            st.uffds[u].pending.push_back((me, pfn));
            let idle = std::mem::take(&mut st.uffds[u].idle);
            for r in idle {
                Self::wake_locked(&mut st, r, t + self.cfg.costs.uffd_wake_ns);
            }
        }
        self.block(ctx, Wait::wait_uffd);
    }

    /// A userfaultfd reader thread: poll, read one fault, handle it (`-d`), resolve it, wake
    /// its waiters; until the run stops.
    pub fn reader(&self, ctx: &mut Ctx) {
        let u = {
            let st = self.st.borrow();
            st.actors[st.cur as usize].uffd
        };
        loop {
            self.sched(ctx);
            if self.stopped() {
                return;
            }
            let empty = self.st.borrow().uffds[u].pending.is_empty();
            if empty {
                {
                    let mut st = self.st.borrow_mut();
                    let me = st.cur;
                    st.uffds[u].idle.push(me);
                }
                self.block(ctx, Wait::wait_uffd);
                continue;
            }
            // read(): take the oldest fault under the wait-queue lock (another reader woken
            // by the same poll may have taken it first).
            ctx.charge(Cost::uffd_read_ns, 1);
            self.uffd_wq(ctx, u, 0.0);
            let Some((vcpu, pfn)) = ({
                let mut st = self.st.borrow_mut();
                let f = st.uffds[u].pending.pop_front();
                if f.is_some() {
                    st.uffds[u].waiting += 1;
                }
                f
            }) else {
                continue;
            };
            ctx.wait(Wait::wait_uffd, self.cfg.uffd_delay_ns);
            self.resolve(ctx);
            // UFFDIO_COPY/CONTINUE wakes under the wait-queue lock, scanning every waiter.
            let scan = {
                let st = self.st.borrow();
                (st.uffds[u].waiting + st.uffds[u].pending.len()) as f64
            };
            self.uffd_wq(ctx, u, scan * self.cfg.costs.uffd_wake_scan_ns);
            let t = ctx.modeled_ns + self.cfg.costs.uffd_wake_ns;
            let mut st = self.st.borrow_mut();
            st.uffds[u].waiting -= 1;
            Self::wake_locked(&mut st, vcpu, t);
            for w in st.inflight.remove(&pfn).unwrap_or_default() {
                Self::wake_locked(&mut st, w, t);
            }
        }
    }

    /// Userspace provides the page: UFFDIO_COPY (MISSING, memory-fault exits) allocates and
    /// copies; MINOR writes the shmem page through its alias, then UFFDIO_CONTINUE maps it.
    fn resolve(&self, ctx: &mut Ctx) {
        self.alloc_and_fill(ctx, 1, false);
        match self.cfg.userfault {
            Userfault::Minor => ctx.charge(Cost::uffdio_continue_ns, 1),
            _ => ctx.charge(Cost::uffdio_copy_ns, 1),
        }
    }
}

impl Env for Engine {
    fn step(&self, ctx: &mut Ctx) {
        self.sched(ctx);
    }

    fn spte_access(&self, ctx: &mut Ctx, cmpxchg: bool) {
        if cmpxchg {
            ctx.wait(Wait::wait_spte, self.cfg.costs.line_local_ns);
        } else {
            ctx.wait(Wait::wait_spte, self.cfg.costs.walk_read_ns);
        }
        self.sched(ctx);
    }

    fn spin(&self, ctx: &mut Ctx) {
        ctx.wait(Wait::wait_spte, self.cfg.costs.line_socket_ns);
        self.sched(ctx);
    }

    fn host_page(&self, ctx: &mut Ctx, pfn: u64, pages: u64, gmem: bool, first: bool) {
        if !first {
            // Someone else is still providing this page: wait for it.
            self.sched(ctx);
            let waiting = {
                let mut st = self.st.borrow_mut();
                let me = st.cur;
                match st.inflight.get_mut(&pfn) {
                    Some(w) => {
                        w.push(me);
                        true
                    }
                    None => false,
                }
            };
            if waiting {
                let w = if gmem || self.cfg.userfault == Userfault::None {
                    Wait::wait_host_mem
                } else {
                    Wait::wait_uffd
                };
                self.block(ctx, w);
            }
            return;
        }
        self.sched(ctx);
        self.st.borrow_mut().inflight.insert(pfn, Vec::new());
        match (gmem, self.cfg.userfault) {
            (true, _) | (false, Userfault::None) => {
                self.alloc_and_fill(ctx, pages, gmem);
            }
            (false, Userfault::MemoryFault) => {
                ctx.charge(Cost::userspace_exit_ns, 1);
                ctx.wait(Wait::wait_uffd, self.cfg.uffd_delay_ns);
                self.resolve(ctx);
            }
            (false, Userfault::Missing | Userfault::Minor) => {
                self.uffd_fault(ctx, pfn);
                return; // the reader woke the waiters
            }
        }
        let t = ctx.modeled_ns;
        let mut st = self.st.borrow_mut();
        for w in st.inflight.remove(&pfn).unwrap_or_default() {
            Self::wake_locked(&mut st, w, t);
        }
    }

    fn fault_lock(&self, ctx: &mut Ctx) {
        self.lock(ctx, self.cfg.exclusive_faults);
    }

    fn fault_unlock(&self, ctx: &mut Ctx) {
        self.unlock(ctx, self.cfg.exclusive_faults);
    }

    fn flush_remote_tlbs(&self, ctx: &mut Ctx) {
        ctx.charge(Cost::tlb_flush_base_ns, 1);
        self.ipi_all(ctx, Cost::tlb_flush_per_vcpu_ns, false);
    }

    fn kick_all(&self, ctx: &mut Ctx, block_entry: bool) {
        ctx.charge(Cost::kick_base_ns, 1);
        if block_entry {
            self.st.borrow_mut().tdx.entry_blocked = true;
        }
        self.ipi_all(ctx, Cost::kick_per_vcpu_ns, true);
    }

    fn unblock_entry(&self, ctx: &mut Ctx) {
        let t = ctx.modeled_ns;
        let mut st = self.st.borrow_mut();
        st.tdx.entry_blocked = false;
        for a in std::mem::take(&mut st.tdx.entry_waiters) {
            Self::wake_locked(&mut st, a, t);
        }
    }

    fn tdx_busy(&self, ctx: &Ctx, lock: TdxLock, ns: f64) -> bool {
        let t = ctx.modeled_ns;
        let mut st = self.st.borrow_mut();
        let l = &mut st.tdx;
        let lock = match lock {
            TdxLock::SeptShared if self.cfg.tdx_sept_exclusive_aug => TdxLock::SeptExclusive,
            l => l,
        };
        let busy = match lock {
            TdxLock::SeptShared => l.sept_excl_until > t,
            TdxLock::SeptExclusive => l.sept_excl_until > t || l.sept_shared_until > t,
            TdxLock::EpochExclusive => l.epoch_excl_until > t || l.epoch_shared_until > t,
        };
        if !busy {
            match lock {
                TdxLock::SeptShared => l.sept_shared_until = l.sept_shared_until.max(t + ns),
                TdxLock::SeptExclusive => l.sept_excl_until = t + ns,
                TdxLock::EpochExclusive => l.epoch_excl_until = t + ns,
            }
        }
        busy
    }
}

impl Engine {
    /// IPIs from the calling thread to every other vCPU: the sender pays `per_target` for
    /// each vCPU in guest mode plus a line transfer to each vCPU (its request word), by
    /// distance (so fan-out costs more across sockets); each vCPU in guest mode loses an exit and re-entry. `kick`: KVM waits until
    /// every target acknowledged (left guest mode).
    fn ipi_all(&self, ctx: &mut Ctx, per_target: Cost, kick: bool) {
        let cpu = self.my_cpu();
        let mut running = 0u64;
        let mut lines = 0.0;
        let mut ack: f64 = 0.0;
        {
            let mut st = self.st.borrow_mut();
            let me = st.cur;
            let exit = self.cfg.exit_ns;
            for (i, a) in st.actors.iter_mut().enumerate() {
                if a.kind != ActorKind::Vcpu || i as u32 == me || a.done {
                    continue;
                }
                let d = self.cfg.machine.line_ns(&self.cfg.costs, Some(cpu), a.cpu);
                lines += d;
                if a.in_guest {
                    running += 1;
                    a.steal += exit;
                    ack = ack.max(d);
                }
            }
        }
        ctx.charge(per_target, running);
        ctx.wait(Wait::wait_ipi, lines + if kick { ack } else { 0.0 });
    }
}
