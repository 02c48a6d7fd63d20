//! The `ops` fuzz target's decoder and driver, shared by the fuzz target
//! (`fuzz/fuzz_targets/ops.rs`) and the replay test
//! (`rust/tdpmmu-core/tests/fuzz_corpus.rs`), each of which includes this file with
//! `#[path = ...] mod driver;`. It uses only the engine's public API and std (no `arbitrary`),
//! so the replay test builds on stable with no extra dependency.
//!
//! An input is decoded by hand: the first bytes pick a VM configuration (a row of
//! `config::MATRIX`, a design that row allows, TDX options with small busy probabilities,
//! levels, backing, folio, vCPUs, memory), the rest a sequence of operations with bounded
//! arguments. Missing bytes read as 0, so every input decodes.
//!
//! The rules (`run`): no panic, no hang (the caller's timeout), no `Error::Invariant`,
//! `OutOfMemory`, `Interrupted` or `Livelock` from any operation, `check()` holds after every
//! operation on a VM that is neither bugged nor destroyed, every operation is refused once the
//! VM is bugged or destroyed, and after `destroy()` (in the sequence, or at the end for a VM
//! still alive) `check()`'s teardown audit holds. Config errors are fine outcomes, and so is
//! VmBugged when the configuration explains the KVM_BUG_ON (`expected_bug`: SEAMCALL busy
//! injection, the "private" design's documented flaw after an unflagged zap); any other
//! KVM_BUG_ON is a finding. Besides, on the "private" design the documented flaws (a stale
//! external leaf after an unflagged zap, unreclaimed external tables or RMP entries at
//! teardown) are not findings, and a KVM_BUG_ON during `destroy()` excuses what the vendor
//! leaked (not KVM's own tables). `KNOWN_BUGS` are engine bugs reported and not fixed yet: the
//! fuzzer passes over them unless `strict`.

#![allow(dead_code)]

use std::fmt;
use std::time::{Duration, Instant};

use tdpmmu_core::config::{MATRIX, OptionValue};
use tdpmmu_core::{Design, Error, MemstressArgs, Vm, VmConfig};

/// Operations decoded from one input at most.
pub const MAX_OPS: usize = 48;
/// Main-thread operations run beside a memstress in one `Concurrent` step at most.
pub const MAX_CONCURRENT_OPS: usize = 4;
/// Memstress and concurrent steps in one input at most (later ones are skipped).
pub const MAX_STRESS: usize = 3;
/// check() calls at most by the checker thread of one concurrent step.
pub const CONCURRENT_CHECKS: usize = 100;

const KB4: u64 = 4096;
const MB2: u64 = 2 << 20;
const GB1: u64 = 1 << 30;

/// Reads bytes; past the end every read is 0.
struct Bytes<'a> {
    d: &'a [u8],
    i: usize,
}

impl Bytes<'_> {
    fn done(&self) -> bool {
        self.i >= self.d.len()
    }
    fn u8(&mut self) -> u8 {
        let b = self.d.get(self.i).copied().unwrap_or(0);
        self.i += 1;
        b
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    /// True for about 1 in `n` byte values.
    fn one_in(&mut self, n: u8) -> bool {
        self.u8().is_multiple_of(n)
    }
    fn bool(&mut self) -> bool {
        self.u8() & 1 == 1
    }
    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.u8() as usize % xs.len()]
    }
}

/// The configuration as decoded (what the report shows), and the engine's `VmConfig`.
#[derive(Clone)]
pub struct Config {
    pub cfg: VmConfig,
    /// What was set, as text, in order.
    pub desc: Vec<String>,
}

#[derive(Clone, Debug)]
pub enum Op {
    Fault {
        gfn: u64,
        private: Option<bool>,
        write: bool,
        exec: bool,
        vcpu: u32,
    },
    FaultBatch {
        gfns: Vec<u64>,
        private: Option<bool>,
        write: bool,
        exec: bool,
        vcpu: u32,
    },
    Populate {
        gfn: u64,
        npages: u64,
        private: Option<bool>,
        vcpu: u32,
    },
    Zap {
        gfn: u64,
        npages: u64,
    },
    Notifier {
        gfn: u64,
        npages: u64,
    },
    ZapAllFast,
    AddMemslot {
        gfn: u64,
        npages: u64,
        backing: u64,
        gmem: bool,
    },
    /// Deletes the `index`-th slot of `vm.memslots()` (modulo their number), or slot id
    /// `index` itself when `raw`.
    DeleteMemslot {
        index: u32,
        raw: bool,
    },
    SetAttrs {
        gfn: u64,
        npages: u64,
        private: bool,
    },
    PunchHole {
        gfn: u64,
        npages: u64,
    },
    Finalize,
    Pvalidate {
        gfn: u64,
        npages: u64,
        size_2m: bool,
        validate: bool,
    },
    RmpFault {
        gfn: u64,
    },
    Memstress(MemstressArgs),
    /// A memstress on another thread while this thread runs `ops`.
    Concurrent {
        stress: MemstressArgs,
        ops: Vec<Op>,
    },
    Destroy,
}

fn opt(p: Option<bool>) -> String {
    match p {
        None => "None".into(),
        Some(b) => format!("Some({b})"),
    }
}

fn ms(a: &MemstressArgs) -> String {
    format!(
        "MemstressArgs {{ vcpus: {}, pages_per_vcpu: {}, base_gfn: {:#x}, overlap: {}, random_access: {}, write_percent: {}, seed: {}, rng_skip: {}, private: {} }}",
        a.vcpus,
        a.pages_per_vcpu,
        a.base_gfn,
        a.overlap,
        a.random_access,
        a.write_percent,
        a.seed,
        a.rng_skip,
        opt(a.private)
    )
}

