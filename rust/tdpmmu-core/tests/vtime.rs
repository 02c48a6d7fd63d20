//! The virtual-time engine: determinism, the counters adding up, and the scaling behaviours
//! that must emerge from the mechanisms (each test fails if its mechanism were missing).

mod common;

use common::config;
use tdpmmu_core::memstress::MemstressArgs;
use tdpmmu_core::spte;
use tdpmmu_core::vtime::{AccessList, Machine, Userfault, VtArgs, VtResult};
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
            rng_skip: 0,
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
                x.hits + x.fixed + x.spurious + x.emulate + x.write_protected + x.memory_fault,
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

// ----- explicit per-vCPU access lists --------------------------------------------------------

fn list(gfns: impl IntoIterator<Item = u64>, write: bool) -> AccessList {
    AccessList {
        gfns: gfns.into_iter().collect(),
        writes: vec![write],
    }
}

fn run_lists(v: &Vm, lists: &[AccessList], a: &VtArgs) -> VtResult {
    v.run_virtual_accesses(lists, None, a).unwrap()
}

fn unit(r: &VtResult, name: &str) -> i64 {
    let i = tdpmmu_core::COST_FIELDS
        .iter()
        .position(|n| *n == name)
        .unwrap();
    r.units[i]
}

#[test]
fn a_list_equal_to_memstress_slices_is_the_same_run() {
    // The lists feed the same vCPU actor: sequential memstress slices given as lists give the
    // same run, bit for bit, counters and tables included.
    let mut a = args(8, 256);
    a.ms.write_percent = 100;
    let (v1, r1) = run("default", &a);
    let v2 = vm("default", 8, 1 << 30);
    let lists: Vec<AccessList> = (0..8u64)
        .map(|i| list(i * 256..(i + 1) * 256, true))
        .collect();
    let r2 = run_lists(&v2, &lists, &VtArgs::default());
    assert_eq!(key(&r1), key(&r2));
    assert_eq!(v1.stats(), v2.stats());
    assert_eq!(tables(&v1, 2048), tables(&v2, 2048));
}

#[test]
fn access_lists_are_deterministic() {
    // 16 vCPUs over shuffled, overlapping lists with mixed reads and writes.
    let lists: Vec<AccessList> = (0..16u64)
        .map(|v| {
            let gfns: Vec<u64> = (0..300u64).map(|i| (i * 37 + v * 11) % 512).collect();
            let writes = gfns.iter().map(|g| (g + v) % 3 == 0).collect();
            AccessList { gfns, writes }
        })
        .collect();
    let go = || {
        let v = vm("default", 16, 1 << 30);
        let r = run_lists(&v, &lists, &VtArgs::default());
        (key(&r), v.stats(), tables(&v, 512))
    };
    assert_eq!(go(), go());
}

#[test]
fn access_lists_contend_for_mmu_lock_when_faults_take_it_exclusive() {
    // N vCPUs writing disjoint lists: with mmu_lock taken for write the faults serialize, so
    // at high N the run takes longer than with it taken for read, and the lock queues.
    let n = 64u32;
    let lists: Vec<AccessList> = (0..n as u64)
        .map(|i| list((0..128).map(|j| i * 128 + j), true))
        .collect();
    let go = |excl: bool| {
        let v = vm("default", n, 1 << 30);
        let a = VtArgs {
            exclusive: excl,
            ..VtArgs::default()
        };
        run_lists(&v, &lists, &a)
    };
    let (sh, ex) = (go(false), go(true));
    let wait = |r: &VtResult| r.waits[tdpmmu_core::cost::Wait::wait_mmu_lock as usize];
    assert!(
        ex.elapsed_ns > 1.5 * sh.elapsed_ns,
        "exclusive {} vs shared {}",
        ex.elapsed_ns,
        sh.elapsed_ns
    );
    assert!(
        wait(&ex) > 10.0 * wait(&sh).max(1.0),
        "{} vs {}",
        wait(&ex),
        wait(&sh)
    );
    assert_eq!(faults(&sh), faults(&ex));
    // One vCPU alone has nobody to wait for: both modes cost the same.
    let v1 = vm("default", 1, 1 << 30);
    let v2 = vm("default", 1, 1 << 30);
    let one = &lists[..1];
    let r1 = run_lists(&v1, one, &VtArgs::default());
    let r2 = run_lists(
        &v2,
        one,
        &VtArgs {
            exclusive: true,
            ..VtArgs::default()
        },
    );
    assert_eq!(r1.elapsed_ns, r2.elapsed_ns);
}

