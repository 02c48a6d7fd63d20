//! A memstress-shaped guest workload (KVM selftests' `memstress.c`): each vCPU is a real
//! thread that touches every page of its slice once; an access whose mapping does not allow it
//! takes the fault path (an EPT violation), others are served by the "hardware" walk.

use std::sync::Barrier;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use crate::error::{Error, Result, bad_arg};
use crate::mmu::Mmu;
use crate::op::Ops;
use crate::page_fault::Ret;

#[derive(Debug, Clone, Copy, Default)]
pub struct VcpuResult {
    pub wall_s: f64,
    pub modeled_ns: f64,
    pub faults: u64,
    pub pages: u64,
}

#[derive(Debug, Clone, Copy)]
pub struct MemstressArgs {
    pub vcpus: u32,
    pub pages_per_vcpu: u64,
    pub base_gfn: u64,
    pub overlap: bool,
    pub random_access: bool,
    pub write_percent: u32,
    pub seed: u64,
    /// Draws each vCPU's generator has already made before this run (the guest's generator
    /// runs on across passes, as memstress's does: it is seeded once, before its endless
    /// loop); 0 starts from the seed. The generator starts advanced by this many draws.
    pub rng_skip: u64,
    pub private: Option<bool>,
}

/// A vCPU's PML buffer: the CPU logs the first write to each armed 4K page; when 512
/// entries filled it, the vCPU exits and KVM moves them to the dirty bitmap (modeled as
/// marked at once, with one exit per 512).
#[derive(Debug, Default)]
pub struct Pml(u32);

impl Pml {
    pub fn log(
        &mut self,
        mmu: &Mmu,
        st: &crate::op::MmuState,
        ctx: &mut crate::stats::Ctx,
        gfn: u64,
    ) {
        if !st.memslots.find(gfn).is_some_and(|s| s.pml_log(gfn)) {
            return;
        }
        ctx.inc(crate::stats::C::pml_logged);
        self.0 += 1;
        if self.0 == 512 {
            self.0 = 0;
            ctx.inc(crate::stats::C::pml_full_exits);
            ctx.charge(mmu.exit_cost(), 1);
        }
    }
}

/// Park–Miller "minimal standard" generator, as the selftests' `guest_random_u32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lcg(u32);

/// The generator's modulus, 2^31 − 1 (prime).
const LCG_M: u64 = 0x7fff_ffff;
/// Its multiplier.
const LCG_A: u64 = 48271;

impl Lcg {
    pub fn new(seed: u64) -> Self {
        Self(((seed % 0x7fff_fffe) + 1) as u32)
    }

    /// The generator of vCPU `v` of a memstress run: seeded with `seed + v`, then advanced
    /// past the `rng_skip` draws it made before the run.
    pub fn for_vcpu(a: &MemstressArgs, v: u32) -> Self {
        let mut r = Self::new(a.seed.wrapping_add(v as u64));
        r.skip(a.rng_skip);
        r
    }

    /// Advance the generator by `n` draws at once: each draw multiplies the state by 48271
    /// modulo 2^31 − 1, so `n` of them multiply it by 48271^n (mod 2^31 − 1), computed by
    /// square-and-multiply in O(log n).
    pub fn skip(&mut self, mut n: u64) {
        let mut base = LCG_A;
        let mut mult = 1u64;
        while n > 0 {
            if n & 1 == 1 {
                mult = mult * base % LCG_M;
            }
            base = base * base % LCG_M;
            n >>= 1;
        }
        self.0 = (self.0 as u64 * mult % LCG_M) as u32;
    }

    #[inline(always)]
    pub fn next_u32(&mut self) -> u32 {
        self.0 = ((self.0 as u64 * LCG_A) % LCG_M) as u32;
        self.0
    }
}

/// Accesses between two acquisitions of `mmu_lock` (KVM takes it per fault; batching changes
/// no outcome because every fault re-validates its walk).
const LOCK_BATCH: usize = 64;

/// Fault attempts (KVM's local retries included) of one access after which it is declared a
/// livelock: KVM's vCPU would re-enter the guest forever (a user's hook that always answers
/// -EBUSY does that); the model stops with an error instead.
pub const MAX_ATTEMPTS_PER_ACCESS: u64 = 1 << 20;