/// Each operation as the Rust call that reproduces it.
impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Fault {
                gfn,
                private,
                write,
                exec,
                vcpu,
            } => write!(
                f,
                "vm.fault({gfn:#x}, {}, {write}, {exec}, {vcpu})",
                opt(*private)
            ),
            Op::FaultBatch {
                gfns,
                private,
                write,
                exec,
                vcpu,
            } => {
                let g: Vec<String> = gfns.iter().map(|g| format!("{g:#x}")).collect();
                write!(
                    f,
                    "vm.fault_batch(&[{}], {}, {write}, {exec}, {vcpu}, &mut [0; {}])",
                    g.join(", "),
                    opt(*private),
                    gfns.len()
                )
            }
            Op::Populate {
                gfn,
                npages,
                private,
                vcpu,
            } => write!(
                f,
                "vm.populate({gfn:#x}, {npages:#x}, {}, {vcpu})",
                opt(*private)
            ),
            Op::Zap { gfn, npages } => write!(f, "vm.zap_gfn_range({gfn:#x}, {npages:#x})"),
            Op::Notifier { gfn, npages } => {
                write!(f, "vm.mmu_notifier_invalidate({gfn:#x}, {npages:#x})")
            }
            Op::ZapAllFast => write!(f, "vm.zap_all_fast()"),
            Op::AddMemslot {
                gfn,
                npages,
                backing,
                gmem,
            } => write!(
                f,
                "vm.add_memslot({gfn:#x}, {npages:#x}, {backing:#x}, {gmem})"
            ),
            Op::DeleteMemslot { index, raw: true } => write!(f, "vm.delete_memslot({index})"),
            Op::DeleteMemslot { index, raw: false } => {
                write!(f, "vm.delete_memslot(<id of vm.memslots()[{index} % len]>)")
            }
            Op::SetAttrs {
                gfn,
                npages,
                private,
            } => write!(
                f,
                "vm.set_memory_attributes({gfn:#x}, {npages:#x}, {private})"
            ),
            Op::PunchHole { gfn, npages } => write!(f, "vm.punch_hole({gfn:#x}, {npages:#x})"),
            Op::Finalize => write!(f, "vm.finalize()"),
            Op::Pvalidate {
                gfn,
                npages,
                size_2m,
                validate,
            } => write!(
                f,
                "vm.pvalidate({gfn:#x}, {npages:#x}, {size_2m}, {validate})"
            ),
            Op::RmpFault { gfn } => write!(f, "vm.rmp_fault({gfn:#x})"),
            Op::Memstress(a) => write!(f, "vm.run_memstress(&{})", ms(a)),
            Op::Concurrent { stress, ops } => {
                writeln!(f, "concurrently {{")?;
                writeln!(f, "    thread A: vm.run_memstress(&{})", ms(stress))?;
                for o in ops {
                    writeln!(f, "    thread B: {o}")?;
                }
                write!(f, "}}")
            }
            Op::Destroy => write!(f, "vm.destroy()"),
        }
    }
}

pub struct Case {
    pub config: Config,
    pub ops: Vec<Op>,
}

impl fmt::Display for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "let vm = Vm::new(VmConfig {{ {}, ..VmConfig::default() }})?;",
            self.config.desc.join(", ")
        )?;
        for o in &self.ops {
            writeln!(f, "{o}")?;
        }
        Ok(())
    }
}

/// Guest-physical layout the decoder aims at: slot 0 is [0, mem_pages); extra slots go above
/// it, from `extra_base`.
#[derive(Clone)]
struct Layout {
    mem_pages: u64,
    extra_base: u64,
    max_gfn: u64,
    vcpus: u32,
    /// The last gfns decoded, so later operations can hit the same pages.
    recent: std::cell::RefCell<Vec<u64>>,
}

const RECENT: usize = 16;

impl Layout {
    fn gfn(&self, b: &mut Bytes) -> u64 {
        let sel = b.u8();
        if sel >= 252 {
            // Beyond the guest-physical limit: refused by the API.
            return self.max_gfn + u64::from(sel - 252);
        }
        let g = match sel % 12 {
            // Anywhere in slot 0.
            0..=3 => u64::from(b.u16()) % self.mem_pages,
            // Around a 2M boundary of slot 0 (or just past its end).
            4 | 5 => {
                let k = u64::from(b.u8()) % (self.mem_pages / 512 + 1);
                (k * 512 + u64::from(b.u8() % 5)).saturating_sub(2)
            }
            // In the area of the extra slots.
            6 | 7 => self.extra_base + u64::from(b.u16() % 4096),
            // At the top of the guest-physical space.
            8 => self.max_gfn - 1 - u64::from(b.u8() % 4),
            // Anything below 4G pages.
            9 => u64::from(b.u32()),
            // A gfn decoded before (or slot 0's first page).
            _ => {
                let r = self.recent.borrow();
                let i = b.u8() as usize;
                r.get(i % r.len().max(1)).copied().unwrap_or(0)
            }
        } % self.max_gfn;
        let mut r = self.recent.borrow_mut();
        if r.len() == RECENT {
            r.remove(0);
        }
        r.push(g);
        g
    }

    fn npages(&self, b: &mut Bytes) -> u64 {
        match b.u8() % 8 {
            0 => 1,
            1 => b.pick(&[2, 511, 512, 513, 1024]),
            2 => self.mem_pages,
            3 => 0, // refused
            _ => 1 + u64::from(b.u16() % 2048),
        }
    }

