//! Roots (KVM's root `kvm_mmu_page`s): the role word, allocation and reuse, per-vCPU loading,
//! reference counts.

use std::sync::atomic::Ordering;

use super::TdpMmu;
use crate::arena::{NO_TABLE, SP_MIRROR, SP_ROOT};
use crate::error::Result;
use crate::stats::{C, Ctx};

/// A TDP root: its table, role word and reference count.
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
            return self.0 & Self::INVALID.0 != 0;
        }
        if r.is_mirror() {
            self.0 & Self::MIRROR.0 != 0
        } else {
            self.0 & Self::DIRECT.0 != 0
        }
    }
}

impl TdpMmu {
    pub fn root_role(&self, mirror: bool) -> u32 {
        self.shape.levels as u32
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
        let table = self.arena.alloc(self.shape.levels, 0, flags)?;
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
    pub fn mmu_load(&self, ctx: &mut Ctx, vcpu: usize) -> Result<()> {
        if self.shape.has_mirror && self.vcpu_mirror_root[vcpu].load(Ordering::Acquire) == NO_TABLE
        {
            let t = self.alloc_root(ctx, true)?;
            self.vcpu_mirror_root[vcpu].store(t, Ordering::Release);
        }
        if self.vcpu_root[vcpu].load(Ordering::Acquire) == NO_TABLE {
            let t = self.alloc_root(ctx, false)?;
            self.vcpu_root[vcpu].store(t, Ordering::Release);
        }
        Ok(())
    }

    /// The root a vCPU walks for this kind of access (NO_TABLE before its first load).
    #[inline(always)]
    pub fn vcpu_root(&self, vcpu: usize, mirror: bool) -> u32 {
        if mirror {
            self.vcpu_mirror_root[vcpu].load(Ordering::Acquire)
        } else {
            self.vcpu_root[vcpu].load(Ordering::Acquire)
        }
    }

    /// `kvm_tdp_mmu_put_root`: drop one reference; free at zero (must already be invalid).
    pub fn put_root_locked(&self, ctx: &mut Ctx, roots: &mut Vec<Root>, table: u32) {
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

    /// Every vCPU's loaded roots (direct and mirror), for invariant checks.
    pub fn vcpu_roots(&self) -> impl Iterator<Item = u32> + '_ {
        self.vcpu_root
            .iter()
            .chain(self.vcpu_mirror_root.iter())
            .map(|v| v.load(Ordering::Acquire))
    }
}