/// Run the workload on `a.vcpus` real threads. Each thread holds its vCPU, takes `mmu_lock`
/// for read per batch of accesses and merges its counters into the VM's at the end of every
/// batch (so `check()` from another thread sees consistent totals). Every thread stops as soon
/// as one of them hits a KVM_BUG_ON, an error, a livelock, the VM's destruction, or the
/// caller's interrupt (polled here on the calling thread).
pub fn run(
    mmu: &Mmu,
    ops: &Ops,
    a: &MemstressArgs,
    max_vcpus: u32,
    check_range: impl Fn(u64, u64) -> Result<()>,
) -> Result<Vec<VcpuResult>> {
    ops.ensure_alive()?;
    if a.vcpus == 0 || a.vcpus > max_vcpus {
        return Err(bad_arg(
            "vcpus",
            format!("must be in 1..={max_vcpus}, got {}", a.vcpus),
        ));
    }
    if a.pages_per_vcpu == 0 {
        return Err(bad_arg("pages_per_vcpu", "must be > 0"));
    }
    if a.write_percent > 100 {
        return Err(bad_arg(
            "write_percent",
            format!("must be in 0..=100, got {}", a.write_percent),
        ));
    }
    let span = if a.overlap {
        a.pages_per_vcpu
    } else {
        a.pages_per_vcpu * a.vcpus as u64
    };
    check_range(a.base_gfn, span)?;
    {
        let st = ops.mmu_lock.read();
        let mut g = a.base_gfn;
        while g < a.base_gfn + span {
            let Some(s) = st.memslots.find(g) else {
                return Err(bad_arg(
                    "base_gfn",
                    format!("gfn {g:#x} of the workload is not in any memslot"),
                ));
            };
            g = s.end();
        }
    }
    let barrier = Barrier::new(a.vcpus as usize);
    let stop = AtomicBool::new(false);
    let running = AtomicUsize::new(a.vcpus as usize);
    let mut interrupted = false;
    let caller = std::thread::current();
    let results: Vec<(VcpuResult, Option<Error>)> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..a.vcpus)
            .map(|v| {
                let (barrier, stop, running, caller) = (&barrier, &stop, &running, &caller);
                sc.spawn(move || {
                    barrier.wait();
                    let r = vcpu_thread(mmu, ops, a, v, stop);
                    if r.1.is_some() {
                        stop.store(true, Ordering::Release);
                    }
                    // The last vCPU out wakes the caller at once (a short run must not wait
                    // out the caller's interrupt-polling period).
                    if running.fetch_sub(1, Ordering::AcqRel) == 1 {
                        caller.unpark();
                    }
                    r
                })
            })
            .collect();
        // The calling thread watches for its caller's interrupt while the vCPUs run.
        while running.load(Ordering::Acquire) > 0 {
            std::thread::park_timeout(std::time::Duration::from_millis(10));
            if !interrupted && crate::op::interrupted() {
                interrupted = true;
                stop.store(true, Ordering::Release);
            }
        }
        handles
            .into_iter()
            .map(|h| h.join().expect("vCPU thread panicked"))
            .collect()
    });
    ops.grace_period(&mmu.tdp.arena);
    let mut out = Vec::with_capacity(results.len());
    let mut first_err = None;
    for (r, e) in results {
        // A bug recorded by any thread surfaces as VmBugged before other errors.
        if let Some(Error::Bugged(_)) = &e {
            first_err = e.or(first_err);
        } else {
            first_err = first_err.or(e);
        }
        out.push(r);
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    if interrupted {
        return Err(Error::Interrupted);
    }
    Ok(out)
}