#[test]
fn racing_first_touches_of_one_list_give_spurious_faults() {
    // Every vCPU writes the same 128 pages: one fixes each page, the others find it done
    // (SPURIOUS) or wait for the host page the first is still providing.
    let lists: Vec<AccessList> = (0..16).map(|_| list(0..128, true)).collect();
    let v = vm("default", 16, 1 << 30);
    let r = run_lists(&v, &lists, &VtArgs::default());
    let fixed: u64 = r.vcpus.iter().map(|x| x.fixed).sum();
    let spurious: u64 = r.vcpus.iter().map(|x| x.spurious).sum();
    assert_eq!(fixed, 128);
    assert!(
        spurious > 0,
        "no spurious fault among 16 vCPUs on the same pages"
    );
    assert!(r.waits[tdpmmu_core::cost::Wait::wait_host_mem as usize] > 0.0);
    // More than one vCPU took faults (host-side lists in turn would give them all to vCPU 0).
    assert!(r.vcpus.iter().filter(|x| x.fixed > 0).count() > 1);
    for x in &r.vcpus {
        assert_eq!(x.accesses, 128);
        assert_eq!(x.accesses, x.hits + x.fixed + x.spurious, "{x:?}");
    }
    v.check().unwrap();
}

#[test]
fn a_one_vcpu_list_charges_what_access_batch_charges_plus_guest_time() {
    // A list with reads, writes and repeats (writes to pages read before among them).
    let gfns: Vec<u64> = (0..600u64).map(|i| (i * 7) % 400).collect();
    let writes: Vec<bool> = (0..600).map(|i| i % 3 == 0).collect();
    let l = AccessList {
        gfns: gfns.clone(),
        writes: writes.clone(),
    };
    let v = vm("default", 1, 1 << 30);
    let r = run_lists(&v, std::slice::from_ref(&l), &VtArgs::default());
    let h = vm("default", 1, 1 << 30);
    let (hfaults, _) = h.access_batch(&gfns, &writes, None, 0).unwrap();
    let x = r.vcpus[0];
    assert_eq!(x.faults, hfaults);
    assert_eq!(x.accesses, 600);
    let host = h.cost_breakdown();
    let c = tdpmmu_core::CostModel::default();
    let rates = c.rates();
    for (i, (name, ns)) in host.iter().take(rates.len()).enumerate() {
        // Host mode has no zone-lock refills; virtual time charges them as a mechanism.
        if *name == "zone_lock_hold_ns" {
            continue;
        }
        assert_eq!(r.units[i] as f64 * rates[i], *ns, "{name}");
    }
    // The guest's own time: one attempt per access and one more per RETRY (a fixed fault
    // completes its access).
    assert!(x.faults >= 400 && x.hits > 0 && x.retry == 0, "{x:?}");
    let guest = r.waits[tdpmmu_core::cost::Wait::guest_ns as usize];
    assert_eq!(guest, (x.accesses + x.retry) as f64 * c.guest_access_ns);
    // The same counters (the modeled clock differs by the guest time and the waits).
    let counters = |v: &Vm| {
        let mut s = v.stats();
        s.retain(|(n, _)| *n != "modeled_ns");
        s
    };
    assert_eq!(counters(&v), counters(&h));
}

