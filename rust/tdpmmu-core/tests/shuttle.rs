//! Model checking of the real MMU code with shuttle (`cargo test --features shuttle --test
//! shuttle`): the core's locks are shuttle's and every shared-SPTE access is a scheduling
//! point, so each scenario runs under many thread interleavings (random and PCT schedulers)
//! and must end with `check()` passing.
#![cfg(feature = "shuttle")]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::{c, config};
use shuttle::thread;
use tdpmmu_core::hooks::{ExternalOps, HookRet};
use tdpmmu_core::stats::{C, Ctx};
use tdpmmu_core::{Error, Ret, Vm, VmConfig};

const ITERATIONS: usize = 300;

fn explore(f: impl Fn() + Send + Sync + 'static) {
    let f = Arc::new(f);
    let g = f.clone();
    shuttle::check_random(move || f(), ITERATIONS);
    shuttle::check_pct(move || g(), ITERATIONS, 3);
}

fn vm(vm_type: &str, hooks: &str, vcpus: u32, opts: &[(&str, &str)]) -> Arc<Vm> {
    let vm = Vm::new(VmConfig {
        vcpus,
        memory: 16 << 20,
        ..config(vm_type, hooks, opts).unwrap()
    })
    .unwrap();
    if vm_type == "tdx" {
        vm.finalize().unwrap();
    }
    Arc::new(vm)
}

/// Fault until the access is mapped (a lost race returns RETRY and the guest faults again).
fn fault_until_done(vm: &Vm, gfn: u64, private: Option<bool>, exec: bool, vcpu: u32) -> Ret {
    for _ in 0..100 {
        match vm.fault(gfn, private, true, exec, vcpu) {
            Ok(r) if r.ret == Ret::Retry => continue,
            Ok(r) => return r.ret,
            Err(e) => panic!("fault failed: {e}"),
        }
    }
    panic!("gfn {gfn:#x} still RETRY after 100 faults");
}

/// Two vCPUs install the same leaf (and the same three tables) on an empty tree.
#[test]
fn two_vcpus_install_the_same_leaf() {
    explore(|| {
        let vm = vm("default", "", 2, &[]);
        let hs: Vec<_> = (0..2)
            .map(|v| {
                let vm = vm.clone();
                thread::spawn(move || fault_until_done(&vm, 5, None, false, v))
            })
            .collect();
        let rets: Vec<Ret> = hs.into_iter().map(|h| h.join().unwrap()).collect();
        assert!(rets.contains(&Ret::Fixed), "{rets:?}");
        assert!(rets.iter().all(|r| matches!(r, Ret::Fixed | Ret::Spurious)));
        assert_eq!(c(&vm, C::pages_4k), 1);
        assert_eq!(c(&vm, C::tdp_mmu_pages), 3);
        vm.check().unwrap();
    });
}

/// The FROZEN protocol on a TD: two vCPUs fault private gfns under the same tables; each
/// mirror entry is frozen while its hook runs, the other vCPU sees FROZEN and retries; the
/// S-EPT ends up agreeing with the mirror tree.
#[test]
fn tdx_two_vcpus_link_and_set_through_frozen_entries() {
    explore(|| {
        let vm = vm("tdx", "mirror", 2, &[]);
        let hs: Vec<_> = [(7u64, 0u32), (9, 1)]
            .into_iter()
            .map(|(g, v)| {
                let vm = vm.clone();
                thread::spawn(move || fault_until_done(&vm, g, Some(true), false, v))
            })
            .collect();
        for h in hs {
            assert_eq!(h.join().unwrap(), Ret::Fixed);
        }
        assert_eq!(c(&vm, C::sept_add), 3, "each table linked once");
        assert_eq!(c(&vm, C::page_aug), 2);
        assert_eq!(c(&vm, C::page_accept), 2);
        vm.check().unwrap();
    });
}

/// A hook that answers -EBUSY once: the frozen entry goes back to its old value while the
/// other vCPU may be looking at it.
struct BusyOnce {
    busy: AtomicBool,
}

