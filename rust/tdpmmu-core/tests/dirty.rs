//! Dirty logging, write-protection faults and the fast page fault, aging, eager splitting and
//! huge-page recovery (spec §7), each written to fail if its rule were broken.

mod common;

use common::{c, config};
use tdpmmu_core::memstress::MemstressArgs;
use tdpmmu_core::spte::{ACCESSED, PT_WRITABLE, is_large};
use tdpmmu_core::stats::C;
use tdpmmu_core::{CostModel, Ret, Vm, VmConfig};

fn vm(memory: u64, backing: u64) -> Vm {
    Vm::new(VmConfig {
        memory,
        backing,
        vcpus: 2,
        ..VmConfig::default()
    })
    .unwrap()
}

fn write(vm: &Vm, gfn: u64) -> Ret {
    vm.fault(gfn, None, true, false, 0).unwrap().ret
}

fn bit(words: &[u64], page: u64) -> bool {
    words[(page / 64) as usize] & (1 << (page % 64)) != 0
}

#[test]
fn enabling_the_log_write_protects_and_a_write_is_fixed_on_the_fast_path() {
    let v = vm(64 << 20, 4096);
    assert_eq!(v.populate(0, 256, None, 0).unwrap(), 256);
    assert_eq!(
        v.set_dirty_logging(0, true, false, false, true, false)
            .unwrap(),
        256
    );
    assert_eq!(c(&v, C::sptes_write_protected), 256);
    assert_eq!(v.spte(3, false).unwrap() & PT_WRITABLE, 0);
    v.check().unwrap();
    // The write exits; the leaf is MMU-writable, so one cmpxchg restores W without the lock.
    let k = CostModel::default();
    let r = v.fault(3, None, true, false, 0).unwrap();
    assert_eq!(r.ret, Ret::Fixed);
    assert_eq!(r.modeled_ns, k.exit_entry_ns + k.fast_fix_ns);
    assert_eq!(c(&v, C::pf_fast), 1);
    assert_eq!(c(&v, C::pf_fixed), 1);
    assert_ne!(v.spte(3, false).unwrap() & PT_WRITABLE, 0);
    // A second write exit on the now-writable leaf is spurious, still on the fast path.
    assert_eq!(write(&v, 3), Ret::Spurious);
    assert_eq!(c(&v, C::pf_fast), 2);
    // A read does not qualify for the fast path and a read of a protected page is allowed.
    assert_eq!(
        v.fault(4, None, false, false, 0).unwrap().ret,
        Ret::Spurious
    );
    assert_eq!(c(&v, C::pf_fast), 2);
    v.check().unwrap();
    // GET without manual protection: the bits are taken and the pages protected again.
    let log = v.get_dirty_log(0).unwrap();
    assert!(bit(&log, 3) && !bit(&log, 4));
    assert_eq!(log.iter().map(|w| w.count_ones()).sum::<u32>(), 1);
    assert_eq!(v.spte(3, false).unwrap() & PT_WRITABLE, 0);
    let again = v.get_dirty_log(0).unwrap();
    assert!(again.iter().all(|w| *w == 0));
    assert_eq!(write(&v, 3), Ret::Fixed);
    assert_eq!(c(&v, C::pf_fast), 3);
    v.check().unwrap();
}

#[test]
fn new_mappings_in_a_logged_slot_are_4k_and_marked_dirty() {
    let v = vm(64 << 20, 2 << 20);
    v.set_dirty_logging(0, true, false, false, true, false)
        .unwrap();
    let r = v.fault(600, None, false, false, 0).unwrap();
    assert_eq!(
        (r.ret, r.level),
        (Ret::Fixed, 1),
        "no huge page while logging"
    );
    assert!(
        bit(&v.get_dirty_log(0).unwrap(), 600),
        "a writable SPTE is a dirty page"
    );
    v.check().unwrap();
    // Logging off: the 2M range is backed by one host huge page; recovery maps it huge.
    let before = c(&v, C::remote_tlb_flush);
    for g in 512..1024 {
        v.fault(g, None, true, false, 0).unwrap();
    }
    assert_eq!(
        v.set_dirty_logging(0, false, false, false, true, false)
            .unwrap(),
        1
    );
    assert_eq!(c(&v, C::huge_pages_recovered), 1);
    assert!(c(&v, C::remote_tlb_flush) > before);
    assert!(is_large(v.spte(700, false).unwrap()));
    v.check().unwrap();
}

