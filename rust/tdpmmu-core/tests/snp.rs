//! SEV-SNP and SW_PROTECTED_VM behaviours (spec §8, §10 item 24 and the SNP parts of 5/8/14).

mod common;

use common::{c, config};
use tdpmmu_core::spte::is_shadow_present;
use tdpmmu_core::stats::C;
use tdpmmu_core::{Error, Ret, Vm, VmConfig};

fn vm(vm_type: &str, hooks: &str, opts: &[(&str, &str)], backing: u64) -> Vm {
    Vm::new(VmConfig {
        backing,
        trace: true,
        ..config(vm_type, hooks, opts).unwrap()
    })
    .unwrap()
}

#[test]
fn b24_first_private_fault_makes_the_page_private_once() {
    let v = vm("snp", "gmem", &[], 4096);
    let r = v.fault(7, Some(true), true, false, 0).unwrap();
    assert_eq!(r.ret, Ret::Fixed);
    assert_eq!(c(&v, C::rmpupdate), 1);
    assert_eq!(c(&v, C::pvalidate), 1);
    assert_eq!(v.rmp_entry(7).unwrap(), (true, true, false, 7));
    // NPT zaps never change the RMP; a re-fault needs neither RMPUPDATE nor PVALIDATE.
    v.zap_gfn_range(0, 16).unwrap();
    assert_eq!(v.rmp_entry(7).unwrap(), (true, true, false, 7));
    v.fault(7, Some(true), true, false, 0).unwrap();
    assert_eq!(c(&v, C::rmpupdate), 1);
    assert_eq!(c(&v, C::pvalidate), 1);
    // One NPT root for private and shared, no hooks.
    assert_eq!(v.roots_snapshot().len(), 1);
    assert_eq!(c(&v, C::set_external_spte), 0);
    v.check().unwrap();
}

#[test]
fn b24_2m_folio_gets_a_2m_rmp_entry_and_partial_free_psmashes() {
    let v = vm("snp", "gmem", &[("folio", "2M")], 2 << 20);
    let r = v.fault(512 + 3, Some(true), true, false, 0).unwrap();
    assert_eq!(r.level, 2, "RMP 2M + folio 2M + 2M backing → 2M NPT leaf");
    assert_eq!(c(&v, C::rmpupdate), 1);
    assert!(v.rmp_entry(512 + 9).unwrap().2, "2M entry");
    v.check().unwrap();
    // Free only part of the 2M folio: PSMASH, then RMPUPDATE to shared for those pages.
    v.punch_hole(512, 16).unwrap();
    assert_eq!(c(&v, C::psmash), 1);
    assert_eq!(c(&v, C::rmpupdate), 1 + 16);
    assert!(!v.rmp_entry(512).unwrap().0);
    assert_eq!(
        v.rmp_entry(512 + 100).unwrap(),
        (true, true, false, 512 + 100)
    );
    v.check().unwrap();
    // Freeing a whole 2M entry converts it at once.
    v.fault(2048, Some(true), true, false, 0).unwrap();
    let before = c(&v, C::rmpupdate);
    v.punch_hole(2048, 512).unwrap();
    assert_eq!(c(&v, C::rmpupdate), before + 1);
    assert_eq!(c(&v, C::psmash), 1);
}

#[test]
fn b24_rmp_size_mismatch_fault_psmashes_and_zaps_512() {
    let v = vm("snp", "gmem", &[("folio", "2M")], 2 << 20);
    v.fault(0, Some(true), true, false, 0).unwrap();
    assert!(is_shadow_present(v.spte(5, false).unwrap()));
    v.rmp_fault(5).unwrap();
    assert_eq!(c(&v, C::psmash), 1);
    assert!(!v.rmp_entry(5).unwrap().2, "split to 4K entries");
    assert!(
        !is_shadow_present(v.spte(5, false).unwrap()),
        "the 2M range was zapped"
    );
    // The NPT is rebuilt at the RMP's size.
    assert_eq!(v.fault(5, Some(true), true, false, 0).unwrap().level, 1);
    v.check().unwrap();
}

