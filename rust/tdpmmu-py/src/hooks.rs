//! A Python object with the four hook methods, called where KVM calls the external hooks
//! (counting and tracing happen at the core's dispatch site, as for every backend). Slow by
//! design: every call re-enters Python. Each method returns 0, -16 (-EBUSY) or another
//! negative errno (a failure that marks the VM bugged).

use std::cell::Cell;

use parking_lot::Mutex;
use pyo3::exceptions::{PyKeyboardInterrupt, PySystemExit};
use pyo3::prelude::*;

use tdpmmu_core::arena::Arena;
use tdpmmu_core::hooks::{ExternalOps, HookRet};
use tdpmmu_core::stats::Ctx;

pub const HOOK_METHODS: [&str; 4] = [
    "link_external_spt",
    "set_external_spte",
    "remove_external_spte",
    "free_external_spt",
];

thread_local! {
    /// The hook object whose method this thread is running (0 = none): a call back into its
    /// VM from there would wait for the `mmu_lock` this thread already holds.
    static IN_HOOK: Cell<usize> = const { Cell::new(0) };
}

/// Identity of the hook object this thread is inside, if any.
pub fn current_hook() -> usize {
    IN_HOOK.with(|c| c.get())
}

pub struct PyHooks {
    obj: Py<PyAny>,
    /// A KeyboardInterrupt or SystemExit raised by a hook, re-raised when the operation ends.
    pending: Mutex<Option<PyErr>>,
}

impl PyHooks {
    pub fn new(obj: Py<PyAny>) -> Self {
        Self {
            obj,
            pending: Mutex::new(None),
        }
    }

    /// Identity compared against `current_hook()`.
    pub fn id(&self) -> usize {
        self as *const Self as usize
    }

    /// The interrupt a hook raised during the last operation, if any.
    pub fn take_pending(&self) -> Option<PyErr> {
        self.pending.lock().take()
    }

    fn call(&self, ctx: &mut Ctx, name: &str, args: (u64, u8, u64)) -> HookRet {
        Python::attach(|py| {
            let prev = IN_HOOK.with(|c| c.replace(self.id()));
            let r = self.obj.call_method1(py, name, args);
            IN_HOOK.with(|c| c.set(prev));
            match r {
                Ok(v) => {
                    let v = v.bind(py);
                    if v.is_none() {
                        ctx.bug(format!(
                            "hook {name} returned None; it must return 0, -16 (-EBUSY) or a negative errno"
                        ));
                        return HookRet::Io;
                    }
                    match v.extract::<i64>() {
                        Ok(0) => HookRet::Ok,
                        Ok(-16) => HookRet::Busy,
                        Ok(e) => {
                            ctx.bug(format!("hook {name} returned {e}"));
                            HookRet::Io
                        }
                        Err(_) => {
                            let shown = v.repr().map(|s| s.to_string()).unwrap_or_default();
                            ctx.bug(format!(
                                "hook {name} returned {shown}; it must return 0, -16 (-EBUSY) or a negative errno"
                            ));
                            HookRet::Io
                        }
                    }
                }
                Err(e) => {
                    if e.is_instance_of::<PyKeyboardInterrupt>(py)
                        || e.is_instance_of::<PySystemExit>(py)
                    {
                        ctx.bug(format!("hook {name} was interrupted ({e})"));
                        let mut p = self.pending.lock();
                        if p.is_none() {
                            *p = Some(e);
                        }
                    } else {
                        ctx.bug(format!("hook {name} raised {e}"));
                    }
                    HookRet::Io
                }
            }
        })
    }
}

impl ExternalOps for PyHooks {
    fn link_external_spt(&self, ctx: &mut Ctx, gfn: u64, level: u8, child: u32) -> HookRet {
        self.call(ctx, "link_external_spt", (gfn, level, Arena::pfn(child)))
    }
    fn set_external_spte(&self, ctx: &mut Ctx, gfn: u64, level: u8, spte: u64) -> HookRet {
        self.call(ctx, "set_external_spte", (gfn, level, spte))
    }
    fn remove_external_spte(&self, ctx: &mut Ctx, gfn: u64, level: u8, spte: u64) {
        let _ = self.call(ctx, "remove_external_spte", (gfn, level, spte));
    }
    fn free_external_spt(&self, ctx: &mut Ctx, gfn: u64, level: u8, table: u32) -> HookRet {
        self.call(ctx, "free_external_spt", (gfn, level, Arena::pfn(table)))
    }
}
