//! The virtual-time engine: determinism, the counters adding up, and the scaling behaviours
//! that must emerge from the mechanisms (each test fails if its mechanism were missing).

mod common;

use common::config;
use tdpmmu_core::memstress::MemstressArgs;
use tdpmmu_core::vtime::{Machine, Userfault, VtArgs, VtResult};
use tdpmmu_core::{Vm, VmConfig};

fn vm(vm_type: &str, vcpus: u32, memory: u64) -> Vm {
    Vm::new(VmConfig {
        vcpus,
        memory,
        ..config(vm_type, "", &[]).unwrap()
    })
    .unwrap()
}

fn args(vcpus: u32, pages: u64) -> VtArgs {
    VtArgs {
        ms: MemstressArgs {
            vcpus,
            pages_per_vcpu: pages,
            base_gfn: 0,
            overlap: false,
            random_access: false,
            write_percent: 100,
            seed: 1,
            private: None,
        },
        passes: 1,
        exclusive: false,
        userfault: Userfault::None,
        uffd_all: false,
        uffd_readers: 1,
        uffd_delay_ns: 0.0,
        machine: Machine::default(),
        tdx_module_1_0: false,
        remove: None,
        cpus: Vec::new(),
    }
}

fn run(vm_type: &str, a: &VtArgs) -> (Vm, VtResult) {
    let mem = (a.ms.pages_per_vcpu * a.ms.vcpus as u64 * 4096).max(1 << 30);
    let v = vm(vm_type, a.ms.vcpus, mem);
    let r = v.run_virtual(a).unwrap();
    (v, r)
}

/// Aggregate fault rate, faults per modeled second.
fn rate(r: &VtResult) -> f64 {
    let faults: u64 = r.vcpus.iter().map(|v| v.faults).sum();
    faults as f64 / (r.elapsed_ns * 1e-9)
}

fn faults(r: &VtResult) -> u64 {
    r.vcpus.iter().map(|v| v.faults).sum()
}

fn key(r: &VtResult) -> Vec<u64> {
    let mut k: Vec<u64> = r
        .vcpus
        .iter()
        .flat_map(|v| {
            [
                v.modeled_ns.to_bits(),
                v.accesses,
                v.hits,
                v.faults,
                v.fixed,
                v.spurious,
                v.retry,
            ]
        })
        .collect();
    k.extend(r.units.iter().map(|u| *u as u64));
    k.extend(r.waits.iter().map(|w| w.to_bits()));
    k.extend([
        r.elapsed_ns.to_bits(),
        r.lock_acquires,
        r.lock_contended,
        r.steps,
        r.switches,
    ]);
    k
}

fn tables(v: &Vm, pages: u64) -> Vec<u64> {
    (0..pages).map(|g| v.spte(g, false).unwrap()).collect()
}

#[test]
fn same_inputs_same_run_bit_for_bit() {
    let mut a = args(48, 256);
    a.ms.overlap = true;
    a.ms.random_access = true;
    a.ms.write_percent = 50;
    a.ms.seed = 7;
    let (v1, r1) = run("default", &a);
    let (v2, r2) = run("default", &a);
    assert_eq!(key(&r1), key(&r2));
    assert_eq!(v1.stats(), v2.stats());
    assert_eq!(tables(&v1, 256), tables(&v2, 256));
    // A different seed gives a different interleaving.
    a.ms.seed = 8;
    let (_v3, r3) = run("default", &a);
    assert_ne!(key(&r1), key(&r3));
}

#[test]
fn every_access_is_a_hit_or_one_final_outcome() {
    for (overlap, random) in [(false, false), (true, false), (true, true)] {
        let mut a = args(32, 512);
        a.ms.overlap = overlap;
        a.ms.random_access = random;
        a.ms.write_percent = 70;
        a.passes = 2;
        let (v, r) = run("default", &a);
        let mut sum = tdpmmu_core::vtime::VtVcpu::default();
        for x in &r.vcpus {
            assert_eq!(x.accesses, 2 * 512);
            assert_eq!(
                x.accesses,
                x.hits + x.fixed + x.spurious + x.emulate + x.write_protected,
                "{x:?}"
            );
            assert_eq!(
                x.faults,
                x.fixed + x.spurious + x.retry + x.emulate + x.memory_fault + x.write_protected
            );
            sum.faults += x.faults;
            sum.fixed += x.fixed;
            sum.spurious += x.spurious;
            sum.retry += x.retry;
        }
        let c = |n: &str| v.stats().iter().find(|(k, _)| *k == n).unwrap().1 as u64;
        assert_eq!(c("pf_taken"), sum.faults);
        assert_eq!(c("pf_fixed"), sum.fixed);
        assert_eq!(c("pf_spurious"), sum.spurious);
        assert_eq!(c("pf_retry"), sum.retry);
        // The vCPUs' modeled time is their ledger plus their waits, exactly.
        let rates = tdpmmu_core::CostModel::default().rates();
        let ledger: f64 = r
            .units
            .iter()
            .zip(rates.iter())
            .map(|(u, r)| *u as f64 * r)
            .sum();
        let waits: f64 = r.waits.iter().sum();
        let clocks: f64 = r.vcpus.iter().map(|x| x.modeled_ns).sum();
        assert!(
            (ledger + waits - clocks).abs() < 1e-6 * clocks,
            "{ledger} + {waits} vs {clocks}"
        );
        v.check().unwrap();
    }
}