#[test]
fn pvalidate_rules() {
    let v = vm("snp", "gmem", &[], 4096);
    assert!(
        matches!(v.pvalidate(3, 1, false, true), Err(Error::Config(_))),
        "unassigned page"
    );
    v.fault(3, Some(true), true, false, 0).unwrap();
    let r = v.pvalidate(3, 1, false, true).unwrap();
    assert_eq!(r, vec![("NO_UPDATE", 1)], "double validation is reported");
    assert_eq!(c(&v, C::pvalidate_errors), 1);
    // Converted pages must be validated again: private → shared (zap + free the gmem page,
    // RMP back to shared) → private (prepare + PVALIDATE).
    v.set_memory_attributes(3, 1, false).unwrap();
    v.punch_hole(3, 1).unwrap();
    assert!(!v.rmp_entry(3).unwrap().0);
    v.set_memory_attributes(3, 1, true).unwrap();
    v.fault(3, Some(true), true, false, 0).unwrap();
    assert_eq!(c(&v, C::rmpupdate), 3);
    assert_eq!(
        c(&v, C::pvalidate),
        3,
        "validate, double validate, validate again"
    );
    assert_eq!(v.rmp_entry(3).unwrap(), (true, true, false, 3));
    v.check().unwrap();
}

#[test]
fn designs_differ_on_private_zap_and_refault() {
    // A private NPT zap (conversion to shared) followed by converting back and re-faulting.
    let mut counts = vec![];
    for design in ["gmem", "private"] {
        let v = vm("snp", design, &[], 4096);
        v.fault(9, Some(true), true, false, 0).unwrap();
        let (u0, p0) = (c(&v, C::rmpupdate), c(&v, C::pvalidate));
        assert_eq!(v.set_memory_attributes(9, 1, false).unwrap(), 1);
        v.set_memory_attributes(9, 1, true).unwrap();
        assert_eq!(
            v.fault(9, Some(true), true, false, 0).unwrap().ret,
            Ret::Fixed
        );
        counts.push((c(&v, C::rmpupdate) - u0, c(&v, C::pvalidate) - p0));
        v.check().unwrap();
    }
    assert_eq!(counts[0], (0, 0), "gmem: the NPT zap leaves the RMP alone");
    assert_eq!(
        counts[1],
        (2, 1),
        "private: to shared and back, and the guest re-validates"
    );
}

#[test]
fn private_design_breaks_on_unflagged_zaps() {
    // kvm_zap_gfn_range carries no private flag: under "private" the RMP is not told, and the
    // re-fault's RMPUPDATE finds the page still assigned — the VM is bugged, not silently wrong.
    let v = vm("snp", "private", &[], 4096);
    v.fault(9, Some(true), true, false, 0).unwrap();
    v.zap_gfn_range(9, 1).unwrap();
    assert!(matches!(
        v.fault(9, Some(true), true, false, 0),
        Err(Error::Bugged(_))
    ));
    assert!(v.bugged());
    let g = vm("snp", "gmem", &[], 4096);
    g.fault(9, Some(true), true, false, 0).unwrap();
    g.zap_gfn_range(9, 1).unwrap();
    g.fault(9, Some(true), true, false, 0).unwrap();
    g.check().unwrap();
}

#[test]
fn sw_protected_today_and_mirrored() {
    let v = vm("sw_protected", "none", &[("folio", "2M")], 2 << 20);
    let r = v.fault(1, Some(true), true, false, 0).unwrap();
    assert_eq!((r.ret, r.level), (Ret::Fixed, 2));
    assert_eq!(
        v.fault(1, Some(false), true, false, 0).unwrap().ret,
        Ret::MemoryFault
    );
    // Conversion zaps and re-faults; no hooks, no RMP.
    assert_eq!(v.set_memory_attributes(0, 512, false).unwrap(), 1);
    assert_eq!(
        v.fault(1, Some(false), true, false, 0).unwrap().ret,
        Ret::Fixed
    );
    // A mixed 2M range can only be mapped at 4K.
    v.set_memory_attributes(512, 1, false).unwrap();
    assert_eq!(v.fault(513, Some(true), true, false, 0).unwrap().level, 1);
    v.check().unwrap();

    let m = vm("sw_protected", "mirror", &[("mirror", "true")], 4096);
    assert_eq!(m.shared_bit(), 1 << 35);
    m.fault(4, Some(true), true, false, 0).unwrap();
    assert_eq!(c(&m, C::link_external_spt), 3);
    assert_eq!(c(&m, C::set_external_spte), 1);
    assert_eq!(
        c(&m, C::page_aug) + c(&m, C::sept_add),
        0,
        "no SEAMCALLs in software"
    );
    let k = tdpmmu_core::CostModel::default();
    assert_eq!(
        m.stats()
            .into_iter()
            .find(|(n, _)| *n == "modeled_ns")
            .unwrap()
            .1,
        k.exit_entry_ns + k.fault_handling_ns + k.fault_map_ns + k.host_page_alloc_ns
    );
    m.set_memory_attributes(4, 1, false).unwrap();
    assert_eq!(c(&m, C::remove_external_spte), 1);
    m.check().unwrap();
    m.destroy().unwrap();
    assert_eq!(c(&m, C::free_external_spt), 3);
}

