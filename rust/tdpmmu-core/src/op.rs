//! One operation bracket for every public operation: refuse on a destroyed or bugged VM, take
//! `mmu_lock` in the operation's mode, count into a private context, end the grace period of
//! tables freed under the read lock, merge the context into the VM's totals, and turn a
//! KVM_BUG_ON recorded on the way into `VmBugged`.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::sync::{Mutex, MutexGuard, RwLock};

use crate::arena::Arena;
use crate::attrs::PrivateRanges;
use crate::cost::CostModel;
use crate::error::{Error, Result, bad_arg};
use crate::memslot::Memslots;
use crate::stats::{Ctx, Totals};

thread_local! {
    /// The calling thread's way to learn that its caller wants it to stop (the bindings check
    /// for Ctrl-C here); None = never.
    static INTERRUPT: Cell<Option<fn() -> bool>> = const { Cell::new(None) };
}

/// Run `f` with `check` as this thread's interrupt check (polled by long operations).
pub fn with_interrupt_check<T>(check: fn() -> bool, f: impl FnOnce() -> T) -> T {
    let prev = INTERRUPT.with(|c| c.replace(Some(check)));
    let r = f();
    INTERRUPT.with(|c| c.set(prev));
    r
}

/// Whether this thread's caller asked it to stop. Cheap enough to call every few thousand
/// faults; long loops call it and end with `Error::Interrupted`, leaving the VM consistent.
pub fn interrupted() -> bool {
    INTERRUPT.with(|c| c.get().is_some_and(|f| f()))
}

/// Faults between interrupt checks in long loops.
pub const INTERRUPT_EVERY: u64 = 1 << 14;

/// State protected by `mmu_lock` (faults hold it for read; zaps, memslot and attribute
/// changes for write).
pub struct MmuState {
    pub memslots: Memslots,
    pub attrs: PrivateRanges,
    /// Bytes of the memory budget the memslots have committed (page tables of every tree that
    /// can map them, fully mapped at 4K, and their per-page metadata).
    pub committed: u64,
}

/// The lock, the merged counters and the VM's life state.
pub struct Ops {
    pub mmu_lock: RwLock<MmuState>,
    pub totals: Totals,
    costs: CostModel,
    trace: bool,
    bugged: AtomicBool,
    bug_msg: Mutex<Option<String>>,
    destroyed: AtomicBool,
    /// A vCPU runs one thing at a time: each fault, batch, populate or memstress thread holds
    /// its vCPU for the duration (taken before `mmu_lock`, never while holding it).
    vcpus: Box<[Mutex<()>]>,
}

impl Ops {
    pub fn new(state: MmuState, costs: CostModel, trace: bool, vcpus: u32) -> Self {
        let totals = Totals::default();
        totals.set_rates(&costs);
        Self {
            mmu_lock: RwLock::new(state),
            totals,
            costs,
            trace,
            bugged: AtomicBool::new(false),
            bug_msg: Mutex::new(None),
            destroyed: AtomicBool::new(false),
            vcpus: (0..vcpus).map(|_| Mutex::new(())).collect(),
        }
    }

    /// The VM's cost values.
    pub fn costs(&self) -> &CostModel {
        &self.costs
    }

    /// Hold vCPU `v` (index checked by the caller): another thread using the same vCPU waits.
    pub fn vcpu(&self, v: usize) -> MutexGuard<'_, ()> {
        self.vcpus[v].lock()
    }

    /// A fresh per-operation (or per-vCPU-thread) context.
    pub fn ctx(&self) -> Ctx {
        Ctx::new(&self.costs, self.trace)
    }

    pub fn bugged(&self) -> bool {
        self.bugged.load(Ordering::Acquire)
    }

    pub fn destroyed(&self) -> bool {
        self.destroyed.load(Ordering::Acquire)
    }

    /// Set while `mmu_lock` is held for write, so no operation that took the lock after it
    /// can act on the torn-down VM.
    pub fn mark_destroyed(&self) {
        self.destroyed.store(true, Ordering::Release);
    }

    pub fn ensure_alive(&self) -> Result<()> {
        if self.destroyed() {
            return Err(bad_arg("vm", "the VM was destroyed; create a new one"));
        }
        if self.bugged() {
            let msg = self.bug_msg.lock().clone().unwrap_or_default();
            return Err(Error::Bugged(msg));
        }
        Ok(())
    }

    /// Merge an operation's counters; a KVM_BUG_ON recorded in it marks the VM bugged.
    pub fn finish(&self, ctx: &Ctx) -> Result<()> {
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

    /// End of a read-locked operation that freed tables: wait for every walker (take the
    /// write lock) so they can be reused — the model's RCU grace period.
    pub fn grace_period(&self, arena: &Arena) {
        if arena.has_deferred() {
            let _w = self.mmu_lock.write();
            arena.quiesce();
        }
    }

    /// Merge what the operation did (even if it failed part-way: its changes are real) while
    /// it still holds `mmu_lock`, so whoever takes the lock next sees tables and totals agree;
    /// return the operation's error, else the bug it recorded.
    fn end<T>(&self, ctx: &Ctx, r: Result<T>) -> Result<T> {
        let fin = self.finish(ctx);
        let v = r?;
        fin?;
        Ok(v)
    }

    /// Run `body` under the read lock.
    pub fn read<T>(
        &self,
        arena: &Arena,
        body: impl FnOnce(&MmuState, &mut Ctx) -> Result<T>,
    ) -> Result<T> {
        self.ensure_alive()?;
        let mut ctx = self.ctx();
        let r = {
            let st = self.mmu_lock.read();
            let r = self.ensure_alive().and_then(|()| body(&st, &mut ctx));
            self.end(&ctx, r)
        };
        self.grace_period(arena);
        r
    }

    /// Run `body` under the write lock; tables it freed are reusable when it ends.
    pub fn write<T>(
        &self,
        arena: &Arena,
        body: impl FnOnce(&mut MmuState, &mut Ctx) -> Result<T>,
    ) -> Result<T> {
        self.ensure_alive()?;
        let mut ctx = self.ctx();
        let mut st = self.mmu_lock.write();
        let r = self.ensure_alive().and_then(|()| body(&mut st, &mut ctx));
        arena.quiesce();
        self.end(&ctx, r)
    }
}