#[test]
fn eager_split_breaks_huge_pages_when_logging_starts() {
    let v = vm(64 << 20, 2 << 20);
    v.populate(0, 2048, None, 0).unwrap();
    assert_eq!(c(&v, C::pages_2m), 4);
    v.set_dirty_logging(0, true, false, false, true, false)
        .unwrap();
    assert_eq!(c(&v, C::pages_2m), 0);
    assert_eq!(c(&v, C::pages_4k), 2048);
    assert_eq!(c(&v, C::huge_page_splits), 4);
    assert_eq!(c(&v, C::sptes_write_protected), 2048);
    v.check().unwrap();
    // Without eager split the 2M leaves stay and are write-protected at 2M.
    let w = vm(64 << 20, 2 << 20);
    w.populate(0, 2048, None, 0).unwrap();
    assert_eq!(
        w.set_dirty_logging(0, true, false, false, false, false)
            .unwrap(),
        4
    );
    assert_eq!(c(&w, C::pages_2m), 4);
    // A write to a protected 2M page in a logged slot is not fast: the slow path splits it.
    assert_eq!(write(&w, 7), Ret::Fixed);
    assert_eq!(c(&w, C::pf_fast), 0);
    assert_eq!(v.spte(7, false).unwrap() & PT_WRITABLE, 0);
    assert_eq!(w.fault(7, None, true, false, 0).unwrap().level, 1);
    w.check().unwrap();
}

#[test]
fn manual_protect_with_initially_set_defers_protection_to_clear() {
    let v = vm(64 << 20, 4096);
    v.populate(0, 256, None, 0).unwrap();
    assert_eq!(
        v.set_dirty_logging(0, true, true, true, true, false)
            .unwrap(),
        0
    );
    let log = v.get_dirty_log(0).unwrap();
    assert_eq!(log.len() as u64, (64 << 20) / 4096 / 64);
    assert!(log.iter().all(|w| *w == !0), "initially set");
    assert_ne!(
        v.spte(5, false).unwrap() & PT_WRITABLE,
        0,
        "nothing protected yet"
    );
    // GET with manual protection copies only; CLEAR re-arms the first 128 pages.
    assert_eq!(v.get_dirty_log(0).unwrap(), log);
    assert_eq!(v.clear_dirty_log(0, 0, 128).unwrap(), 128);
    let log = v.get_dirty_log(0).unwrap();
    assert_eq!((log[0], log[1], log[2]), (0, 0, !0));
    assert_eq!(v.spte(5, false).unwrap() & PT_WRITABLE, 0);
    assert_ne!(v.spte(200, false).unwrap() & PT_WRITABLE, 0);
    v.check().unwrap();
    assert_eq!(write(&v, 5), Ret::Fixed);
    assert!(bit(&v.get_dirty_log(0).unwrap(), 5));
    // KVM's rules for CLEAR.
    assert!(
        v.clear_dirty_log(0, 3, 64)
            .unwrap_err()
            .to_string()
            .contains("first_page")
    );
    assert!(
        v.clear_dirty_log(0, 0, 10)
            .unwrap_err()
            .to_string()
            .contains("npages")
    );
    v.check().unwrap();
}

#[test]
fn what_kvm_refuses_is_refused() {
    let v = vm(64 << 20, 4096);
    assert!(
        v.set_dirty_logging(0, true, false, true, true, false)
            .unwrap_err()
            .to_string()
            .contains("initially_set")
    );
    v.set_dirty_logging(0, true, false, false, true, false)
        .unwrap();
    assert!(
        v.clear_dirty_log(0, 0, 64)
            .unwrap_err()
            .to_string()
            .contains("manual_protect")
    );
    assert!(v.get_dirty_log(7).unwrap_err().to_string().contains("slot"));
    assert!(
        v.recover_huge_pages(0)
            .unwrap_err()
            .to_string()
            .contains("logs dirty")
    );
    let td = Vm::new(VmConfig {
        memory: 64 << 20,
        ..config("tdx", "", &[]).unwrap()
    })
    .unwrap();
    let err = td
        .set_dirty_logging(0, true, false, false, true, false)
        .unwrap_err();
    assert!(err.to_string().contains("guest_memfd"), "{err}");
}