#[test]
fn overlapping_first_touches_race_deterministically() {
    let mut a = args(16, 128);
    a.ms.overlap = true;
    let (_v, r) = run("default", &a);
    let spurious: u64 = r.vcpus.iter().map(|v| v.spurious).sum();
    let waited: f64 = r.waits[tdpmmu_core::cost::Wait::wait_host_mem as usize];
    // Every vCPU touches the same 128 pages: one fixes each, the others find it done (SPURIOUS)
    // or wait for the host page the first is still providing.
    let fixed: u64 = r.vcpus.iter().map(|v| v.fixed).sum();
    assert_eq!(fixed, 128);
    assert!(
        spurious > 0,
        "no spurious fault among 16 vCPUs on the same pages"
    );
    assert!(waited > 0.0);
    let (_v2, r2) = run("default", &a);
    assert_eq!(key(&r), key(&r2));
}

#[test]
fn exclusive_lock_saturates_while_shared_scales() {
    let rates = |excl: bool| -> Vec<f64> {
        [8u32, 64, 256]
            .iter()
            .map(|&n| {
                let mut a = args(n, 256);
                a.exclusive = excl;
                rate(&run("default", &a).1)
            })
            .collect()
    };
    let (sh, ex) = (rates(false), rates(true));
    let c = tdpmmu_core::CostModel::default();
    // Exclusive: the aggregate stops growing near 1 / (critical section).
    let cap = 1e9 / c.fault_map_ns;
    assert!(ex[2] < cap && ex[1] < cap, "{ex:?} vs cap {cap}");
    assert!(ex[2] < 1.1 * ex[1], "exclusive kept scaling: {ex:?}");
    // Shared keeps scaling past it until a host resource (here the contended cache lines of
    // the lock words) saturates.
    assert!(sh[1] > 2.0 * sh[0] && sh[1] > cap, "{sh:?}");
    assert!(sh[1] > 1.4 * ex[1], "shared {sh:?} vs exclusive {ex:?}");
    assert!(sh[2] > 1.4 * ex[2], "shared {sh:?} vs exclusive {ex:?}");
}

#[test]
fn stock_userfaultfd_scales_worse_than_memory_fault_exits() {
    let rate_of = |uf: Userfault, all: bool, n: u32| {
        let mut a = args(n, 128);
        a.userfault = uf;
        a.uffd_all = all;
        rate(&run("default", &a).1)
    };
    let shared32 = rate_of(Userfault::Missing, true, 32);
    let shared64 = rate_of(Userfault::Missing, true, 64);
    let shared256 = rate_of(Userfault::Missing, true, 256);
    let mf8 = rate_of(Userfault::MemoryFault, false, 8);
    let mf64 = rate_of(Userfault::MemoryFault, false, 64);
    // One userfaultfd for all: its reader, queue and wake-ups (which scan every waiter)
    // serialize; past a point the rate falls as vCPUs grow.
    assert!(
        shared256 < shared64 && shared64 < shared32,
        "{shared32} {shared64} {shared256}"
    );
    // Memory-fault exits: each vCPU resolves its own fault and the rate scales.
    assert!(mf64 > 4.0 * mf8, "{mf8} -> {mf64}");
    assert!(mf64 > 10.0 * shared64);
    // One userfaultfd per vCPU scales, but each fault pays two thread wake-ups.
    let per8 = rate_of(Userfault::Missing, false, 8);
    let per64 = rate_of(Userfault::Missing, false, 64);
    assert!(per8 < mf8 / 4.0, "{per8} vs {mf8}");
    assert!(per64 > 4.0 * per8, "{per8} -> {per64}");
}

#[test]
fn tdx_page_removal_costs_more_per_page_with_more_vcpus() {
    let mut per_page = vec![];
    for n in [4u32, 32, 64] {
        let pages = 64u64;
        let v = Vm::new(VmConfig {
            vcpus: n,
            memory: 1 << 30,
            ..config("tdx", "", &[]).unwrap()
        })
        .unwrap();
        v.finalize().unwrap();
        let mut a = args(n, pages);
        a.ms.private = Some(true);
        v.run_virtual(&a).unwrap();
        // Pages the vCPUs do not touch, removed while they run in the guest.
        let gfn = n as u64 * pages;
        v.populate(gfn, 128, Some(true), 0).unwrap();
        a.passes = 0;
        a.remove = Some((gfn, 128));
        let r = v.run_virtual(&a).unwrap();
        assert_eq!(r.removed, 128);
        assert_eq!(faults(&r), 0, "the vCPUs only hit their mapped pages");
        per_page.push(r.remove_ns / 128.0);
        v.check().unwrap();
    }
    assert!(
        per_page[0] < per_page[1] && per_page[1] < per_page[2],
        "{per_page:?}"
    );
}