    fn private(&self, b: &mut Bytes) -> Option<bool> {
        match b.u8() % 3 {
            0 => None,
            1 => Some(true),
            _ => Some(false),
        }
    }

    fn vcpu(&self, b: &mut Bytes) -> u32 {
        let v = b.u8();
        // Mostly a valid vCPU; 1 in 32 may be out of range.
        if v >= 248 {
            u32::from(v % 8)
        } else {
            u32::from(v) % self.vcpus
        }
    }

    fn memstress(&self, b: &mut Bytes) -> MemstressArgs {
        let raw_vcpus = b.u8();
        MemstressArgs {
            vcpus: if raw_vcpus >= 250 {
                u32::from(raw_vcpus % 6)
            } else {
                1 + u32::from(raw_vcpus) % self.vcpus
            },
            pages_per_vcpu: 1 + u64::from(b.u8() % 128),
            base_gfn: self.gfn(b),
            overlap: b.bool(),
            random_access: b.bool(),
            write_percent: b.pick(&[0, 50, 100, 100, 30, 101]),
            seed: u64::from(b.u8()),
            // Not drawn from the input: the stored corpus decodes as before.
            rng_skip: 0,
            private: self.private(b),
        }
    }

    fn op(&self, b: &mut Bytes, nested: bool) -> Op {
        let code = b.u8() % if nested { 24 } else { 28 };
        match code {
            0..=4 => Op::Fault {
                gfn: self.gfn(b),
                private: self.private(b),
                write: b.bool(),
                exec: b.one_in(4),
                vcpu: self.vcpu(b),
            },
            5 | 6 => {
                let n = 1 + b.u8() as usize % 16;
                let base = self.gfn(b);
                let stride = b.pick(&[1u64, 1, 2, 511, 512]);
                let gfns = (0..n)
                    .map(|i| {
                        if b.one_in(4) {
                            self.gfn(b)
                        } else {
                            base.wrapping_add(i as u64 * stride) % self.max_gfn
                        }
                    })
                    .collect();
                Op::FaultBatch {
                    gfns,
                    private: self.private(b),
                    write: b.bool(),
                    exec: b.one_in(4),
                    vcpu: self.vcpu(b),
                }
            }
            7 | 8 => Op::Populate {
                gfn: self.gfn(b),
                npages: self.npages(b),
                private: self.private(b),
                vcpu: self.vcpu(b),
            },
            9 | 10 => Op::Zap {
                gfn: self.gfn(b),
                npages: self.npages(b),
            },
            11 => Op::Notifier {
                gfn: self.gfn(b),
                npages: self.npages(b),
            },
            12 => Op::ZapAllFast,
            13 | 14 => Op::SetAttrs {
                gfn: self.gfn(b),
                npages: self.npages(b),
                private: b.bool(),
            },
            15 => Op::PunchHole {
                gfn: self.gfn(b),
                npages: self.npages(b),
            },
            16 | 25 => {
                let size_2m = b.bool();
                let (gfn, npages) = if size_2m && !b.one_in(4) {
                    // Mostly 2M-aligned, as the API wants.
                    (self.gfn(b) & !511, 512 * (1 + u64::from(b.u8() % 2)))
                } else {
                    (self.gfn(b), self.npages(b))
                };
                Op::Pvalidate {
                    gfn,
                    npages,
                    size_2m,
                    validate: !b.one_in(4),
                }
            }
            17 => Op::RmpFault { gfn: self.gfn(b) },
            18 | 19 => {
                let backing = b.pick(&[KB4, KB4, MB2, MB2, GB1, 12345]);
                let align = (backing / KB4).max(1);
                let gfn = if b.one_in(8) {
                    self.gfn(b)
                } else {
                    // Above slot 0, aligned to the backing page.
                    (self.extra_base + u64::from(b.u8() % 16) * 512).next_multiple_of(align)
                };
                let npages = if b.one_in(8) {
                    self.npages(b)
                } else {
                    align * (1 + u64::from(b.u8() % 4))
                };
                Op::AddMemslot {
                    gfn,
                    npages,
                    backing,
                    gmem: !b.one_in(4),
                }
            }
            20 => Op::DeleteMemslot {
                index: u32::from(b.u8() % 8),
                raw: b.one_in(8),
            },
            21 => Op::Memstress(self.memstress(b)),
            22 => Op::Populate {
                gfn: self.gfn(b),
                npages: 1 + u64::from(b.u8()),
                private: self.private(b),
                vcpu: self.vcpu(b),
            },
            23 => Op::Fault {
                gfn: self.gfn(b),
                private: self.private(b),
                write: b.bool(),
                exec: false,
                vcpu: self.vcpu(b),
            },
            // Not nested in a concurrent step from here on.
            24 => Op::Finalize,
            26 => {
                let stress = self.memstress(b);
                let n = 1 + b.u8() as usize % MAX_CONCURRENT_OPS;
                let mut ops = Vec::with_capacity(n + 1);
                for _ in 0..n {
                    ops.push(self.op(b, true));
                }
                if b.one_in(16) {
                    ops.push(Op::Destroy);
                }
                Op::Concurrent { stress, ops }
            }
            // Rarely before the end: everything after it is refused.
            _ if b.one_in(4) => Op::Destroy,
            _ => Op::ZapAllFast,
        }
    }
}

