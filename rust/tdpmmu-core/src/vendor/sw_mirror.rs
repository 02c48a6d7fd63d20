//! SW_PROTECTED with `mirror=True`: the seed thread's "mirrored page table with a shared bit"
//! without a TDX module. The mirror tree is reflected into a software external tree (the TDX
//! module model in software mode: same entry states, no SEAMCALL counts or costs), the guest
//! runs from the start, and exits cost what a normal VM's do.

use std::any::Any;
use std::sync::Arc;

use super::tdx::{Tdx, TdxHooks};
use super::tdx_module::TdxModule;
use super::{CheckResult, Vendor};
use crate::config::{SeptFree, TdxOptions};
use crate::error::{Result, bad_arg};
use crate::hooks::ExternalOps;
use crate::page_fault::Ret;
use crate::stats::Ctx;

pub struct SwMirror {
    pub module: Arc<TdxModule>,
    /// The hooks drive the external tree (false when a caller's hook object receives them).
    pub module_hooked: bool,
}

impl SwMirror {
    pub fn new(
        levels: u8,
        vcpus: u32,
        capacity: usize,
        opts: TdxOptions,
        seed: u64,
        module_hooked: bool,
    ) -> Result<Self> {
        Ok(Self {
            module: Arc::new(TdxModule::new(levels, vcpus, capacity, opts, seed, true)?),
            module_hooked,
        })
    }

    pub fn hooks(&self) -> Arc<dyn ExternalOps> {
        Arc::new(TdxHooks {
            module: self.module.clone(),
        })
    }
}

impl Vendor for SwMirror {
    fn private_max_level(&self, _pfn: u64) -> u8 {
        1
    }

    fn post_private_fault(&self, ctx: &mut Ctx, gfn: u64, _pfn: u64, ret: Ret) {
        if self.module_hooked && matches!(ret, Ret::Fixed | Ret::Spurious) {
            self.module.accept(ctx, gfn);
        }
    }

    fn finalize_supported(&self) -> Result<()> {
        Err(bad_arg(
            "vm_type",
            "finalize is a TDX operation; a sw_protected VM is not a TD",
        ))
    }

    /// The software tree is runnable from the start.
    fn finalized(&self) -> bool {
        self.module.finalized()
    }

    fn zap_mirror_before_pre_destroy(&self) -> bool {
        self.module.opts.sept_free == SeptFree::SeptRemove
    }

    fn vm_pre_destroy(&self, ctx: &mut Ctx) {
        self.module.release_hkid(ctx);
    }

    fn check_external(&self, mirror_tables: usize, mirror_leaves: Vec<(u64, u64)>) -> CheckResult {
        if !self.module_hooked {
            return Ok(());
        }
        Tdx::compare_with_mirror(&self.module, mirror_tables, mirror_leaves)
    }

    fn check_teardown(&self, _gmem: &[(u64, u64, u64)]) -> CheckResult {
        Tdx::teardown_left(&self.module)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