#[test]
fn aging_clears_accessed_and_the_guest_sets_it_again() {
    let v = vm(64 << 20, 4096);
    v.populate(0, 64, None, 0).unwrap();
    // A pre-fault maps without A (prefetch); a guest access sets it as EPT A/D does.
    assert!(!v.test_age_gfn(0, 64).unwrap());
    let a = MemstressArgs {
        vcpus: 1,
        pages_per_vcpu: 64,
        base_gfn: 0,
        overlap: false,
        random_access: false,
        write_percent: 0,
        seed: 0,
        rng_skip: 0,
        private: None,
    };
    v.run_memstress(&a).unwrap();
    assert_eq!(c(&v, C::pf_taken), 0, "every read hit its mapping");
    assert!(v.test_age_gfn(10, 1).unwrap());
    assert_ne!(v.spte(10, false).unwrap() & ACCESSED, 0);
    assert!(v.age_gfn_range(0, 32).unwrap());
    assert_eq!(c(&v, C::sptes_aged), 32);
    assert!(!v.test_age_gfn(0, 32).unwrap());
    assert!(v.test_age_gfn(32, 32).unwrap());
    assert!(
        !v.age_gfn_range(0, 32).unwrap(),
        "nothing young is left there"
    );
    // Aging needs no flush and no SPTE bookkeeping.
    assert_eq!(c(&v, C::remote_tlb_flush), 0);
    v.check().unwrap();
}

#[test]
fn split_huge_pages_to_a_target_level() {
    let v = Vm::new(VmConfig {
        memory: 2 << 30,
        backing: 1 << 30,
        ..VmConfig::default()
    })
    .unwrap();
    v.populate(0, 1 << 18, None, 0).unwrap();
    assert_eq!(c(&v, C::pages_1g), 1);
    assert_eq!(v.split_huge_pages(0, 1 << 18, 2).unwrap(), 1);
    assert_eq!((c(&v, C::pages_1g), c(&v, C::pages_2m)), (0, 512));
    // Pre-order: 2M -> 4K in one pass over a range.
    assert_eq!(v.split_huge_pages(0, 1024, 1).unwrap(), 2);
    assert_eq!(c(&v, C::pages_4k), 1024);
    assert!(v.split_huge_pages(0, 1, 3).is_err());
    v.check().unwrap();
    // Recovery undoes it where the backing allows: pre-order reaches the 1G table first and
    // replaces the whole subtree with one 1G leaf, tearing down the 2M and 4K tables below.
    assert_eq!(v.recover_huge_pages(0).unwrap(), 1);
    assert_eq!(
        (c(&v, C::pages_1g), c(&v, C::pages_2m), c(&v, C::pages_4k)),
        (1, 0, 0)
    );
    assert_eq!(
        c(&v, C::tdp_mmu_pages),
        1,
        "only the level-3 table holding the 1G leaf"
    );
    v.check().unwrap();
}

#[test]
fn nx_recovery_zaps_a_share_of_the_tables_exec_faults_forced() {
    let v = Vm::new(VmConfig {
        memory: 1 << 30,
        backing: 2 << 20,
        nx_huge_pages: true,
        ..VmConfig::default()
    })
    .unwrap();
    // Exec faults in 6 empty 2M ranges: each maps 4K and tracks the table it had to create
    // where a huge page could have been.
    for r in 0..6u64 {
        let f = v.fault(r * 512 + 7, None, false, true, 0).unwrap();
        assert_eq!((f.ret, f.level), (Ret::Fixed, 1));
    }
    assert_eq!(c(&v, C::nx_lpage_splits), 6);
    v.check().unwrap();
    // A data fault there stays 4K while the table is on the list.
    assert_eq!(v.fault(9, None, true, false, 0).unwrap().level, 1);
    // ratio 4: ⌈6 / 4⌉ = 2 tables, the oldest first; one flush.
    assert_eq!(v.nx_recover(4).unwrap(), 2);
    assert_eq!(c(&v, C::nx_lpage_splits), 4);
    assert_eq!(c(&v, C::nx_huge_pages_recovered), 2);
    assert_eq!(c(&v, C::remote_tlb_flush), 1);
    v.check().unwrap();
    // The oldest range is empty again: a data fault maps it 2M.
    assert_eq!(v.fault(9, None, true, false, 0).unwrap().level, 2);
    assert_eq!(v.fault(512 + 9, None, true, false, 0).unwrap().level, 2);
    // The third range is still on the list: 4K.
    assert_eq!(v.fault(1024 + 9, None, true, false, 0).unwrap().level, 1);
    assert_eq!(v.nx_recover(0).unwrap(), 0, "ratio 0 recovers nothing");
    // Zapping the tables another way takes them off the list too.
    v.zap_all_fast().unwrap();
    v.fault(0, None, false, false, 0).unwrap(); // loads a new root
    v.check().unwrap();
}