fn decode_config(b: &mut Bytes) -> Config {
    let mut desc = Vec::new();
    let row = b.pick(MATRIX);
    let mut cfg = VmConfig {
        vm_type: row.vm_type,
        mirror: row.mirror,
        ..VmConfig::default()
    };
    desc.push(format!("vm_type: VmType::{:?}", row.vm_type));
    if row.mirror {
        desc.push("mirror: true".into());
    }
    let d = b.u8();
    if d & 0x80 == 0 {
        let design = row.designs[d as usize % row.designs.len()];
        cfg.hooks = Some(design);
        desc.push(format!("hooks: Some(Design::{design:?})"));
    }
    cfg.levels = if b.bool() { 5 } else { 4 };
    desc.push(format!("levels: {}", cfg.levels));
    cfg.backing = if b.one_in(3) { MB2 } else { KB4 };
    desc.push(format!("backing: {:#x}", cfg.backing));
    cfg.vcpus = 1 + u32::from(b.u8() % 4);
    desc.push(format!("vcpus: {}", cfg.vcpus));
    // 16..64 MiB in 2M steps (a multiple of either backing).
    cfg.memory = MB2 * (8 + u64::from(b.u8() % 25));
    desc.push(format!("memory: {:#x}", cfg.memory));
    cfg.seed = u64::from(b.u8());
    desc.push(format!("seed: {}", cfg.seed));
    let flags = b.u8();
    cfg.nx_huge_pages = flags & 1 != 0;
    cfg.slot_zap_all = flags & 2 == 0;
    cfg.trace = flags & 4 != 0 && flags & 8 != 0;
    desc.push(format!("nx_huge_pages: {}", cfg.nx_huge_pages));
    desc.push(format!("slot_zap_all: {}", cfg.slot_zap_all));
    desc.push(format!("trace: {}", cfg.trace));
    if cfg.vm_type.has_private_mem() && flags & 16 != 0 {
        cfg.folio_given = true;
        cfg.folio_level = if flags & 32 != 0 { 2 } else { 1 };
        desc.push(format!(
            "folio_level: {}, folio_given: true",
            cfg.folio_level
        ));
    }
    if row.tdx_options && flags & 64 != 0 {
        let o = b.u8();
        let mut set = |k: &str, v: OptionValue, cfg: &mut VmConfig| {
            cfg.tdx.set(k, v).expect("valid TDX option");
            desc.push(format!("tdx[{k:?}] = {v:?}"));
        };
        set(
            "version",
            OptionValue::Name(if o & 1 != 0 { "6.16" } else { "6.19" }),
            &mut cfg,
        );
        set(
            "sept_free",
            OptionValue::Name(if o & 2 != 0 {
                "sept_remove"
            } else {
                "teardown"
            }),
            &mut cfg,
        );
        set(
            "track",
            OptionValue::Name(if o & 4 != 0 { "batched" } else { "per_page" }),
            &mut cfg,
        );
        set(
            "interface",
            OptionValue::Name(if o & 8 != 0 { "two_hook" } else { "four_hook" }),
            &mut cfg,
        );
        set("measure", OptionValue::Bool(o & 16 != 0), &mut cfg);
        if o & 32 != 0 {
            for leaf in tdpmmu_core::config::BUSY_LEAVES {
                let p = b.pick(&[0.0, 0.0, 0.0, 0.01, 0.05, 0.1, 0.2, 0.3]);
                if p > 0.0 {
                    set(leaf, OptionValue::Number(p), &mut cfg);
                }
            }
        }
        if o & 64 != 0 {
            let r = b.pick(&[0.0, 1.0, 3.0, 1000.0]);
            set("max_local_retries", OptionValue::Number(r), &mut cfg);
        }
    }
    // 1 in 32: a configuration the API must refuse (never a panic).
    let bad = b.u8();
    if bad >= 248 {
        match bad % 8 {
            0 => {
                cfg.levels = 3;
                desc.push("levels: 3".into());
            }
            1 => {
                cfg.vcpus = 0;
                desc.push("vcpus: 0".into());
            }
            2 => {
                cfg.memory += 100;
                desc.push(format!("memory: {:#x}", cfg.memory));
            }
            3 => {
                cfg.hooks = Some(Design::Gmem);
                desc.push("hooks: Some(Design::Gmem)".into());
            }
            4 => {
                cfg.tdx.given = true;
                desc.push("tdx.given: true".into());
            }
            5 => {
                cfg.folio_given = true;
                cfg.folio_level = 3;
                desc.push("folio_level: 3, folio_given: true".into());
            }
            6 => {
                cfg.backing = GB1;
                desc.push("backing: 0x40000000".into());
            }
            _ => {
                cfg.mirror = !cfg.mirror;
                desc.push(format!("mirror: {}", cfg.mirror));
            }
        }
    }
    Config { cfg, desc }
}

/// Decode an input into a configuration and a sequence of operations.
pub fn decode(data: &[u8]) -> Case {
    let mut b = Bytes { d: data, i: 0 };
    let config = decode_config(&mut b);
    let cfg = &config.cfg;
    let mem_pages = (cfg.memory / KB4).max(1);
    let shared_bit = if cfg.levels == 4 {
        1u64 << 35
    } else {
        1u64 << 39
    };
    let mirror_root = MATRIX
        .iter()
        .any(|r| r.vm_type == cfg.vm_type && r.mirror == cfg.mirror && r.mirror_root);
    let max_gfn = if mirror_root {
        shared_bit
    } else if cfg.levels == 4 {
        1 << 36
    } else {
        1 << 40
    };
    let layout = Layout {
        mem_pages,
        extra_base: mem_pages.next_multiple_of(512) + 512,
        max_gfn,
        vcpus: cfg.vcpus.clamp(1, 4),
        recent: Default::default(),
    };
    let mut ops = Vec::new();
    while !b.done() && ops.len() < MAX_OPS {
        let op = layout.op(&mut b, false);
        // A memstress costs at least 10 ms (its caller polls every 10 ms): a few per input.
        let stress = |o: &Op| matches!(o, Op::Memstress(_) | Op::Concurrent { .. });
        if stress(&op) && ops.iter().filter(|o| stress(o)).count() >= MAX_STRESS {
            continue;
        }
        ops.push(op);
    }
    Case { config, ops }
}

