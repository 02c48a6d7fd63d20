//! The seam between the MMU code and the virtual-time engine (`vtime`). When a virtual-time
//! run is active on this thread, every point where concurrency matters (a shared SPTE read or
//! cmpxchg, `mmu_lock`, the host page behind a first touch, a TLB flush or vCPU kick, a
//! SEAMCALL's module locks, a spin on a FROZEN entry) calls into the engine, which advances
//! the calling vCPU's modeled clock and lets the other simulated vCPUs run first if they are
//! earlier. With no run active every function here is one load of a global flag and returns
//! "not handled", so real threads and single operations behave exactly as before.
//!
//! This module sits at the bottom of the core (it knows only `Ctx`); `vtime` implements `Env`.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::stats::Ctx;

/// A TDX module lock a SEAMCALL takes (spec: the TDX module's sharex and epoch locks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TdxLock {
    /// secure_ept_lock shared (TDH.MEM.PAGE.AUG/SEPT.ADD/PAGE.REMOVE on TDX 1.5+).
    SeptShared,
    /// secure_ept_lock exclusive (TDH.MEM.RANGE.BLOCK; AUG/SEPT.ADD on TDX 1.0).
    SeptExclusive,
    /// TDCS epoch lock exclusive (TDH.MEM.TRACK).
    EpochExclusive,
}

/// What the engine offers the MMU code. Methods take `&self`: the engine is single-threaded
/// and keeps its state in cells.
pub trait Env {
    /// A scheduling point at the caller's clock (`ctx.modeled_ns`).
    fn step(&self, ctx: &mut Ctx);
    /// A shared SPTE read (`cmpxchg` = an atomic update) of the walk, then a scheduling point.
    fn spte_access(&self, ctx: &mut Ctx, cmpxchg: bool);
    /// One turn of a spin on another vCPU's progress.
    fn spin(&self, ctx: &mut Ctx);
    /// The host page `pfn` behind a fault (`pages` 4 KiB pages; `gmem`: guest_memfd): the
    /// first toucher (`first`) provides it, later ones wait until it is there.
    fn host_page(&self, ctx: &mut Ctx, pfn: u64, pages: u64, gmem: bool, first: bool);
    /// `read_lock`/`write_lock(mmu_lock)` for a fault (the run's fault lock mode decides).
    fn fault_lock(&self, ctx: &mut Ctx);
    fn fault_unlock(&self, ctx: &mut Ctx);
    /// `kvm_flush_remote_tlbs`: IPIs to the running vCPUs.
    fn flush_remote_tlbs(&self, ctx: &mut Ctx);
    /// `kvm_make_all_cpus_request(KVM_REQ_OUTSIDE_GUEST_MODE)`; `block_entry`: vCPUs may not
    /// re-enter until `unblock_entry` (TDX's `wait_for_sept_zap`).
    fn kick_all(&self, ctx: &mut Ctx, block_entry: bool);
    fn unblock_entry(&self, ctx: &mut Ctx);
    /// Whether a SEAMCALL taking `lock` for `ns` collides with one in flight (OPERAND_BUSY).
    fn tdx_busy(&self, ctx: &Ctx, lock: TdxLock, ns: f64) -> bool;
}

static ACTIVE: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static ENV: Cell<Option<*const dyn Env>> = const { Cell::new(None) };
}

/// Run `f` with `env` serving this thread's scheduling points.
pub fn with_env<T>(env: &dyn Env, f: impl FnOnce() -> T) -> T {
    struct Reset(Option<*const dyn Env>);
    impl Drop for Reset {
        fn drop(&mut self) {
            ENV.with(|c| c.set(self.0));
            ACTIVE.fetch_sub(1, Ordering::Release);
        }
    }
    // SAFETY of the erased lifetime: the pointer is removed (by `Reset`) before `env`'s
    // borrow ends, and only this thread reads it.
    let ptr: *const (dyn Env + '_) = env;
    let ptr: *const dyn Env = unsafe { std::mem::transmute(ptr) };
    ACTIVE.fetch_add(1, Ordering::Acquire);
    let _reset = Reset(ENV.with(|c| c.replace(Some(ptr))));
    f()
}

/// Call `f` with this thread's engine; None (and `f` not called) when no run is active.
#[inline(always)]
pub fn with<R>(f: impl FnOnce(&dyn Env) -> R) -> Option<R> {
    if ACTIVE.load(Ordering::Relaxed) == 0 {
        return None;
    }
    with_slow(f)
}

#[cold]
fn with_slow<R>(f: impl FnOnce(&dyn Env) -> R) -> Option<R> {
    // SAFETY: the pointer is live while `with_env` runs on this thread (see there), and the
    // reference does not escape `f`.
    let p = ENV.with(|c| c.get())?;
    Some(f(unsafe { &*p }))
}

/// Whether a virtual-time run serves this thread.
#[inline(always)]
pub fn active() -> bool {
    with(|_| ()).is_some()
}