#[test]
fn write_tracked_pages_are_read_only_and_writes_return_write_protected() {
    let v = vm(64 << 20, 2 << 20);
    v.populate(0, 512, None, 0).unwrap();
    assert_eq!(c(&v, C::pages_2m), 1);
    // Tracking a page write-protects the 2M leaf over it; the next write is emulated.
    assert_eq!(v.write_track_gfn(7, true).unwrap(), 1);
    assert_eq!(v.spte(7, false).unwrap() & PT_WRITABLE, 0);
    assert_eq!(c(&v, C::remote_tlb_flush), 1);
    let r = v.fault(7, None, true, false, 0).unwrap();
    assert_eq!(r.ret, Ret::WriteProtected);
    assert_eq!(c(&v, C::pf_write_protected), 1);
    assert_eq!(c(&v, C::pf_fast), 0, "MMU-writable is clear: no fast path");
    // A fresh 2M range with a tracked page maps 4K, read-only at the tracked page only.
    v.write_track_gfn(600, true).unwrap();
    assert_eq!(
        v.fault(600, None, true, false, 0).unwrap().ret,
        Ret::WriteProtected
    );
    let r = v.fault(601, None, true, false, 0).unwrap();
    assert_eq!((r.ret, r.level), (Ret::Fixed, 1));
    v.check().unwrap();
    // The last tracker gone: the page may be written again (via the slow path).
    assert_eq!(v.write_track_gfn(600, false).unwrap(), 0);
    assert_eq!(v.fault(600, None, true, false, 0).unwrap().ret, Ret::Fixed);
    assert!(v.write_track_gfn(600, false).is_err());
    v.check().unwrap();
}

#[test]
fn the_fast_path_leaves_a_write_that_is_also_a_fetch_to_the_slow_path() {
    // A writable 2M leaf without X (NX huge pages): fixing W would not allow the fetch, so
    // KVM's re-check sends it to the slow path, which splits the page and maps 4K with X.
    let v = Vm::new(VmConfig {
        memory: 64 << 20,
        backing: 2 << 20,
        nx_huge_pages: true,
        ..VmConfig::default()
    })
    .unwrap();
    assert_eq!(v.fault(5, None, true, false, 0).unwrap().level, 2);
    let r = v.fault(5, None, true, true, 0).unwrap();
    assert_eq!(r.level, 1);
    assert_ne!(r.spte & tdpmmu_core::spte::PT_EXEC, 0);
    assert_eq!(c(&v, C::pf_fast), 0);
    v.check().unwrap();
}