/// A broken rule: what, and the log of the run up to it.
#[derive(Debug)]
pub struct Finding {
    pub rule: String,
    pub log: Vec<String>,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "FINDING: {}", self.rule)?;
        writeln!(f, "run log (operation => result):")?;
        for l in &self.log {
            writeln!(f, "  {l}")?;
        }
        Ok(())
    }
}

/// What a run did, for statistics.
#[derive(Debug, Default, Clone)]
pub struct Outcome {
    /// VM type, design and whether SEAMCALL busy injection is on, e.g. "tdx/Mirror busy".
    pub kind: String,
    pub built: bool,
    pub ops_ok: usize,
    pub ops_refused: usize,
    /// The first KVM_BUG_ON message, if the VM became bugged.
    pub bug: Option<String>,
    pub destroyed: bool,
    /// The "private" design's documented flaw showed (the first message).
    pub flawed: Option<String>,
    /// A known engine bug (`KNOWN_BUGS`) was hit and passed over (not strict).
    pub known: Option<&'static str>,
}

/// Which errors no operation may return.
fn forbidden(e: &Error) -> bool {
    matches!(
        e,
        Error::Invariant(_) | Error::OutOfMemory(_) | Error::Interrupted | Error::Livelock(_)
    )
}

fn show<T: fmt::Debug>(r: &Result<T, Error>) -> String {
    match r {
        Ok(v) => {
            let s = format!("Ok({v:?})");
            if s.len() > 200 {
                format!("{}...", &s[..200])
            } else {
                s
            }
        }
        Err(e) => format!("Err({e:?})"),
    }
}

struct Runner<'a> {
    vm: &'a Vm,
    log: Vec<String>,
    out: Outcome,
    verbose: bool,
    /// Design "private": an operation ran whose zap carries no PRIVATE filter, so the
    /// design's documented flaw may show (a private leaf dropped without the external tree /
    /// RMP hearing of it).
    flaw_armed: bool,
    /// The VM's KVM_BUG_ON was classified already.
    bug_classified: bool,
    /// Known engine bugs are findings too (the replay test; TDPMMU_FUZZ_STRICT=1).
    strict: bool,
}

/// An engine bug reported and not fixed yet: the fuzzer (unless strict) goes on past it, so it
/// does not stop every run; the replay test marks the corpus inputs that hit it.
pub struct Known {
    pub name: &'static str,
    pub reason: &'static str,
    /// Whether a KVM_BUG_ON (message) after these operations on this VM is this bug.
    pub matches: fn(vm: &Vm, ops: &[Op], msg: &str) -> bool,
}

/// Known engine bugs, recognized by their KVM_BUG_ON (see `expected_bug`). Empty: the one
/// listed here (design "private": delete_memslot sent the direct root's shared leaves to the
/// private hooks, TDH.MEM.RANGE.BLOCK: TDX_EPT_WALK_FAILED) was fixed by 211d233; its input
/// is `finding-private-design-memslot-delete` in the kept corpus.
pub const KNOWN_BUGS: &[Known] = &[];

/// Known engine bugs seen as an invariant error by the checker thread of a concurrent step.
/// Empty: memstress leaving a batch early without merging under the lock was fixed; its input
/// is `finding-memstress-early-exit-unmerged-tables` in the kept corpus.
pub const KNOWN_RACES: &[Known] = &[];

enum BugClass {
    Expected,
    Known(&'static Known),
    Unexpected,
}

/// Whether a KVM_BUG_ON is one the configuration and the operations explain:
/// - SEAMCALL busy injection: a second OPERAND_BUSY after the kick is a KVM_BUG_ON (model.md,
///   "Busy"), and with `sept_free="sept_remove"` a busy BLOCK of the parent fails SEPT.REMOVE;
/// - design "private" after an unflagged zap: the external tree / RMP never heard of a dropped
///   private leaf, and the next install there fails (tests/test_stress.py EXPECTED_FLAW);
/// - `KNOWN_BUGS`.
///
/// Nothing else: the upstream designs without busy injection never hit a KVM_BUG_ON.
fn expected_bug(vm: &Vm, flaw_armed: bool, ops: &[Op], msg: &str) -> BugClass {
    let busy = vm.cfg.tdx.busy.iter().any(|p| *p > 0.0);
    if busy
        && (msg.contains("TDX_OPERAND_BUSY")
            || (vm.cfg.tdx.sept_free == tdpmmu_core::config::SeptFree::SeptRemove
                && msg.starts_with("TDH.MEM.SEPT.REMOVE failed")))
    {
        return BugClass::Expected;
    }
    if let Some(k) = KNOWN_BUGS.iter().find(|k| (k.matches)(vm, ops, msg)) {
        return BugClass::Known(k);
    }
    if vm.design != Design::Private {
        return BugClass::Unexpected;
    }
    // AUG on a running TD, PAGE.ADD (populate) before finalize.
    let flaw = ((msg.starts_with("TDH.MEM.PAGE.AUG failed")
        || msg.starts_with("TDH.MEM.PAGE.ADD failed"))
        && msg.ends_with("TDX_EPT_ENTRY_STATE_INCORRECT"))
        || (msg.starts_with("RMPUPDATE to private failed") && msg.ends_with("FAIL_PERMISSION"));
    if flaw && flaw_armed {
        return BugClass::Expected;
    }
    BugClass::Unexpected
}

/// The "private" design's documented flaws (tests/test_tdx.py::test_designs_diverge_*,
/// tests/test_stress.py): after an unflagged zap the external tree keeps a leaf the mirror
/// dropped; at teardown the root zap carries no private flag, so a mirror root's external
/// tables are never reclaimed.
const FLAW: &str = "the private design's flaw";
const FLAW_STALE: (&str, &str) = ("mirror and S-EPT disagree: ", "only in mirror []");
const FLAW_TEARDOWN: (&str, &str) = ("teardown left ", " and 0 private leaf(s) never freed");
/// The generic part of the teardown audit (KVM's own tables), which no design excuses.
const KVM_TEARDOWN: (&str, &str) = ("teardown left ", " KVM page table(s)");

fn matches(msg: &str, (head, tail): (&str, &str)) -> bool {
    let m = msg.strip_prefix("invariant violated: ").unwrap_or(msg);
    m.starts_with(head) && m.ends_with(tail)
}

/// Whether `op` zaps without the PRIVATE filter on a VM of the "private" design.
fn unflagged_zap(vm: &Vm, op: &Op) -> bool {
    let one_root = !vm.has_mirror();
    match op {
        Op::Zap { .. } | Op::RmpFault { .. } => true,
        Op::Notifier { .. } | Op::ZapAllFast => one_root,
        // To private over a mixed range zaps it all with the SHARED filter (SNP's one root).
        Op::SetAttrs { private: true, .. } => one_root,
        Op::Concurrent { ops, .. } => ops.iter().any(|o| unflagged_zap(vm, o)),
        _ => false,
    }
}

impl Runner<'_> {
    fn finding(&self, rule: String) -> Finding {
        Finding {
            rule,
            log: self.log.clone(),
        }
    }