#[test]
fn invalid_combinations_are_config_errors() {
    for (t, h, mirror) in [
        ("snp", "mirror", false),
        ("snp", "none", false),
        ("sw_protected", "mirror", false),
        ("sw_protected", "gmem", false),
        ("default", "gmem", false),
        ("tdx", "gmem", false),
        ("default", "none", true),
    ] {
        let m = if mirror { "true" } else { "false" };
        let cfg = config(t, h, &[("mirror", m)]).unwrap();
        assert!(
            matches!(Vm::new(cfg), Err(Error::Config(_))),
            "{t}/{h}/{mirror}"
        );
    }
    // A 1G folio does not exist; a folio on a VM without guest_memfd is refused.
    let cfg = config("snp", "", &[("folio", "1G")]).unwrap();
    assert!(matches!(Vm::new(cfg), Err(Error::Config(_))));
    let cfg = config("default", "", &[("folio", "2M")]).unwrap();
    assert!(matches!(Vm::new(cfg), Err(Error::Config(_))));
    // Unknown names are refused where they are parsed.
    assert!(config("bogus", "", &[]).is_err());
    assert!(config("tdx", "bogus", &[]).is_err());
}

/// Regressions found by the differential test.
#[test]
fn regressions_from_the_differential_test() {
    // populate stops (VmBugged) instead of retrying forever after a KVM_BUG_ON.
    let v = vm("snp", "private", &[], 4096);
    v.fault(0, Some(true), true, false, 0).unwrap();
    v.mmu_notifier_invalidate(0, 1).unwrap();
    assert!(matches!(
        v.populate(0, 1, Some(true), 0),
        Err(Error::Bugged(_))
    ));

    // A 2M-folio slot whose size is not a multiple of 2M: the tail gets 4K entries, no panic.
    let v = vm("snp", "gmem", &[("folio", "2M")], 4096);
    v.add_memslot(0x100000, 100, 4096, true).unwrap();
    v.set_memory_attributes(0x100000, 100, true).unwrap();
    assert_eq!(
        v.fault(0x100063, Some(true), true, false, 0).unwrap().ret,
        Ret::Fixed
    );
    v.check().unwrap();

    // A slot whose gfn is not 2M aligned with its guest_memfd offset gets 4K entries with the
    // right gpa.
    let v = vm("snp", "gmem", &[("folio", "2M")], 4096);
    v.add_memslot(0x100100, 1024, 4096, true).unwrap();
    v.set_memory_attributes(0x100100, 1024, true).unwrap();
    v.fault(0x100105, Some(true), true, false, 0).unwrap();
    assert_eq!(
        v.rmp_entry(0x100105).unwrap(),
        (true, true, false, 0x100105)
    );
    v.check().unwrap();

    // populate of a private range reaching into a slot without guest_memfd is refused whole.
    let v = vm("sw_protected", "none", &[], 4096);
    v.add_memslot(0x40000, 512, 4096, false).unwrap();
    v.set_memory_attributes(0x40000, 512, true).unwrap();
    let before = v.stats();
    assert!(matches!(
        v.populate(0x3fffc, 8, Some(true), 0),
        Err(Error::Config(_))
    ));
    assert_eq!(v.stats(), before);
}