#[test]
fn pml_arms_pages_by_clearing_dirty_and_the_cpu_logs_writes_without_exits() {
    let v = vm(64 << 20, 4096);
    v.populate(0, 1024, None, 0).unwrap();
    // Pre-faults map without A but with D: enabling with PML clears D on every 4K leaf.
    assert_eq!(
        v.set_dirty_logging(0, true, false, false, true, true)
            .unwrap(),
        1024
    );
    let s = v.spte(3, false).unwrap();
    assert_ne!(s & PT_WRITABLE, 0, "PML leaves stay writable");
    assert_eq!(s & tdpmmu_core::spte::DIRTY, 0);
    v.check().unwrap();
    // The guest writes 600 pages: no exit, each logged; one PML-full exit at 512.
    let a = MemstressArgs {
        vcpus: 1,
        pages_per_vcpu: 600,
        base_gfn: 0,
        overlap: false,
        random_access: false,
        write_percent: 100,
        seed: 0,
        rng_skip: 0,
        private: None,
    };
    v.run_memstress(&a).unwrap();
    assert_eq!(c(&v, C::pf_taken), 0);
    assert_eq!(c(&v, C::pml_logged), 600);
    assert_eq!(c(&v, C::pml_full_exits), 1);
    let log = v.get_dirty_log(0).unwrap();
    assert_eq!(log.iter().map(|w| w.count_ones()).sum::<u32>(), 600);
    // GET re-armed them by clearing D again, not by write-protecting.
    let s = v.spte(3, false).unwrap();
    assert_ne!(s & PT_WRITABLE, 0);
    assert_eq!(s & tdpmmu_core::spte::DIRTY, 0);
    v.check().unwrap();
}

#[test]
fn recovery_never_maps_a_huge_page_over_mixed_private_and_shared_memory() {
    let v = Vm::new(VmConfig {
        backing: 2 << 20,
        ..config("snp", "", &[("folio", "2M")]).unwrap()
    })
    .unwrap();
    v.set_memory_attributes(0, 256, false).unwrap();
    v.fault(3, Some(false), true, false, 0).unwrap();
    v.fault(300, Some(false), false, false, 0).ok();
    assert_eq!(
        v.recover_huge_pages(0).unwrap(),
        0,
        "gfns 256..511 are private"
    );
    v.check().unwrap();
}

#[test]
fn clear_with_initially_set_stays_within_the_pages_it_clears() {
    let v = vm(64 << 20, 4096);
    let a = v.add_memslot(0x8000 - 100, 100, 4096, false).unwrap();
    let b = v.add_memslot(0x8000, 512, 2 << 20, false).unwrap();
    assert_eq!(v.fault(0x8005, None, true, false, 0).unwrap().level, 2);
    for eager in [true, false] {
        v.set_dirty_logging(a, true, true, true, eager, false)
            .unwrap();
        v.clear_dirty_log(a, 64, 36).unwrap();
        let s = v.spte(0x8005, false).unwrap();
        assert!(
            is_large(s) && s & PT_WRITABLE != 0,
            "slot {b} does not log: untouched"
        );
        v.set_dirty_logging(a, false, false, false, true, false)
            .unwrap();
    }
    v.check().unwrap();
}

fn vm_no_ad(memory: u64, backing: u64) -> Vm {
    Vm::new(VmConfig {
        memory,
        backing,
        vcpus: 2,
        ad_bits: false,
        ..VmConfig::default()
    })
    .unwrap()
}

fn reads(vm: &Vm, pages: u64, write_percent: u32) -> Vec<tdpmmu_core::memstress::VcpuResult> {
    vm.run_memstress(&MemstressArgs {
        vcpus: 1,
        pages_per_vcpu: pages,
        base_gfn: 0,
        overlap: false,
        random_access: false,
        write_percent,
        seed: 0,
        rng_skip: 0,
        private: None,
    })
    .unwrap()
}

#[test]
fn without_ad_bits_leaves_have_no_a_d_and_the_cpu_sets_none() {
    use tdpmmu_core::spte::{DIRTY, SPTE_TDP_AD_DISABLED, SPTE_TDP_AD_MASK};
    let v = vm_no_ad(64 << 20, 4096);
    assert_eq!(write(&v, 5), Ret::Fixed);
    let s = v.spte(5, false).unwrap();
    assert_eq!(s & SPTE_TDP_AD_MASK, SPTE_TDP_AD_DISABLED);
    assert_eq!(s & (ACCESSED | DIRTY), 0);
    assert_ne!(s & PT_WRITABLE, 0);
    // The tables above it are A/D-disabled too, without A.
    for (level, e) in v.walk(5, false).unwrap() {
        assert_eq!(e & SPTE_TDP_AD_MASK, SPTE_TDP_AD_DISABLED, "level {level}");
        assert_eq!(e & ACCESSED, 0, "level {level}");
    }
    // Hardware accesses hit and set nothing.
    let r = reads(&v, 8, 100);
    assert_eq!(r[0].faults, 7, "only the 7 pages not yet mapped fault");
    assert_eq!(v.spte(5, false).unwrap(), s);
    v.check().unwrap();
}

