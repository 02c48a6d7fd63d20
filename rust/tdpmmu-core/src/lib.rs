//! tdpmmu-core: a user-space model of Linux KVM's x86 TDP MMU (no Python here).
//!
//! Module map follows the project's architecture document: `spte` (bit layout), `arena`
//! (page-table memory), `iter` (the pre-order walker), `mmu` (SPTE updates, teardown, splits),
//! `vm` (roots and the fault path), `zap` (zaps, memslots, pre-fault), `external` (mirror
//! hooks), `check` (invariants), `memstress` (the selftest-shaped workload), `floor` (bench floor).

pub mod arena;
pub mod attrs;
pub mod check;
pub mod config;
pub mod cost;
pub mod error;
pub mod external;
pub mod floor;
pub mod gmem;
pub mod iter;
pub mod memslot;
pub mod memstress;
pub mod mmu;
pub mod snp;
pub mod spte;
pub mod stats;
pub mod tdx;
pub mod vm;
pub mod zap;

pub use cost::{COST_FIELDS, CostModel};
pub use error::{Error, Result};
pub use memstress::{MemstressArgs, VcpuResult};
pub use stats::COUNTER_NAMES;
pub use vm::{FaultResult, Ret, Root, Vm, VmConfig};
