//! KVM rules on a default VM, each test written to fail if the rule were broken.

use tdpmmu_core::memslot::DATA_BASE_PFN;
use tdpmmu_core::spte::{self, SHADOW_NONPRESENT_VALUE, make_leaf_spte};
use tdpmmu_core::stats::C;
use tdpmmu_core::{Design, MemstressArgs, Ret, Vm, VmConfig};

const M2: u64 = 512;
const G1: u64 = 262_144;

fn vm(memory: u64, backing: u64) -> Vm {
    Vm::new(VmConfig {
        memory,
        backing,
        ..VmConfig::default()
    })
    .unwrap()
}

fn stat(vm: &Vm, name: &str) -> f64 {
    vm.stats().into_iter().find(|(n, _)| *n == name).unwrap().1
}

fn c(vm: &Vm, c: C) -> i64 {
    vm.counter(c)
}

#[test]
fn first_fault_links_three_tables_and_installs_the_leaf() {
    let vm = vm(1 << 30, 4096);
    let r = vm.fault(5, None, true, false, 0).unwrap();
    assert_eq!(r.ret, Ret::Fixed);
    assert_eq!(r.level, 1);
    assert_eq!(r.spte, (DATA_BASE_PFN + 5) << 12 | 0x8600_0000_0000_0b77);
    let w = vm.walk(5, false).unwrap();
    assert_eq!(w.len(), 4);
    for (lvl, s) in &w[..3] {
        assert!(*lvl > 1);
        assert_eq!(s & 0x8000_0000_0000_0fff, 0x8000_0000_0000_0907);
    }
    assert_eq!(c(&vm, C::tdp_mmu_pages), 3);
    assert_eq!(c(&vm, C::roots_allocated), 1);
    // Same 2M: no new tables; same page again: spurious, nothing changes.
    vm.fault(6, None, false, false, 0).unwrap();
    assert_eq!(c(&vm, C::tdp_mmu_pages), 3);
    let r = vm.fault(5, None, true, false, 0).unwrap();
    assert_eq!(r.ret, Ret::Spurious);
    assert_eq!(c(&vm, C::pf_spurious), 1);
    assert_eq!(c(&vm, C::pages_4k), 2);
    assert_eq!(
        c(&vm, C::remote_tlb_flush),
        0,
        "installing over non-present never flushes"
    );
    vm.check().unwrap();
}

#[test]
fn read_fault_maps_writable() {
    let vm = vm(1 << 30, 4096);
    let r = vm.fault(9, None, false, false, 0).unwrap();
    assert_eq!(r.spte, make_leaf_spte(DATA_BASE_PFN + 9, 1, true, false));
}

#[test]
fn huge_backing_maps_huge_leaves() {
    let vm2 = vm(1 << 30, 2 << 20);
    let r = vm2.fault(M2 + 3, None, true, false, 0).unwrap();
    assert_eq!((r.ret, r.level), (Ret::Fixed, 2));
    assert_eq!(r.spte, make_leaf_spte(DATA_BASE_PFN + M2, 2, true, false));
    assert_ne!(r.spte & spte::PAGE_SIZE, 0);
    assert_eq!(c(&vm2, C::pages_2m), 1);
    assert_eq!(c(&vm2, C::tdp_mmu_pages), 2);
    let vm1 = vm(2 << 30, 1 << 30);
    let r = vm1.fault(G1 + 7, None, true, false, 0).unwrap();
    assert_eq!((r.ret, r.level), (Ret::Fixed, 3));
    assert_eq!(c(&vm1, C::pages_1g), 1);
    vm1.check().unwrap();
}

#[test]
fn nx_huge_pages_split_without_flush_and_disallow_rehuge() {
    let vm = Vm::new(VmConfig {
        memory: 1 << 30,
        backing: 2 << 20,
        nx_huge_pages: true,
        ..VmConfig::default()
    })
    .unwrap();
    // A data fault maps 2M without X.
    let r = vm.fault(0, None, true, false, 0).unwrap();
    assert_eq!(r.level, 2);
    assert_eq!(r.spte & spte::PT_EXEC, 0);
    // An exec fault in it needs 4K: the huge page is split (children regain X), no flush.
    let r = vm.fault(3, None, false, true, 0).unwrap();
    assert_eq!(r.level, 1);
    assert_eq!(r.ret, Ret::Spurious);
    assert_ne!(r.spte & spte::PT_EXEC, 0);
    assert_eq!(c(&vm, C::huge_page_splits), 1);
    assert_eq!(c(&vm, C::pages_2m), 0);
    assert_eq!(c(&vm, C::pages_4k), 512);
    assert_eq!(c(&vm, C::remote_tlb_flush), 0, "splitting never flushes");
    vm.check().unwrap();
    // Exec fault on an empty 2M range: 4K only, its table is NX-disallowed...
    let r = vm.fault(M2 + 1, None, false, true, 0).unwrap();
    assert_eq!((r.ret, r.level), (Ret::Fixed, 1));
    // ...so a later data fault there stays at 4K instead of replacing the table.
    let r = vm.fault(M2 + 2, None, true, false, 0).unwrap();
    assert_eq!((r.ret, r.level), (Ret::Fixed, 1));
    assert_eq!(c(&vm, C::remote_tlb_flush), 0);
    vm.check().unwrap();
}