fn vcpu_thread(
    mmu: &Mmu,
    ops: &Ops,
    a: &MemstressArgs,
    v: u32,
    stop: &AtomicBool,
) -> (VcpuResult, Option<Error>) {
    let _vcpu = ops.vcpu(v as usize);
    let mut ctx = ops.ctx();
    let mut rng = Lcg::for_vcpu(a, v);
    let base = if a.overlap {
        a.base_gfn
    } else {
        a.base_gfn + v as u64 * a.pages_per_vcpu
    };
    let tdp = &mmu.tdp;
    let mut res = VcpuResult::default();
    let mut pml = Pml::default();
    let start = Instant::now();
    let mut i = 0u64;
    let mut err = None;
    // Every way out of a batch goes through the merge below, under the batch's lock.
    let mut done = false;
    while !done && i < a.pages_per_vcpu {
        if stop.load(Ordering::Acquire) {
            break;
        }
        let st = ops.mmu_lock.read();
        // The VM may have been destroyed or bugged while this vCPU was between batches.
        if let Err(e) = ops.ensure_alive() {
            err = Some(e);
            break;
        }
        'batch: for _ in 0..LOCK_BATCH {
            if i >= a.pages_per_vcpu {
                break;
            }
            let off = if a.random_access {
                rng.next_u32() as u64 % a.pages_per_vcpu
            } else {
                i
            };
            let write = a.write_percent == 100 || (rng.next_u32() % 100) < a.write_percent;
            let gfn = base + off;
            let acc = mmu.guest_access(&st, gfn, a.private);
            let mut retries = 0u64;
            loop {
                // The "hardware" walk: no exit if the current mapping allows the access.
                let root = tdp.vcpu_root(v as usize, acc.mirror);
                if acc.may_hit
                    && root != crate::arena::NO_TABLE
                    && let Some(logged) = tdp.hw_access(root, gfn, acc.gfn_bits, write)
                {
                    if logged {
                        pml.log(mmu, &st, &mut ctx, gfn);
                    }
                    break;
                }
                res.faults += 1;
                match mmu.page_fault(
                    &st, &mut ctx, gfn, a.private, write, false, v as usize, false,
                ) {
                    Ok(r) if r.ret == Ret::Retry => {
                        // A KVM_BUG_ON ends the vCPU (KVM kills the VM); RETRY otherwise
                        // re-enters the guest, which faults again.
                        if ctx.bug.is_some() || stop.load(Ordering::Acquire) {
                            {
                                done = true;
                                break 'batch;
                            }
                        }
                        retries += 1 + r.retries as u64;
                        if retries >= MAX_ATTEMPTS_PER_ACCESS {
                            err = Some(Error::Livelock(format!(
                                "vCPU {v}: the fault at gfn {gfn:#x} was retried {retries} times without progress"
                            )));
                            {
                                done = true;
                                break 'batch;
                            }
                        }
                    }
                    Ok(_) => break,
                    Err(e) => {
                        err = Some(e);
                        {
                            done = true;
                            break 'batch;
                        }
                    }
                }
            }
            if ctx.bug.is_some() {
                {
                    done = true;
                    break 'batch;
                }
            }
            i += 1;
            res.pages += 1;
        }
        // Merge per batch, before the lock is released: the totals are whole whenever no
        // batch holds the lock (check() takes it for write).
        res.modeled_ns = ctx.modeled_ns;
        let fin = ops.finish(&ctx);
        ctx.clear_counts();
        drop(st);
        if let Err(e) = fin {
            err = err.or(Some(e));
            break;
        }
    }
    res.wall_s = start.elapsed().as_secs_f64();
    res.modeled_ns = ctx.modeled_ns;
    (res, err)
}

#[cfg(test)]
mod tests {
    use super::Lcg;

    /// `skip(n)` lands where `n` single draws do, for small, odd, power-of-two and large
    /// `n`, from several states (including the largest one, 2^31 − 2).
    #[test]
    fn skip_matches_single_steps() {
        for seed in [0u64, 1, 6, 0x6b8b_4567, 0x7fff_fffd, u64::MAX] {
            let mut step = Lcg::new(seed);
            let mut done = 0u64;
            for n in [0u64, 1, 2, 3, 7, 64, 100, 1000, 4097, 100_003] {
                while done < n {
                    step.next_u32();
                    done += 1;
                }
                let mut jump = Lcg::new(seed);
                jump.skip(n);
                assert_eq!(jump, step, "seed {seed:#x}, n {n}");
                // And both continue the same way.
                let (mut a, mut b) = (jump, step);
                assert_eq!(a.next_u32(), b.next_u32());
            }
        }
    }

    /// The generator's period is 2^31 − 2: skipping it is the identity, and skips compose.
    #[test]
    fn skip_period_and_composition() {
        let mut r = Lcg::new(12345);
        let start = r;
        r.skip(0x7fff_fffe);
        assert_eq!(r, start);
        let (mut a, mut b) = (Lcg::new(99), Lcg::new(99));
        a.skip(1 << 40);
        a.skip(12_345_678_901);
        b.skip((1 << 40) + 12_345_678_901);
        assert_eq!(a, b);
        // A skip that is not a multiple of the period moves the state.
        let mut c = Lcg::new(99);
        c.skip(5);
        assert_ne!(c, Lcg::new(99));
    }
}
