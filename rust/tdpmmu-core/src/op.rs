//! One operation bracket for every public operation: refuse on a destroyed or bugged VM, take
//! `mmu_lock` in the operation's mode, count into a private context, end the grace period of
//! tables freed under the read lock, merge the context into the VM's totals, and turn a
//! KVM_BUG_ON recorded on the way into `VmBugged`.

use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::{Mutex, RwLock};

use crate::arena::Arena;
use crate::attrs::PrivateRanges;
use crate::cost::CostModel;
use crate::error::{Error, Result, bad_arg};
use crate::memslot::Memslots;
use crate::stats::{Ctx, Totals};

/// State protected by `mmu_lock` (faults hold it for read; zaps, memslot and attribute
/// changes for write).
pub struct MmuState {
    pub memslots: Memslots,
    pub attrs: PrivateRanges,
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
}

impl Ops {
    pub fn new(state: MmuState, costs: CostModel, trace: bool) -> Self {
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
        }
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

    /// Merge what the operation did (even if it failed part-way: its changes are real), and
    /// return its error, else the bug it recorded.
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
            self.ensure_alive().and_then(|()| body(&st, &mut ctx))
        };
        self.grace_period(arena);
        self.end(&ctx, r)
    }

    /// Run `body` under the write lock; tables it freed are reusable when it ends.
    pub fn write<T>(
        &self,
        arena: &Arena,
        body: impl FnOnce(&mut MmuState, &mut Ctx) -> Result<T>,
    ) -> Result<T> {
        self.ensure_alive()?;
        let mut ctx = self.ctx();
        let r = {
            let mut st = self.mmu_lock.write();
            let r = self.ensure_alive().and_then(|()| body(&mut st, &mut ctx));
            arena.quiesce();
            r
        };
        self.end(&ctx, r)
    }
}