#[test]
fn huge_leaf_over_present_table_tears_it_down_and_flushes() {
    let vm = Vm::new(VmConfig {
        memory: 1 << 30,
        slot_zap_all: false,
        ..VmConfig::default()
    })
    .unwrap();
    let s1 = vm.add_memslot(1 << 20, M2, 4096, false).unwrap();
    vm.fault((1 << 20) + 1, None, true, false, 0).unwrap();
    assert_eq!(c(&vm, C::tdp_mmu_pages), 3);
    vm.delete_memslot(s1).unwrap();
    assert_eq!(c(&vm, C::pages_4k), 0, "leaf zap removes the leaf");
    let flushes = c(&vm, C::remote_tlb_flush);
    assert_eq!(flushes, 1);
    vm.add_memslot(1 << 20, M2, 2 << 20, false).unwrap();
    let r = vm.fault((1 << 20) + 1, None, true, false, 0).unwrap();
    assert_eq!((r.ret, r.level), (Ret::Fixed, 2));
    assert_eq!(
        c(&vm, C::remote_tlb_flush),
        flushes + 1,
        "replacing a present non-leaf flushes"
    );
    vm.check().unwrap();
}

#[test]
fn zap_flush_accounting() {
    let vm = vm(1 << 30, 4096);
    assert_eq!(vm.zap_gfn_range(0, 1024).unwrap(), 0);
    assert_eq!(c(&vm, C::remote_tlb_flush), 0, "nothing zapped, no flush");
    for g in 0..10 {
        vm.fault(g, None, true, false, 0).unwrap();
    }
    assert_eq!(vm.zap_gfn_range(2, 5).unwrap(), 5);
    assert_eq!(c(&vm, C::remote_tlb_flush), 1);
    assert_eq!(
        vm.spte(3, false).unwrap(),
        SHADOW_NONPRESENT_VALUE,
        "zapped entries are bit 63, never 0"
    );
    assert_eq!(vm.mmu_notifier_invalidate(0, 1 << 18).unwrap(), 5);
    assert_eq!(c(&vm, C::remote_tlb_flush), 2);
    assert_eq!(c(&vm, C::tdp_mmu_pages), 3, "leaf zaps keep the tables");
    vm.check().unwrap();
}

#[test]
fn fast_zap_frees_roots_without_flush_and_vcpus_reload() {
    let vm = Vm::new(VmConfig {
        vcpus: 3,
        ..VmConfig::default()
    })
    .unwrap();
    vm.fault(1, None, true, false, 0).unwrap();
    vm.fault(2, None, true, false, 1).unwrap();
    let roots = vm.roots_snapshot();
    assert_eq!(roots.len(), 1);
    assert_eq!(
        roots[0].refcount, 3,
        "2 at creation + 1 for the second vCPU"
    );
    vm.check().unwrap();
    vm.zap_all_fast().unwrap();
    assert!(vm.roots_snapshot().is_empty());
    assert_eq!(c(&vm, C::roots_freed), 1);
    assert_eq!(c(&vm, C::remote_tlb_flush), 0);
    assert_eq!(c(&vm, C::pages_4k), 0);
    assert_eq!(c(&vm, C::tdp_mmu_pages), 0);
    assert_eq!(vm.walk(1, false).unwrap(), vec![]);
    vm.check().unwrap();
    let r = vm.fault(1, None, true, false, 2).unwrap();
    assert_eq!(r.ret, Ret::Fixed);
    assert_eq!(c(&vm, C::roots_allocated), 2);
    assert_eq!(vm.roots_snapshot()[0].refcount, 2);
    vm.check().unwrap();
}

#[test]
fn freed_tables_are_reused_after_the_operation_lifo() {
    let vm = vm(1 << 30, 4096);
    vm.fault(0, None, true, false, 0).unwrap();
    let before = vm.arena().high_water();
    vm.zap_all_fast().unwrap();
    vm.fault(0, None, true, false, 0).unwrap();
    assert_eq!(
        vm.arena().high_water(),
        before,
        "no new tables: the freed ones came back"
    );
    // The root was freed last, so it is popped first and becomes the new root.
    assert_eq!(vm.roots_snapshot()[0].table, 0);
}

#[test]
fn mmio_faults_and_generation() {
    let vm = vm(1 << 30, 4096);
    let g = 1 << 20;
    let r = vm.fault(g, None, true, false, 0).unwrap();
    assert_eq!(r.ret, Ret::Emulate);
    assert!(spte::is_mmio(r.spte));
    assert_eq!(c(&vm, C::pf_mmio_spte_created), 1);
    assert_eq!(c(&vm, C::pf_taken), 1);
    let r = vm.fault(g, None, true, false, 0).unwrap();
    assert_eq!(r.ret, Ret::Emulate);
    assert_eq!(c(&vm, C::pf_taken), 1, "MMIO cache hit takes no page fault");
    vm.add_memslot(g, 512, 4096, false).unwrap();
    assert_eq!(vm.memslot_generation(), 2);
    let r = vm.fault(g, None, true, false, 0).unwrap();
    assert_eq!(r.ret, Ret::Fixed);
    vm.check().unwrap();
}