#[test]
fn writes_to_mprotected_memory_are_memory_fault_exits_in_virtual_time() {
    let v = vm("default", 4, 1 << 30);
    let lists: Vec<AccessList> = (0..4u64)
        .map(|i| list(i * 64..(i + 1) * 64, true))
        .collect();
    run_lists(&v, &lists, &VtArgs::default());
    assert_eq!(v.mprotect(0, 256, false).unwrap(), 256);
    let before = v.counter(tdpmmu_core::stats::C::pf_memory_fault);
    let r = run_lists(&v, &lists, &VtArgs::default());
    for x in &r.vcpus {
        assert_eq!(x.accesses, 64);
        assert_eq!(x.memory_fault, 64, "{x:?}");
        assert_eq!(x.faults, 64);
        assert_eq!(x.accesses, x.hits + x.fixed + x.spurious + x.memory_fault);
    }
    assert_eq!(
        v.counter(tdpmmu_core::stats::C::pf_memory_fault) - before,
        256
    );
    // Each -EFAULT is a return to userspace, charged once.
    assert_eq!(unit(&r, "userspace_exit_ns"), 256);
    for g in 0..256 {
        assert!(!spte::is_shadow_present(v.spte(g, false).unwrap()));
    }
    // Reads map read-only; a write after them faults and fails again.
    let reads: Vec<AccessList> = (0..4u64)
        .map(|i| list(i * 64..(i + 1) * 64, false))
        .collect();
    let r = run_lists(&v, &reads, &VtArgs::default());
    assert_eq!(r.vcpus.iter().map(|x| x.fixed).sum::<u64>(), 256);
    assert_eq!(unit(&r, "userspace_exit_ns"), 0);
    let r = run_lists(&v, &lists, &VtArgs::default());
    assert_eq!(r.vcpus.iter().map(|x| x.memory_fault).sum::<u64>(), 256);
    // Memstress-shaped runs take the same path.
    let mut a = args(4, 64);
    a.ms.write_percent = 100;
    let r = v.run_virtual(&a).unwrap();
    assert_eq!(r.vcpus.iter().map(|x| x.memory_fault).sum::<u64>(), 256);
    // Writable again: the writes map.
    v.mprotect(0, 256, true).unwrap();
    let r = run_lists(&v, &lists, &VtArgs::default());
    assert_eq!(r.vcpus.iter().map(|x| x.memory_fault).sum::<u64>(), 0);
    assert_eq!(r.vcpus.iter().map(|x| x.fixed).sum::<u64>(), 256);
    v.check().unwrap();
}

#[test]
fn an_attribute_mismatch_is_still_an_error() {
    let v = Vm::new(VmConfig {
        vcpus: 2,
        ..config("sw_protected", "", &[]).unwrap()
    })
    .unwrap();
    v.set_memory_attributes(0, 64, true).unwrap();
    // Shared accesses to private pages: KVM_EXIT_MEMORY_FAULT that no handler converts.
    let lists = vec![list(0..64, true), list(0..64, false)];
    let e = v
        .run_virtual_accesses(&lists, Some(false), &VtArgs::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("KVM_EXIT_MEMORY_FAULT") && e.contains("private"),
        "{e}"
    );
    let mut a = args(2, 32);
    a.ms.private = Some(false);
    let e = v.run_virtual(&a).unwrap_err().to_string();
    assert!(e.contains("KVM_EXIT_MEMORY_FAULT"), "{e}");
}

#[test]
fn bad_access_lists_are_refused_and_leave_the_vm_unchanged() {
    let v = Vm::new(VmConfig {
        vcpus: 2,
        memory: 16 << 20,
        ..VmConfig::default()
    })
    .unwrap();
    let before = v.stats();
    let d = VtArgs::default();
    let err = |lists: &[AccessList], a: &VtArgs| {
        v.run_virtual_accesses(lists, None, a)
            .unwrap_err()
            .to_string()
    };
    assert!(err(&[], &d).contains("gfns_per_vcpu"));
    let three: Vec<AccessList> = (0..3).map(|_| list(0..4, true)).collect();
    assert!(err(&three, &d).contains("gfns_per_vcpu"));
    let bad_writes = AccessList {
        gfns: vec![0, 1, 2],
        writes: vec![true, false],
    };
    assert!(err(&[bad_writes], &d).contains("writes_per_vcpu"));
    // Past the end of the memory (no memslot there) and past the guest-physical limit.
    let e = err(&[list(0..4, true), list([1, 4096 + 7], true)], &d);
    assert!(
        e.contains("gfns_per_vcpu[1][1]") && e.contains("memslot"),
        "{e}"
    );
    assert!(err(&[list([u64::MAX], true)], &d).contains("gfns_per_vcpu[0][0]"));
    let pinned = VtArgs {
        cpus: vec![0],
        ..VtArgs::default()
    };
    assert!(err(&[list(0..4, true), list(0..4, true)], &pinned).contains("cpus"));
    assert!(
        err(
            &[list(0..4, true)],
            &VtArgs {
                remove: Some((0, 1)),
                ..VtArgs::default()
            }
        )
        .contains("remove")
    );
    assert_eq!(v.stats(), before);
}