    fn note(&mut self, what: String) {
        if self.verbose {
            eprintln!("  {what}");
        }
        self.log.push(what);
    }

    /// One operation on the calling thread; returns its result as (ok, error).
    fn apply(vm: &Vm, op: &Op) -> (String, Option<Error>) {
        fn r<T: fmt::Debug>(x: Result<T, Error>) -> (String, Option<Error>) {
            let s = show(&x);
            (s, x.err())
        }
        match op {
            Op::Fault {
                gfn,
                private,
                write,
                exec,
                vcpu,
            } => r(vm
                .fault(*gfn, *private, *write, *exec, *vcpu)
                .map(|f| (f.ret, f.level, f.retries))),
            Op::FaultBatch {
                gfns,
                private,
                write,
                exec,
                vcpu,
            } => {
                let mut out = vec![0u8; gfns.len()];
                let x = vm.fault_batch(gfns, *private, *write, *exec, *vcpu, &mut out);
                r(x.map(|()| out))
            }
            Op::Populate {
                gfn,
                npages,
                private,
                vcpu,
            } => r(vm.populate(*gfn, *npages, *private, *vcpu)),
            Op::Zap { gfn, npages } => r(vm.zap_gfn_range(*gfn, *npages)),
            Op::Notifier { gfn, npages } => r(vm.mmu_notifier_invalidate(*gfn, *npages)),
            Op::ZapAllFast => r(vm.zap_all_fast()),
            Op::AddMemslot {
                gfn,
                npages,
                backing,
                gmem,
            } => r(vm.add_memslot(*gfn, *npages, *backing, *gmem)),
            Op::DeleteMemslot { index, raw } => {
                let id = if *raw {
                    *index
                } else {
                    let slots = vm.memslots();
                    if slots.is_empty() {
                        *index
                    } else {
                        slots[*index as usize % slots.len()].0
                    }
                };
                let (s, e) = r(vm.delete_memslot(id));
                (format!("(id {id}) {s}"), e)
            }
            Op::SetAttrs {
                gfn,
                npages,
                private,
            } => r(vm.set_memory_attributes(*gfn, *npages, *private)),
            Op::PunchHole { gfn, npages } => r(vm.punch_hole(*gfn, *npages)),
            Op::Finalize => r(vm.finalize()),
            Op::Pvalidate {
                gfn,
                npages,
                size_2m,
                validate,
            } => r(vm.pvalidate(*gfn, *npages, *size_2m, *validate)),
            Op::RmpFault { gfn } => r(vm.rmp_fault(*gfn)),
            Op::Memstress(a) => r(vm
                .run_memstress(a)
                .map(|v| v.iter().map(|x| (x.faults, x.pages)).collect::<Vec<_>>())),
            Op::Destroy => r(vm.destroy()),
            Op::Concurrent { .. } => unreachable!("not nested"),
        }
    }

    /// `check()` after an operation: it holds on a live VM; after destroy it audits teardown.
    fn check(&mut self, when: &str) -> Result<(), Finding> {
        let vm = self.vm;
        if self.out.flawed.is_some() {
            // The design's flaw showed: the external tree no longer follows the mirror, and
            // what check() or the teardown audit says from here on is that flaw's fallout.
            return Ok(());
        }
        if vm.bugged() && !vm.destroyed() {
            // A bugged VM guarantees nothing; check() must still refuse cleanly.
            return match vm.check() {
                Err(Error::Bugged(_)) => Ok(()),
                other => Err(self.finding(format!(
                    "check() on a bugged VM {when}: expected VmBugged, got {}",
                    show(&other)
                ))),
            };
        }
        match vm.check() {
            Ok(()) => Ok(()),
            Err(e) => {
                let msg = e.to_string();
                if let Some(why) = self.excuse(&msg) {
                    self.note(format!("check() {when}: {why}: {msg}"));
                    if why == FLAW {
                        self.out.flawed = Some(msg);
                    }
                    return Ok(());
                }
                let what = if vm.destroyed() {
                    "teardown audit"
                } else {
                    "check()"
                };
                Err(self.finding(format!("{what} failed {when}: {e}")))
            }
        }
    }