#[test]
fn without_ad_bits_aging_access_tracks_and_the_fast_path_restores() {
    use tdpmmu_core::spte::{PT_EXEC, PT_READABLE, RWX_MASK, is_access_track_spte};
    let v = vm_no_ad(64 << 20, 4096);
    // Map 64 pages by guest writes (the slow path), then age them all.
    let r = reads(&v, 64, 100);
    assert_eq!(r[0].faults, 64);
    assert!(v.test_age_gfn(0, 64).unwrap(), "a fresh leaf is young");
    let before = v.spte(10, false).unwrap();
    let modeled = v.stats().iter().find(|s| s.0 == "modeled_ns").unwrap().1;
    assert!(v.age_gfn_range(0, 64).unwrap());
    assert_eq!(c(&v, C::sptes_aged), 64);
    let k = CostModel::default();
    let aged_ns = v.stats().iter().find(|s| s.0 == "modeled_ns").unwrap().1 - modeled;
    assert_eq!(
        aged_ns,
        64.0 * k.spte_update_ns,
        "one SPTE update each, as A-bit aging"
    );
    let t = v.spte(10, false).unwrap();
    assert!(is_access_track_spte(t));
    assert_eq!(t & RWX_MASK, 0);
    assert_eq!(t >> 54 & 0b101, 0b101, "R and X saved");
    assert_eq!(t & !(RWX_MASK | (0b101 << 54)), before & !RWX_MASK);
    assert!(!v.test_age_gfn(0, 64).unwrap());
    assert!(
        !v.age_gfn_range(0, 64).unwrap(),
        "a tracked leaf is not young"
    );
    assert_eq!(c(&v, C::sptes_aged), 64);
    assert_eq!(c(&v, C::remote_tlb_flush), 0);
    v.check().unwrap();
    // A read faults (the leaf is not present to the CPU) and is fixed lockless: R and X back,
    // W not (the next write takes another fast fault).
    let r = v.fault(10, None, false, false, 0).unwrap();
    assert_eq!(r.ret, Ret::Fixed);
    assert_eq!(r.modeled_ns, k.exit_entry_ns + k.fast_fix_ns);
    assert_eq!((c(&v, C::pf_fast), c(&v, C::pf_fixed)), (1, 65));
    let s = v.spte(10, false).unwrap();
    assert_eq!(s & RWX_MASK, PT_READABLE | PT_EXEC);
    assert!(v.test_age_gfn(10, 1).unwrap());
    assert!(!v.test_age_gfn(11, 1).unwrap());
    assert_eq!(write(&v, 10), Ret::Fixed);
    assert_eq!(c(&v, C::pf_fast), 2);
    assert_eq!(v.spte(10, false).unwrap(), before);
    // A write to a tracked leaf restores R, X and W in one cmpxchg.
    assert_eq!(write(&v, 11), Ret::Fixed);
    assert_eq!(c(&v, C::pf_fast), 3);
    assert_eq!(v.spte(11, false).unwrap() & RWX_MASK, RWX_MASK);
    // The guest's memstress pass over the rest: every access faults once, on the fast path.
    let r = reads(&v, 64, 0);
    assert_eq!(r[0].faults, 62);
    assert_eq!(c(&v, C::pf_fast), 65);
    assert_eq!(c(&v, C::pf_fixed), 64 + 65);
    v.check().unwrap();
}

#[test]
fn without_ad_bits_a_write_the_restored_leaf_does_not_allow_takes_the_slow_path() {
    use tdpmmu_core::spte::is_access_track_spte;
    let v = vm_no_ad(64 << 20, 4096);
    // A write-tracked page is mapped read-only and not MMU-writable.
    v.write_track_gfn(3, true).unwrap();
    assert_eq!(v.fault(3, None, false, false, 0).unwrap().ret, Ret::Fixed);
    assert!(v.age_gfn_range(3, 1).unwrap());
    assert!(is_access_track_spte(v.spte(3, false).unwrap()));
    let fast = c(&v, C::pf_fast);
    // is_access_allowed on the restored leaf fails (no W): the slow path emulates the write.
    assert_eq!(write(&v, 3), Ret::WriteProtected);
    assert_eq!(c(&v, C::pf_fast), fast);
    v.check().unwrap();
}