#[test]
fn tdx_module_1_0_serializes_augs_of_one_td() {
    let busy = |one_zero: bool| {
        let v = Vm::new(VmConfig {
            vcpus: 32,
            memory: 1 << 30,
            ..config("tdx", "", &[]).unwrap()
        })
        .unwrap();
        v.finalize().unwrap();
        let mut a = args(32, 64);
        a.ms.private = Some(true);
        a.tdx_module_1_0 = one_zero;
        let r = v.run_virtual(&a).unwrap();
        let c = |n: &str| v.stats().iter().find(|(k, _)| *k == n).unwrap().1;
        (c("seamcall_busy"), c("tdx_local_retries"), rate(&r))
    };
    let (b15, _, r15) = busy(false);
    let (b10, lr10, r10) = busy(true);
    assert_eq!(b15, 0.0, "1.5: AUGs share the S-EPT lock");
    assert!(
        b10 > 0.0 && lr10 > 0.0,
        "1.0: concurrent AUGs collide and KVM retries locally"
    );
    assert!(r10 < r15);
}

#[test]
fn a_one_vcpu_run_charges_what_host_mode_charges_plus_waits() {
    let a = args(1, 2048);
    let (_v, r) = run("default", &a);
    let h = vm("default", 1, 1 << 30);
    h.run_memstress(&a.ms).unwrap();
    let host: Vec<(&str, f64)> = h.cost_breakdown();
    let rates = tdpmmu_core::CostModel::default().rates();
    for (i, (name, ns)) in host.iter().take(rates.len()).enumerate() {
        // Host mode has no zone-lock refills; virtual time charges them as a mechanism.
        if *name == "zone_lock_hold_ns" {
            continue;
        }
        assert_eq!(r.units[i] as f64 * rates[i], *ns, "{name}");
    }
}

#[test]
fn a_thousand_vcpus_on_one_thread() {
    let mut a = args(1024, 16);
    a.machine = Machine {
        sockets: 4,
        cores_per_socket: 128,
        threads_per_core: 2,
        mem_bw_gbps: 150.0,
    };
    let (v, r) = run("default", &a);
    assert_eq!(r.vcpus.len(), 1024);
    // Neighbours link shared upper-level tables at the same time: a few lose the cmpxchg.
    let fixed: u64 = r.vcpus.iter().map(|v| v.fixed).sum();
    assert_eq!(fixed, 1024 * 16);
    assert!(faults(&r) >= fixed);
    v.check().unwrap();
}

#[test]
fn bad_arguments_are_refused_and_leave_the_vm_unchanged() {
    let v = vm("default", 4, 1 << 30);
    let before = v.stats();
    let mut a = args(0, 16);
    assert!(v.run_virtual(&a).is_err());
    a = args(4, 16);
    a.passes = 0;
    assert!(
        v.run_virtual(&a)
            .unwrap_err()
            .to_string()
            .contains("passes")
    );
    a = args(4, 16);
    a.ms.private = Some(true);
    a.userfault = Userfault::Missing;
    assert!(v.run_virtual(&a).is_err());
    a = args(4, 16);
    a.machine.sockets = 0;
    assert!(
        v.run_virtual(&a)
            .unwrap_err()
            .to_string()
            .contains("machine.sockets")
    );
    a = args(8, 16);
    assert!(v.run_virtual(&a).unwrap_err().to_string().contains("vcpus"));
    assert_eq!(v.stats(), before);
}

#[test]
fn pinning_places_vcpus_and_cache_line_distance_follows_it() {
    // Two vCPUs fault the same pages (overlap): every lock word and SPTE line they share moves
    // between their CPUs, so SMT siblings (one core) pay less than CPUs on two sockets.
    let run_on = |cpus: Vec<u32>| {
        let mut a = args(2, 256);
        a.ms.overlap = true;
        a.cpus = cpus;
        run("default", &a).1
    };
    let line = |r: &VtResult| r.waits[tdpmmu_core::cost::Wait::wait_lock_line as usize];
    let smt = run_on(vec![0, 128]);
    let socket = run_on(vec![0, 1]);
    let remote = run_on(vec![0, 64]);
    assert!(line(&smt) > 0.0);
    assert!(
        line(&smt) < line(&socket),
        "{} vs {}",
        line(&smt),
        line(&socket)
    );
    assert!(
        line(&socket) < line(&remote),
        "{} vs {}",
        line(&socket),
        line(&remote)
    );
    assert!(smt.elapsed_ns < remote.elapsed_ns);
    // The default placement is vCPU i on CPU i: the same run as pinning [0, 1].
    assert_eq!(key(&run_on(Vec::new())), key(&socket));
    // All or nothing, inside the machine, one vCPU per CPU.
    let v = vm("default", 2, 1 << 30);
    let before = v.stats();
    for (cpus, what) in [
        (vec![0], "all or nothing"),
        (vec![0, 256], "not in the machine"),
        (vec![3, 3], "already runs"),
    ] {
        let mut a = args(2, 16);
        a.cpus = cpus;
        let e = v.run_virtual(&a).unwrap_err().to_string();
        assert!(e.contains("cpus") && e.contains(what), "{e}");
    }
    assert_eq!(v.stats(), before);
}