    /// Why an invariant error from `check()` is not a finding, if it is not:
    /// - design "private": after an unflagged zap, the stale external leaf, or at teardown
    ///   whatever the vendor never heard was unmapped (S-EPT leaves and tables, RMP entries);
    ///   on a mirror root, the external tables the teardown's unflagged root zap leaves;
    /// - a KVM_BUG_ON during destroy() (destroyed and bugged): KVM leaks what the vendor could
    ///   not free, but KVM's own tables still go.
    fn excuse(&self, msg: &str) -> Option<&'static str> {
        let vm = self.vm;
        let armed_flaw = self.flaw_armed
            && (matches(msg, FLAW_STALE) || (vm.destroyed() && !matches(msg, KVM_TEARDOWN)));
        let teardown_flaw = vm.destroyed() && vm.has_mirror() && matches(msg, FLAW_TEARDOWN);
        if vm.design == Design::Private && (armed_flaw || teardown_flaw) {
            return Some(FLAW);
        }
        if vm.destroyed() && vm.bugged() && !matches(msg, KVM_TEARDOWN) {
            return Some("leaked after a bugged teardown");
        }
        None
    }

    fn step(&mut self, i: usize, op: &Op) -> Result<(), Finding> {
        let vm = self.vm;
        let dead_before = vm.bugged() || vm.destroyed();
        let was_bugged = vm.bugged();
        if let Op::Concurrent { stress, ops } = op {
            return self.concurrent(i, stress, ops);
        }
        if vm.design == Design::Private && unflagged_zap(vm, op) {
            self.flaw_armed = true;
        }
        let (s, e) = Self::apply(vm, op);
        self.note(format!("#{i} {op} => {s}"));
        match &e {
            None => {
                self.out.ops_ok += 1;
                if dead_before {
                    return Err(self.finding(format!(
                        "#{i} {op} succeeded on a {} VM",
                        if was_bugged { "bugged" } else { "destroyed" }
                    )));
                }
            }
            Some(e) if forbidden(e) => {
                return Err(self.finding(format!("#{i} {op} returned {e:?}")));
            }
            Some(_) => self.out.ops_refused += 1,
        }
        if let (Some(Error::Bugged(m)), None) = (&e, &self.out.bug) {
            self.out.bug = Some(m.clone());
        }
        if matches!(e, Some(Error::Bugged(_))) && !vm.bugged() {
            return Err(self.finding(format!(
                "#{i} {op} returned VmBugged but vm.bugged() is false"
            )));
        }
        if matches!(op, Op::Destroy) && !dead_before && !vm.destroyed() {
            return Err(self.finding(format!(
                "#{i} destroy() returned {s} but the VM is not destroyed"
            )));
        }
        self.classify_bug(i, std::slice::from_ref(op))?;
        self.check(&format!("after #{i}"))
    }

    /// The first time the VM is seen bugged: the KVM_BUG_ON must be one this configuration
    /// can hit (see `expected_bug`), else it is a finding (or a known one).
    fn classify_bug(&mut self, i: usize, ops: &[Op]) -> Result<(), Finding> {
        let vm = self.vm;
        if self.bug_classified || !vm.bugged() {
            return Ok(());
        }
        self.bug_classified = true;
        let msg = match (&self.out.bug, vm.check()) {
            (Some(m), _) => m.clone(),
            (None, Err(Error::Bugged(m))) => m,
            (None, _) => String::from("(message not seen)"),
        };
        if self.out.bug.is_none() {
            self.out.bug = Some(msg.clone());
        }
        match expected_bug(vm, self.flaw_armed, ops, &msg) {
            BugClass::Expected => Ok(()),
            BugClass::Known(k) if !self.strict => {
                self.note(format!("#{i}: known engine bug {:?}: {msg}", k.name));
                self.out.known = Some(k.name);
                Ok(())
            }
            BugClass::Known(k) => Err(self.finding(format!(
                "#{i}: KVM_BUG_ON of the known engine bug {:?} ({}): {msg}",
                k.name, k.reason
            ))),
            BugClass::Unexpected => Err(self.finding(format!(
                "#{i}: unexpected KVM_BUG_ON (the VM is bugged) on {}: {msg}",
                self.out.kind
            ))),
        }
    }

    fn concurrent(&mut self, i: usize, stress: &MemstressArgs, ops: &[Op]) -> Result<(), Finding> {
        let vm = self.vm;
        if vm.design == Design::Private && ops.iter().any(|o| unflagged_zap(vm, o)) {
            self.flaw_armed = true;
        }
        let done = std::sync::atomic::AtomicBool::new(false);
        let (a, bs, checked) = std::thread::scope(|sc| {
            let h = sc.spawn(|| {
                let r = vm.run_memstress(stress).map(|v| v.len());
                (show(&r), r.err())
            });
            // A third thread calls check() while the other two run (it takes mmu_lock for
            // write, so it sees the VM between operations); its first error is judged below.
            let c = sc.spawn(|| {
                for _ in 0..CONCURRENT_CHECKS {
                    if done.load(std::sync::atomic::Ordering::Acquire) {
                        break;
                    }
                    match vm.check() {
                        Ok(()) | Err(Error::Bugged(_)) => {}
                        Err(e) => return Some(e),
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
                None
            });
            let bs: Vec<(String, Option<Error>)> = ops.iter().map(|o| Self::apply(vm, o)).collect();
            let a = match h.join() {
                Ok(a) => a,
                Err(p) => std::panic::resume_unwind(p),
            };
            done.store(true, std::sync::atomic::Ordering::Release);
            let checked = match c.join() {
                Ok(c) => c,
                Err(p) => std::panic::resume_unwind(p),
            };
            (a, bs, checked)
        });
        self.note(format!(
            "#{i} thread A: vm.run_memstress(&{}) => {}",
            ms(stress),
            a.0
        ));
        for (o, (s, _)) in ops.iter().zip(&bs) {
            self.note(format!("#{i} thread B: {o} => {s}"));
        }
        for (what, e) in std::iter::once((&Op::Memstress(*stress), &a.1))
            .chain(ops.iter().zip(bs.iter().map(|x| &x.1)))
        {
            match e {
                Some(e) if forbidden(e) => {
                    return Err(self.finding(format!("#{i} (concurrent) {what} returned {e:?}")));
                }
                Some(Error::Bugged(m)) => {
                    self.out.ops_refused += 1;
                    if self.out.bug.is_none() {
                        self.out.bug = Some(m.clone());
                    }
                }
                Some(_) => self.out.ops_refused += 1,
                None => self.out.ops_ok += 1,
            }
        }
        self.classify_bug(i, ops)?;
        if let Some(e) = checked {
            let msg = e.to_string();
            match (&e, self.excuse(&msg)) {
                (Error::Invariant(_), Some(why)) => {
                    self.note(format!("#{i} thread C: check() => {why}: {msg}"));
                    if why == FLAW && self.out.flawed.is_none() {
                        self.out.flawed = Some(msg);
                    }
                }
                (Error::Invariant(_), None)
                    if !self.strict && KNOWN_RACES.iter().any(|k| (k.matches)(vm, ops, &msg)) =>
                {
                    let k = KNOWN_RACES
                        .iter()
                        .find(|k| (k.matches)(vm, ops, &msg))
                        .unwrap();
                    self.note(format!(
                        "#{i} thread C: check() => known engine bug {:?}: {msg}",
                        k.name
                    ));
                    self.out.known = Some(k.name);
                }
                _ => {
                    self.note(format!("#{i} thread C: check() => Err({e:?})"));
                    return Err(self.finding(format!(
                        "#{i} check() during the concurrent step returned {e:?}"
                    )));
                }
            }
        }
        self.check(&format!("after #{i} (concurrent)"))
    }
}

/// Build the VM and run the case under the rules; `Err` is a finding.
pub fn run(case: &Case, verbose: bool, strict: bool) -> Result<Outcome, Finding> {
    let vm = match Vm::new(case.config.cfg.clone()) {
        Ok(vm) => vm,
        Err(Error::Config(m)) => {
            if verbose {
                eprintln!("  config refused: {m}");
            }
            return Ok(Outcome::default());
        }
        Err(e) => {
            return Err(Finding {
                rule: format!("Vm::new returned {e:?} (only Config errors are allowed)"),
                log: Vec::new(),
            });
        }
    };
    let mut r = Runner {
        vm: &vm,
        log: Vec::new(),
        out: Outcome {
            kind: format!(
                "{}{}/{:?}{}",
                vm.cfg.vm_type.name(),
                if vm.cfg.mirror { "+mirror" } else { "" },
                vm.design,
                if vm.cfg.tdx.busy.iter().any(|p| *p > 0.0) {
                    " busy"
                } else {
                    ""
                }
            ),
            built: true,
            ..Outcome::default()
        },
        verbose,
        flaw_armed: false,
        bug_classified: false,
        strict,
    };
    r.check("after Vm::new")?;
    for (i, op) in case.ops.iter().enumerate() {
        r.step(i, op)?;
    }
    // Tear down every VM still alive, and audit the teardown.
    if !vm.destroyed() && !vm.bugged() {
        let x = vm.destroy();
        let s = show(&x);
        r.note(format!("(end) vm.destroy() => {s}"));
        match x {
            Ok(()) => r.check("after the final destroy()")?,
            Err(Error::Bugged(m)) => {
                if r.out.bug.is_none() {
                    r.out.bug = Some(m);
                }
                if !vm.destroyed() {
                    return Err(r.finding("the final destroy() left the VM alive".into()));
                }
                r.classify_bug(case.ops.len(), &[Op::Destroy])?;
                r.check("after the final destroy() (bugged)")?;
            }
            Err(e) => return Err(r.finding(format!("the final destroy() returned {e:?}"))),
        }
    }
    r.out.destroyed = vm.destroyed();
    let out = r.out.clone();
    drop(r);
    drop(vm);
    Ok(out)
}

/// Wall-clock bound of one run (a hang beyond it is a finding in the replay test; the fuzzer
/// has its own `-timeout`).
pub const RUN_TIME_BOUND: Duration = Duration::from_secs(20);

/// Decode and run `data`; panics with the reproduction on a finding (the fuzz target's
/// entry). Set `TDPMMU_FUZZ_VERBOSE=1` to print each operation's result as it runs. `strict`:
/// a known engine bug (`KNOWN_BUGS`) is a finding too.
pub fn fuzz_one(data: &[u8], strict: bool) -> Outcome {
    let case = decode(data);
    let verbose = std::env::var_os("TDPMMU_FUZZ_VERBOSE").is_some_and(|v| !v.is_empty());
    if verbose {
        eprintln!("{case}");
    }
    let t = Instant::now();
    match run(&case, verbose, strict) {
        Ok(o) => {
            if verbose {
                eprintln!("  outcome: {o:?} in {:?}", t.elapsed());
            }
            o
        }
        Err(f) => panic!("{f}\nreproduction:\n{case}"),
    }
}
