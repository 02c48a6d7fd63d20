//! Host mm operations on a memslot's shared mapping (MADV_DONTNEED, mprotect) as KVM's MMU
//! notifier and `hva_to_pfn` see them; each test fails if its rule were broken.

mod common;

use common::config;
use tdpmmu_core::spte::{self, is_shadow_present};
use tdpmmu_core::stats::C;
use tdpmmu_core::{Error, Ret, Vm, VmConfig};

fn vm(memory: u64, backing: u64) -> Vm {
    Vm::new(VmConfig {
        memory,
        backing,
        ..VmConfig::default()
    })
    .unwrap()
}

#[test]
fn madvise_dontneed_zaps_and_frees_so_the_next_touch_allocates_again() {
    let v = vm(16 << 20, 4096);
    for g in 0..8 {
        v.fault(g, None, true, false, 0).unwrap();
    }
    assert_eq!(v.counter(C::host_pages_allocated), 8);
    let zapped = v.madvise_dontneed(2, 4).unwrap();
    assert_eq!(zapped, 4);
    for g in 2..6 {
        assert!(
            !is_shadow_present(v.spte(g, false).unwrap()),
            "gfn {g} zapped"
        );
    }
    assert!(is_shadow_present(v.spte(1, false).unwrap()));
    assert!(is_shadow_present(v.spte(6, false).unwrap()));
    // Re-touching a freed page allocates it again; an untouched neighbour does not.
    let before = v.cost_breakdown();
    v.fault(3, None, false, false, 0).unwrap();
    v.fault(1, None, false, false, 0).unwrap();
    assert_eq!(v.counter(C::host_pages_allocated), 9);
    let after = v.cost_breakdown();
    let alloc = |b: &[(&str, f64)]| {
        b.iter()
            .find(|(n, _)| *n == "host_page_alloc_ns")
            .unwrap()
            .1
    };
    assert!(
        alloc(&after) > alloc(&before),
        "the re-touch pays the allocation"
    );
    v.check().unwrap();
}

#[test]
fn madvise_dontneed_refuses_guest_memfd_and_misaligned_hugetlb_ranges() {
    let v = Vm::new(config("sw_protected", "", &[]).unwrap()).unwrap();
    match v.madvise_dontneed(0, 1) {
        Err(Error::Config(m)) => assert!(m.contains("guest_memfd"), "{m}"),
        r => panic!("expected a ConfigError, got {r:?}"),
    }
    let h = vm(8 << 20, 2 << 20);
    h.fault(0, None, true, false, 0).unwrap();
    assert!(matches!(h.madvise_dontneed(1, 511), Err(Error::Config(_))));
    assert!(matches!(h.madvise_dontneed(0, 1), Err(Error::Config(_))));
    assert!(
        is_shadow_present(h.spte(0, false).unwrap()),
        "a refused call changes nothing"
    );
    assert_eq!(h.madvise_dontneed(0, 512).unwrap(), 1);
    h.fault(0, None, true, false, 0).unwrap();
    assert_eq!(h.counter(C::host_pages_allocated), 2);
}

#[test]
fn mprotect_read_only_writes_fail_with_memory_fault_reads_map_read_only() {
    let v = vm(16 << 20, 4096);
    for g in 0..4 {
        v.fault(g, None, true, false, 0).unwrap();
    }
    assert_eq!(
        v.mprotect(0, 2, false).unwrap(),
        2,
        "the notifier zaps the range"
    );
    let r = v.fault(0, None, true, false, 0).unwrap();
    assert_eq!(r.ret, Ret::MemoryFault);
    assert!(
        !is_shadow_present(v.spte(0, false).unwrap()),
        "nothing mapped"
    );
    assert_eq!(v.counter(C::pf_memory_fault), 1);
    let r = v.fault(1, None, false, false, 0).unwrap();
    assert_eq!(r.ret, Ret::Fixed);
    let s = v.spte(1, false).unwrap();
    assert_eq!(
        s & (spte::PT_WRITABLE | spte::HOST_WRITABLE | spte::MMU_WRITABLE),
        0
    );
    // The write to the read-only leaf faults again (not fixed by the fast path).
    assert_eq!(
        v.fault(1, None, true, false, 0).unwrap().ret,
        Ret::MemoryFault
    );
    assert_eq!(v.counter(C::pf_memory_fault), 2);
    // Outside the range: still writable, still mapped.
    assert_eq!(v.fault(2, None, true, false, 0).unwrap().ret, Ret::Spurious);
    // mprotect RW: invalidates again (the read-only leaf goes) and writes map writable.
    assert_eq!(v.mprotect(0, 2, true).unwrap(), 1);
    assert_eq!(v.fault(1, None, true, false, 0).unwrap().ret, Ret::Fixed);
    assert_ne!(v.spte(1, false).unwrap() & spte::PT_WRITABLE, 0);
    v.check().unwrap();
}

#[test]
fn mprotect_leaves_private_accesses_alone() {
    let v = Vm::new(config("sw_protected", "", &[]).unwrap()).unwrap();
    v.mprotect(0, 16, false).unwrap();
    // Slot 0 starts private: a private write comes from guest_memfd, not the host mapping.
    assert_eq!(
        v.fault(0, Some(true), true, false, 0).unwrap().ret,
        Ret::Fixed
    );
    v.set_memory_attributes(8, 1, false).unwrap();
    assert_eq!(
        v.fault(8, Some(false), true, false, 0).unwrap().ret,
        Ret::MemoryFault
    );
}