/// The pages each vCPU writes in each of `passes` passes of a memstress run, replaying one
/// generator per vCPU that runs on across the passes (a page draw with random access, then a
/// write draw unless every access writes), and the draws each vCPU made per pass.
fn replay_writes(a: &MemstressArgs, passes: u32) -> (Vec<Vec<bool>>, u64) {
    use tdpmmu_core::memstress::Lcg;
    let pages = a.pages_per_vcpu;
    let mut out = Vec::new();
    let mut draws_per_pass = 0;
    let mut rngs: Vec<Lcg> = (0..a.vcpus).map(|v| Lcg::for_vcpu(a, v)).collect();
    for _ in 0..passes {
        let mut written = vec![false; (pages * a.vcpus as u64) as usize];
        let mut draws = 0;
        for (v, rng) in rngs.iter_mut().enumerate() {
            draws = 0;
            for i in 0..pages {
                let off = if a.random_access {
                    draws += 1;
                    rng.next_u32() as u64 % pages
                } else {
                    i
                };
                let write = a.write_percent == 100 || {
                    draws += 1;
                    rng.next_u32() % 100 < a.write_percent
                };
                if write {
                    written[(v as u64 * pages + off) as usize] = true;
                }
            }
        }
        draws_per_pass = draws;
        out.push(written);
    }
    (out, draws_per_pass)
}

/// Slot 0's dirty bitmap as one bool per page (`pages` of them).
fn dirty_pages(v: &Vm, pages: u64) -> Vec<bool> {
    let words = v.get_dirty_log(0).unwrap();
    (0..pages)
        .map(|g| words[(g / 64) as usize] >> (g % 64) & 1 == 1)
        .collect()
}

/// The guest's generator runs on across passes (memstress seeds it once): the two passes of
/// one call write what two calls write when the second starts `rng_skip` draws on (2 per
/// page with random access and some reads), and pass 2 does not repeat pass 1. Checked on the
/// dirty bitmaps of populated VMs (logging on, GET re-protects between the two calls), in
/// virtual time and on host threads.
#[test]
fn rng_skip_continues_the_stream_across_calls() {
    let mut a = args(2, 256);
    a.ms.random_access = true;
    a.ms.write_percent = 50;
    a.ms.seed = 7;
    let total = 512;
    let (want, draws) = replay_writes(&a.ms, 2);
    assert_eq!(draws, 2 * 256, "a page draw and a write draw per access");
    assert_ne!(
        want[0], want[1],
        "pass 2 continues the stream, it does not repeat pass 1"
    );
    let union: Vec<bool> = want[0]
        .iter()
        .zip(&want[1])
        .map(|(x, y)| *x || *y)
        .collect();
    // A populated VM (a read fault maps writable and logs the page, as KVM's does), then
    // logging on: every page write-protected, so exactly the pages written get logged.
    let fresh = || {
        let v = vm("default", 2, 2 << 20);
        v.run_virtual(&args(2, 256)).unwrap();
        v.set_dirty_logging(0, true, false, false, true, false)
            .unwrap();
        v
    };
    // One call, two passes.
    let one = fresh();
    one.run_virtual(&VtArgs {
        passes: 2,
        ..a.clone()
    })
    .unwrap();
    assert_eq!(dirty_pages(&one, total), union);
    // Two calls, the second skipping the first's draws.
    for host in [false, true] {
        let two = fresh();
        for (k, skip) in [0, draws].into_iter().enumerate() {
            let mut b = a.clone();
            b.ms.rng_skip = skip;
            if host {
                two.run_memstress(&b.ms).unwrap();
            } else {
                two.run_virtual(&b).unwrap();
            }
            assert_eq!(
                dirty_pages(&two, total),
                want[k],
                "host {host}, call {}",
                k + 1
            );
        }
    }
    // A skip off by one draw is another stream.
    let off = fresh();
    let mut b = a.clone();
    b.ms.rng_skip = draws + 1;
    off.run_virtual(&b).unwrap();
    assert_ne!(dirty_pages(&off, total), want[1]);
    // Sequential 100 % writes draw nothing: any skip writes every page.
    let mut s = args(2, 256);
    s.ms.rng_skip = 12345;
    let v = fresh();
    v.run_virtual(&s).unwrap();
    assert!(dirty_pages(&v, total).iter().all(|d| *d));
    assert_eq!(replay_writes(&s.ms, 1).1, 0);
}
