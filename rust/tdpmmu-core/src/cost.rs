//! Modeled costs in nanoseconds and the ledger field they are charged to. Every modeled
//! nanosecond is charged as integer units of one `CostModel` field (`Cost`), so a run's
//! modeled time is exactly the sum over fields of units x value. Sources of the defaults:
//! `docs/costs.md` and `python/tdpmmu/costs.py`.

use crate::error::{Error, Result};

macro_rules! cost_model {
    ($($name:ident = $default:expr),* $(,)?) => {
        #[derive(Debug, Clone, Copy, PartialEq)]
        pub struct CostModel { $(pub $name: f64),* }
        /// One ledger field per `CostModel` field (same names, same order as `COST_FIELDS`).
        #[allow(non_camel_case_types)]
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[repr(usize)]
        pub enum Cost { $($name),* }
        impl Default for CostModel {
            fn default() -> Self { Self { $($name: $default),* } }
        }
        pub const COST_FIELDS: &[&str] = &[$(stringify!($name)),*];
        impl CostModel {
            /// Set one field by name; unknown names and negative/non-finite values are errors.
            pub fn set(&mut self, name: &str, value: f64) -> Result<()> {
                if !value.is_finite() || value < 0.0 {
                    return Err(Error::Config(format!(
                        "costs[{name:?}]: must be a finite number >= 0, got {value}"
                    )));
                }
                match name {
                    $(stringify!($name) => self.$name = value,)*
                    _ => return Err(Error::Config(format!(
                        "costs: unknown field {name:?}; allowed: {}", COST_FIELDS.join(", ")
                    ))),
                }
                Ok(())
            }
            pub fn get(&self, name: &str) -> Option<f64> {
                match name { $(stringify!($name) => Some(self.$name),)* _ => None }
            }
            /// Values in `COST_FIELDS` order (what a ledger multiplies its units by).
            pub fn rates(&self) -> [f64; NCOSTS] {
                [$(self.$name),*]
            }
        }
    };
}

cost_model!(
    exit_entry_ns = 1200.0,
    fault_handling_ns = 300.0,
    fault_map_ns = 200.0,
    fast_fix_ns = 100.0,
    host_page_alloc_ns = 620.0,
    host_zero_4k_ns = 320.0,
    tlb_flush_base_ns = 1000.0,
    tlb_flush_per_vcpu_ns = 200.0,
    spte_update_ns = 60.0,
    // TDX (see python/tdpmmu/costs.py for the source of each default).
    td_exit_entry_ns = 1000.0,
    tdh_mem_sept_add_ns = 1000.0,
    tdh_mem_page_aug_ns = 500.0,
    tdh_mem_page_add_ns = 1000.0,
    tdh_mr_extend_ns = 200.0,
    tdg_mem_page_accept_ns = 200.0,
    tdh_mem_range_block_ns = 2000.0,
    tdh_mem_track_ns = 2000.0,
    kick_base_ns = 3000.0,
    kick_per_vcpu_ns = 500.0,
    tdh_mem_page_remove_ns = 2000.0,
    tdh_mem_page_demote_ns = 2000.0,
    tdh_phymem_page_wbinvd_ns = 4000.0,
    page_clear_ns = 1000.0,
    tdh_phymem_page_reclaim_ns = 4000.0,
    tdh_mem_sept_remove_ns = 2000.0,
    tdh_vp_flush_ns = 1000.0,
    tdh_mng_vpflushdone_ns = 1000.0,
    tdh_phymem_cache_wb_ns = 100000.0,
    tdh_mng_key_freeid_ns = 1000.0,
    // SEV-SNP and guest_memfd.
    rmpupdate_ns = 1000.0,
    psmash_ns = 1000.0,
    pvalidate_ns = 500.0,
    psc_exit_ns = 2000.0,
    gmem_convert_ns = 107.0,
    gmem_split_2m_ns = 10700.0,
    // Virtual-time mechanisms (docs/costs.md "Mechanisms"): cache-line transfers by distance,
    // the guest's own access, the host allocator, userfaultfd, IPIs.
    line_local_ns = 2.3,
    line_smt_ns = 8.1,
    line_socket_ns = 51.0,
    line_remote_ns = 108.0,
    walk_read_ns = 2.25,
    guest_access_ns = 150.0,
    zone_lock_hold_ns = 1900.0,
    userspace_exit_ns = 1500.0,
    uffd_wake_ns = 18700.0,
    uffd_read_ns = 1000.0,
    uffdio_copy_ns = 1000.0,
    uffdio_continue_ns = 500.0,
    uffd_wq_hold_ns = 100.0,
    uffd_wake_scan_ns = 20.0,
);

pub const NCOSTS: usize = COST_FIELDS.len();

macro_rules! waits {
    ($($name:ident),* $(,)?) => {
        /// Modeled time that is not a fixed per-operation cost: what the virtual-time engine's
        /// shared resources add (queueing, contended cache lines, bandwidth, sleeps). Only
        /// virtual-time runs charge these; each is reported beside the ledger.
        #[allow(non_camel_case_types)]
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[repr(usize)]
        pub enum Wait { $($name),* }
        pub const WAIT_FIELDS: &[&str] = &[$(stringify!($name)),*];
    };
}

waits!(
    // Queued for mmu_lock (behind a writer, or behind readers for a writer).
    wait_mmu_lock,
    // Cache-line transfers of contended lock words (mmu_lock, the VMA lock, the zone lock,
    // the userfaultfd wait queue), including waiting for the line.
    wait_lock_line,
    // SPTE reads and cmpxchgs of the walk, and spins on FROZEN entries.
    wait_spte,
    // Memory bandwidth and the allocator's zone lock behind first-touch zeroing.
    wait_host_mem,
    // A vCPU asleep on userfaultfd until userspace resolved its fault (queueing included).
    wait_uffd,
    // IPI fan-out (flushes, kicks) and the exits IPIs force on running vCPUs.
    wait_ipi,
    // A vCPU kept out of the guest (TDX entry blocked while S-EPT removal kicks, BUSY entry).
    wait_entry,
    // Guest execution between faults (the guest's own accesses).
    guest_ns,
);

pub const NWAITS: usize = WAIT_FIELDS.len();

/// Modeled time of a ledger: units x rate per field, summed in field order (so the total is
/// exactly the sum of the breakdown a caller adds up in the same order).
pub fn ledger_ns(units: &[i64; NCOSTS], rates: &[f64; NCOSTS]) -> f64 {
    let mut total = 0.0;
    for (u, r) in units.iter().zip(rates.iter()) {
        total += *u as f64 * r;
    }
    total
}
