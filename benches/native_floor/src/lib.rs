//! The native floor for benchmarks (kept out of the engine crate): a plain loop that walks, allocates and cmpxchg-installs the
//! same 4-level tree a default VM builds, with none of the MMU's rules (no iterator, no
//! counters, no memslots, no costs). The engine's fault path is compared against it.

use std::sync::atomic::Ordering;
use std::time::Instant;

use tdpmmu_core::Result;
use tdpmmu_core::arena::{Arena, TABLE_BASE_PFN};
use tdpmmu_core::spte::{
    SHADOW_NONPRESENT_VALUE, index, make_leaf_spte, make_nonleaf_spte, spte_to_pfn,
};

/// Map every gfn at 4K in a fresh tree; returns (elapsed seconds, tables allocated).
pub fn native_floor(gfns: &[u64], levels: u8) -> Result<(f64, usize)> {
    let max = gfns.iter().copied().max().unwrap_or(0) + 1;
    let arena = Arena::new(tdpmmu_core::vm::tables_needed(max, levels) as usize + 16)?;
    let root = arena.alloc(levels, 0, 0)?;
    let t0 = Instant::now();
    for &gfn in gfns {
        let mut table = root;
        let mut level = levels;
        while level > 1 {
            let e = arena.entry(table, index(gfn, level));
            let mut s = e.load(Ordering::Acquire);
            if s == SHADOW_NONPRESENT_VALUE {
                let child = arena.alloc(level - 1, 0, 0)?;
                let new = make_nonleaf_spte(Arena::pfn(child));
                match e.compare_exchange(s, new, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => s = new,
                    Err(cur) => {
                        arena.free_now(child);
                        s = cur;
                    }
                }
            }
            table = (spte_to_pfn(s) - TABLE_BASE_PFN) as u32;
            level -= 1;
        }
        let e = arena.entry(table, index(gfn, 1));
        let old = e.load(Ordering::Acquire);
        let _ = e.compare_exchange(
            old,
            make_leaf_spte(gfn, 1, true, false),
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }
    Ok((t0.elapsed().as_secs_f64(), arena.live()))
}
