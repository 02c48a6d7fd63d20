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

#[test]
#[ignore]
fn explore() {
    for mode in [false, true] {
        for n in [1u32, 8, 64, 128, 256] {
            let mut a = args(n, 2048);
            a.exclusive = mode;
            let (_v, r) = run("default", &a);
            println!(
                "excl={mode} n={n} rate={:.3}M/s per-vcpu-us={:.2} wall={:.3}s steps={} sw={} waits={:?}",
                rate(&r) / 1e6,
                r.elapsed_ns / 2048.0 / 1e3,
                r.wall_s,
                r.steps,
                r.switches,
                r.waits
            );
        }
    }
}

#[test]
#[ignore]
fn speed() {
    let n: u32 = std::env::var("N")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(256);
    let pages: u64 = std::env::var("P")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8192);
    let a = args(n, pages);
    let (_v, r) = run("default", &a);
    let faults: u64 = r.vcpus.iter().map(|v| v.faults).sum();
    println!(
        "n={n} faults={faults} wall={:.3}s sim={:.2}M faults/s steps/fault={:.1} switches/fault={:.2}",
        r.wall_s,
        faults as f64 / r.wall_s / 1e6,
        r.steps as f64 / faults as f64,
        r.switches as f64 / faults as f64
    );
}

#[test]
#[ignore]
fn host_speed() {
    let pages: u64 = std::env::var("P")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(500000);
    let a = args(1, pages);
    let v = vm("default", 1, pages * 4096);
    let t = std::time::Instant::now();
    let r = v.run_memstress(&a.ms).unwrap();
    let w = t.elapsed().as_secs_f64();
    println!(
        "host n=1 faults={} wall={w:.3}s {:.2}M faults/s",
        r[0].faults,
        r[0].faults as f64 / w / 1e6
    );
}

#[test]
#[ignore]
fn explore_uffd_tdx() {
    for uf in [
        Userfault::None,
        Userfault::Missing,
        Userfault::Minor,
        Userfault::MemoryFault,
    ] {
        for all in [false, true] {
            for n in [1u32, 8, 64, 256] {
                let mut a = args(n, 512);
                a.userfault = uf;
                a.uffd_all = all;
                let (_v, r) = run("default", &a);
                println!(
                    "uf={uf:?} all={all} n={n} rate={:.3}M/s per-vcpu-us={:.2} wall={:.3}s",
                    rate(&r) / 1e6,
                    r.elapsed_ns / 512.0 / 1e3,
                    r.wall_s
                );
            }
        }
    }
    for n in [4u32, 32, 64] {
        let pages = 256u64;
        let v = Vm::new(VmConfig {
            vcpus: n,
            memory: 1 << 30,
            ..config("tdx", "", &[]).unwrap()
        })
        .unwrap();
        v.finalize().unwrap();
        let mut a = args(n, pages);
        a.ms.private = Some(true);
        let r = v.run_virtual(&a).unwrap();
        println!(
            "tdx populate n={n} rate={:.3}M/s per-fault-us={:.2}",
            rate(&r) / 1e6,
            r.elapsed_ns / pages as f64 / 1e3
        );
        a.passes = 0;
        a.remove = Some((0, 512));
        let r = v.run_virtual(&a).unwrap();
        println!(
            "tdx remove n={n} removed={} per-page-us={:.2} faults={}",
            r.removed,
            r.remove_ns / r.removed as f64 / 1e3,
            r.vcpus.iter().map(|v| v.faults).sum::<u64>()
        );
    }
}