#[test]
fn without_ad_bits_dirty_logging_write_protects_and_pml_is_refused() {
    let v = vm_no_ad(64 << 20, 4096);
    v.populate(0, 64, None, 0).unwrap();
    // A pre-fault's leaf starts access-tracked with A/D off (make_spte marks it).
    assert!(!v.test_age_gfn(0, 64).unwrap());
    v.check().unwrap();
    let e = v
        .set_dirty_logging(0, true, false, false, true, true)
        .unwrap_err();
    assert!(e.to_string().starts_with("pml"), "{e}");
    // Access-tracked leaves have no W to take: nothing to write-protect yet.
    assert_eq!(
        v.set_dirty_logging(0, true, false, false, true, false)
            .unwrap(),
        0
    );
    // A write to a tracked, MMU-writable leaf: fast path restores RWX and logs the page.
    assert_eq!(write(&v, 7), Ret::Fixed);
    assert_eq!(c(&v, C::dirty_pages_logged), 1);
    // A read restores R/X only and logs nothing.
    assert_eq!(v.fault(8, None, false, false, 0).unwrap().ret, Ret::Fixed);
    assert_eq!(c(&v, C::dirty_pages_logged), 1);
    let log = v.get_dirty_log(0).unwrap();
    assert!(bit(&log, 7) && !bit(&log, 8));
    assert_eq!(v.spte(7, false).unwrap() & PT_WRITABLE, 0, "re-protected");
    v.check().unwrap();
    assert_eq!(write(&v, 8), Ret::Fixed);
    assert!(bit(&v.get_dirty_log(0).unwrap(), 8));
    v.check().unwrap();
}

#[test]
fn without_ad_bits_split_and_recovery_keep_access_tracking() {
    use tdpmmu_core::spte::{PT_EXEC, is_access_track_spte, restore_acc_track_spte};
    let v = Vm::new(VmConfig {
        memory: 64 << 20,
        backing: 2 << 20,
        nx_huge_pages: true,
        ad_bits: false,
        ..VmConfig::default()
    })
    .unwrap();
    assert_eq!(v.fault(5, None, true, false, 0).unwrap().level, 2);
    assert!(v.age_gfn_range(0, 512).unwrap());
    // The NX huge leaf splits to 4K children that stay tracked, with X in the saved bits.
    assert_eq!(v.split_huge_pages(0, 512, 1).unwrap(), 1);
    let child = v.spte(9, false).unwrap();
    assert!(is_access_track_spte(child));
    assert_ne!(restore_acc_track_spte(child) & PT_EXEC, 0);
    v.check().unwrap();
    // A fetch restores it on the fast path.
    assert_eq!(v.fault(9, None, false, true, 0).unwrap().ret, Ret::Fixed);
    assert_eq!(c(&v, C::pf_fast), 1);
    v.check().unwrap();
}

#[test]
fn without_ad_bits_check_rejects_a_malformed_access_tracked_leaf() {
    use std::sync::atomic::Ordering;
    use tdpmmu_core::spte::{ACC_TRACK_SAVED_BITS_SHIFT, restore_acc_track_spte};
    let v = vm_no_ad(64 << 20, 4096);
    write(&v, 3);
    v.age_gfn_range(3, 1).unwrap();
    v.check().unwrap();
    let root = v.mmu.tdp.vcpu_root(0, false);
    let (_, e) = v.mmu.tdp.leaf_ptr(root, 3, 0).unwrap();
    let good = e.load(Ordering::Acquire);
    for bad in [
        good & !(1 << ACC_TRACK_SAVED_BITS_SHIFT), // the saved R bit lost
        restore_acc_track_spte(good) | ACCESSED,   // A on an A/D-disabled leaf
        restore_acc_track_spte(good) | (1 << 56),  // saved bits on a leaf that is not tracked
    ] {
        e.store(bad, Ordering::Release);
        assert!(v.check().is_err(), "{bad:#x} passed check()");
    }
    e.store(good, Ordering::Release);
    v.check().unwrap();
}