impl ExternalOps for BusyOnce {
    fn link_external_spt(&self, _: &mut Ctx, _: u64, _: u8, _: u32) -> HookRet {
        HookRet::Ok
    }
    fn set_external_spte(&self, _: &mut Ctx, _: u64, _: u8, _: u64) -> HookRet {
        if self.busy.swap(false, Ordering::AcqRel) {
            HookRet::Busy
        } else {
            HookRet::Ok
        }
    }
    fn remove_external_spte(&self, _: &mut Ctx, _: u64, _: u8, _: u64) {}
    fn free_external_spt(&self, _: &mut Ctx, _: u64, _: u8, _: u32) -> HookRet {
        HookRet::Ok
    }
}

#[test]
fn busy_hook_restores_the_old_value_under_contention() {
    explore(|| {
        let cfg = VmConfig {
            vcpus: 2,
            memory: 16 << 20,
            ..config("sw_protected", "mirror", &[("mirror", "true")]).unwrap()
        };
        let hooks = Arc::new(BusyOnce {
            busy: AtomicBool::new(true),
        });
        let vm = Arc::new(Vm::with_hooks(cfg, hooks).unwrap());
        let hs: Vec<_> = (0..2)
            .map(|v| {
                let vm = vm.clone();
                thread::spawn(move || fault_until_done(&vm, 3, Some(true), false, v))
            })
            .collect();
        let rets: Vec<Ret> = hs.into_iter().map(|h| h.join().unwrap()).collect();
        assert!(rets.contains(&Ret::Fixed));
        assert_eq!(c(&vm, C::pages_4k), 1);
        assert!(
            c(&vm, C::pf_retry) >= 1,
            "the busy answer made a fault retry"
        );
        vm.check().unwrap();
    });
}

/// A huge leaf replaces a table (shared teardown: every entry frozen and accounted) while
/// another vCPU installs a 4K leaf into that dying table.
#[test]
fn huge_install_tears_down_a_table_another_vcpu_installs_into() {
    explore(|| {
        let vm = Arc::new(
            Vm::new(VmConfig {
                vcpus: 2,
                memory: 16 << 20,
                nx_huge_pages: true,
                slot_zap_all: false,
                ..config("default", "", &[]).unwrap()
            })
            .unwrap(),
        );
        // A 4K table under gfn 0, then the slot comes back with 2M backing (the table stays).
        vm.fault(0, None, true, false, 0).unwrap();
        vm.delete_memslot(0).unwrap();
        vm.add_memslot(0, 4096, 2 << 20, false).unwrap();
        let a = {
            let vm = vm.clone();
            // A data fault: a 2M leaf over the old table.
            thread::spawn(move || fault_until_done(&vm, 0, None, false, 0))
        };
        let b = {
            let vm = vm.clone();
            // An exec fault with NX huge pages: 4K, inside the same 2M range.
            thread::spawn(move || fault_until_done(&vm, 1, None, true, 1))
        };
        a.join().unwrap();
        b.join().unwrap();
        vm.check().unwrap();
    });
}

/// A fast zap (roots invalidated, vCPUs moved off them) while two vCPUs fault.
#[test]
fn fast_zap_racing_faults_keeps_root_refcounts() {
    explore(|| {
        let vm = vm("default", "", 2, &[]);
        let hs: Vec<_> = (0..2)
            .map(|v| {
                let vm = vm.clone();
                thread::spawn(move || {
                    fault_until_done(&vm, 5 + v as u64, None, false, v);
                })
            })
            .collect();
        vm.zap_all_fast().unwrap();
        for h in hs {
            h.join().unwrap();
        }
        vm.check().unwrap();
    });
}

/// destroy() racing a private fault on a TD: the fault either completes before the teardown
/// or is refused after it; never a SEAMCALL on a torn-down TD, and the audit is clean.
#[test]
fn destroy_racing_a_fault() {
    explore(|| {
        let vm = vm("tdx", "mirror", 1, &[]);
        let f = {
            let vm = vm.clone();
            thread::spawn(move || vm.fault(5, Some(true), true, false, 0))
        };
        vm.destroy().unwrap();
        match f.join().unwrap() {
            Ok(r) => assert_eq!(r.ret, Ret::Fixed),
            Err(Error::Config(m)) => assert!(m.contains("destroyed"), "{m}"),
            Err(e) => panic!("unexpected: {e}"),
        }
        assert!(!vm.bugged());
        vm.check().unwrap();
    });
}
