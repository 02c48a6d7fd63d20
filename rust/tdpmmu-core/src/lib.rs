//! tdpmmu-core: a user-space model of Linux KVM's x86 TDP MMU (no Python here).
//!
//! Layered like KVM: generic MMU below (`tdp_iter`, `tdp_mmu`, the fault entry `mmu`), the
//! vendor code behind an ops table (`vendor`), the public operations on top (`vm`). Imports
//! point down only. `src/README.md` maps each module to the KVM file whose logic it holds.

pub mod arena;
pub mod attrs;
pub mod check;
pub mod config;
pub mod cost;
pub mod error;
pub mod gmem;
pub mod hooks;
pub mod memslot;
pub mod memstress;
pub mod mmu;
pub mod op;
pub mod page_fault;
pub mod sim;
pub mod spte;
pub mod stats;
pub mod sync;
pub mod tdp_iter;
pub mod tdp_mmu;
pub mod trace;
pub mod vendor;
pub mod vm;
pub mod vtime;

pub use config::{Design, VmConfig, VmType};
pub use cost::{COST_FIELDS, Cost, CostModel};
pub use error::{Error, Result};
pub use memstress::{MemstressArgs, VcpuResult};
pub use page_fault::{FaultResult, Ret};
pub use stats::{C, COUNTER_NAMES};
pub use vm::Vm;
