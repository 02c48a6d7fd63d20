//! Engine vs native floor on first-touch 4K faults (used for profiling; the real benches are
//! in benches/). Usage: fault_bench [seq|rand] [pages]
use std::time::Instant;

use tdpmmu_core::{Vm, VmConfig};

fn main() {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_else(|| "rand".into());
    let n: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(1 << 20);
    let mut gfns: Vec<u64> = (0..n).collect();
    if mode == "rand" {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for i in (1..gfns.len()).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            gfns.swap(i, (x % (i as u64 + 1)) as usize);
        }
    }
    for _ in 0..3 {
        let vm = Vm::new(VmConfig {
            memory: n * 4096,
            ..VmConfig::default()
        })
        .unwrap();
        let mut out = vec![0u8; gfns.len()];
        let t = Instant::now();
        vm.fault_batch(&gfns, None, true, false, 0, &mut out)
            .unwrap();
        let e = t.elapsed().as_secs_f64();
        let (f, _) = tdpmmu_native_floor::native_floor(&gfns, 4).unwrap();
        println!(
            "{mode}: engine {:.1} ns/fault, floor {:.1} ns/fault, ratio {:.2}",
            e / n as f64 * 1e9,
            f / n as f64 * 1e9,
            e / f
        );
    }
}