#[test]
fn populate_is_prefetch() {
    let vm = vm(1 << 30, 2 << 20);
    assert_eq!(vm.populate(0, 4 * M2, None, 0).unwrap(), 4);
    assert_eq!(c(&vm, C::pf_taken), 0);
    assert_eq!(c(&vm, C::pf_fixed), 0);
    let s = vm.spte(5, false).unwrap();
    assert_eq!(s, make_leaf_spte(DATA_BASE_PFN, 2, true, true));
    assert_eq!(s & spte::ACCESSED, 0);
    // A pre-fault charges KVM's handling per leaf and the host page, no exit and no map step.
    let k = tdpmmu_core::CostModel::default();
    assert_eq!(
        stat(&vm, "modeled_ns"),
        4.0 * (k.fault_handling_ns + k.host_page_alloc_ns + 511.0 * k.host_zero_4k_ns)
    );
    assert!(
        vm.populate(0, 1 << 30, None, 0).is_err(),
        "range beyond memslots is rejected whole"
    );
    assert_eq!(c(&vm, C::pages_2m), 4);
}

#[test]
fn modeled_cost_of_a_first_touch_fault() {
    let vm = vm(1 << 30, 4096);
    let k = tdpmmu_core::CostModel::default();
    let r = vm.fault(0, None, true, false, 0).unwrap();
    let exit_and_kvm = k.exit_entry_ns + k.fault_handling_ns + k.fault_map_ns;
    assert_eq!(r.modeled_ns, exit_and_kvm + k.host_page_alloc_ns);
    // A write exit on a leaf that already allows it: fast_page_fault finds it spurious
    // without mmu_lock.
    let r = vm.fault(0, None, true, false, 0).unwrap();
    assert_eq!(r.ret, Ret::Spurious);
    assert_eq!(r.modeled_ns, k.exit_entry_ns + k.fast_fix_ns);
    // A read exit is not fast-path material: the slow path walks under the lock.
    let r = vm.fault(0, None, false, false, 0).unwrap();
    assert_eq!(r.modeled_ns, exit_and_kvm);
}

#[test]
fn bad_input_leaves_vm_unchanged() {
    let vm = vm(1 << 30, 4096);
    vm.fault(1, None, true, false, 0).unwrap();
    let before = vm.stats();
    assert!(vm.fault(1 << 36, None, true, false, 0).is_err());
    assert!(vm.fault(1, Some(true), true, false, 0).is_err());
    assert!(vm.fault(1, None, true, false, 1).is_err());
    assert!(vm.zap_gfn_range(0, 0).is_err());
    assert!(vm.add_memslot(0, 512, 4096, false).is_err(), "overlap");
    assert!(
        vm.add_memslot(1 << 20, 3, 2 << 20, false).is_err(),
        "unaligned"
    );
    assert!(vm.delete_memslot(7).is_err());
    assert_eq!(vm.stats(), before);
    assert_eq!(vm.memslot_generation(), 0);
    for bad in [
        VmConfig {
            levels: 3,
            ..VmConfig::default()
        },
        VmConfig {
            memory: 4095,
            ..VmConfig::default()
        },
        VmConfig {
            memory: 1 << 50,
            ..VmConfig::default()
        },
        VmConfig {
            vcpus: 0,
            ..VmConfig::default()
        },
        VmConfig {
            backing: 8192,
            ..VmConfig::default()
        },
        VmConfig {
            hooks: Some(Design::Mirror),
            ..VmConfig::default()
        },
    ] {
        assert!(Vm::new(bad).is_err());
    }
}

#[test]
fn five_level_roots() {
    let vm = Vm::new(VmConfig {
        levels: 5,
        ..VmConfig::default()
    })
    .unwrap();
    vm.fault(3, None, true, false, 0).unwrap();
    assert_eq!(vm.walk(3, false).unwrap().len(), 5);
    assert_eq!(c(&vm, C::tdp_mmu_pages), 4);
    vm.check().unwrap();
}

#[test]
fn concurrent_vcpus_agree_with_check() {
    let vm = Vm::new(VmConfig {
        vcpus: 4,
        memory: 256 << 20,
        ..VmConfig::default()
    })
    .unwrap();
    let pages = (256 << 20) / 4096 / 4;
    for overlap in [true, false] {
        let res = vm
            .run_memstress(&MemstressArgs {
                vcpus: 4,
                pages_per_vcpu: pages,
                base_gfn: 0,
                overlap,
                random_access: overlap,
                write_percent: 100,
                seed: 1,
                rng_skip: 0,
                private: None,
            })
            .unwrap();
        assert_eq!(res.len(), 4);
        assert!(res.iter().all(|r| r.pages == pages));
        vm.check().unwrap();
    }
    assert_eq!(c(&vm, C::pages_4k) as u64, 4 * pages);
    assert_eq!(c(&vm, C::host_pages_allocated) as u64, 4 * pages);
}
