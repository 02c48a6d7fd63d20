//! Typed VM configuration: VM types, hook designs, the VM-type x design matrix and the TDX
//! options, each defined once here. The bindings export the matrix and the option choices to
//! Python (`tdpmmu.config`), so neither the Python API nor the reference model keeps a copy.

use crate::cost::CostModel;
use crate::error::{Result, bad_arg};

macro_rules! named_enum {
    ($(#[$m:meta])* $ty:ident, $arg:literal { $($(#[$vm:meta])* $v:ident = $name:literal),* $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $ty { $($(#[$vm])* $v),* }
        impl $ty {
            /// Every value's name, in declaration order.
            pub const NAMES: &'static [&'static str] = &[$($name),*];
            pub const ALL: &'static [Self] = &[$(Self::$v),*];
            pub fn name(self) -> &'static str {
                match self { $(Self::$v => $name),* }
            }
            /// The value named `s`; the error names the argument and the allowed names.
            pub fn parse(s: &str) -> Result<Self> {
                match s {
                    $($name => Ok(Self::$v),)*
                    _ => Err(bad_arg($arg, format!(
                        "{s:?} is not allowed; allowed: {}", Self::NAMES.join(", ")
                    ))),
                }
            }
        }
    };
}

named_enum!(
    /// What kind of guest the VM models (architecture §3).
    VmType, "vm_type" {
        Default = "default",
        Tdx = "tdx",
        Snp = "snp",
        SwProtected = "sw_protected",
    }
);

impl VmType {
    /// `kvm_arch_has_private_mem`: the VM has memory attributes and guest_memfd.
    pub fn has_private_mem(self) -> bool {
        self != Self::Default
    }
}

named_enum!(
    /// Which SPTE changes call the external hooks (architecture §4).
    Design, "hooks" {
        /// Nothing is hooked.
        None = "none",
        /// Every change of an entry in a table whose role has `is_mirror` (upstream TDX).
        Mirror = "mirror",
        /// Every change made for a private fault or a PRIVATE-filtered zap, on any root.
        Private = "private",
        /// guest_memfd prepare/invalidate only (upstream SNP); NPT changes call nothing.
        Gmem = "gmem",
    }
);

named_enum!(
    /// When S-EPT tables of a live TD are freed.
    SeptFree, "sept_free" {
        /// Upstream: S-EPT tables live until the HKID is released, then RECLAIM.
        Teardown = "teardown",
        /// Pre-upstream: BLOCK(parent), TRACK, kick, SEPT.REMOVE, WBINVD while the HKID is assigned.
        SeptRemove = "sept_remove",
    }
);

named_enum!(
    /// The order of a TD's teardown (`destroy()`) for its private data pages.
    Teardown, "teardown" {
        /// Upstream default: each page leaves by BLOCK, TRACK, kick, REMOVE, WBINVD, clear
        /// while the HKID is assigned; the HKID is released afterwards.
        Remove = "remove",
        /// KVM_TDX_TERMINATE_VM: release the HKID first, then each page by
        /// TDH.PHYMEM.PAGE.RECLAIM and a clear.
        TerminateVm = "terminate_vm",
    }
);

named_enum!(
    /// TLB tracking of private-page removals.
    Track, "track" {
        /// Upstream: BLOCK, TRACK, kick, REMOVE for each page.
        PerPage = "per_page",
        /// BLOCK every leaf of a zap, one TRACK + one kick, then REMOVE each.
        Batched = "batched",
    }
);

named_enum!(
    /// Shape of the external-hook interface.
    Interface, "interface" {
        /// v6.16-6.19: link_external_spt, set_external_spte, remove_external_spte, free_external_spt.
        FourHook = "four_hook",
        /// 2026 shape: links and removals also arrive as set_external_spte.
        TwoHook = "two_hook",
    }
);

named_enum!(
    /// Which upstream TDX populate flow the KVM side follows.
    TdxVersion, "version" {
        /// PAGE.ADD from set_external_spte while the TD is being built.
        V6_19 = "6.19",
        /// set_external_spte only counts (`nr_premapped`); populate issues PAGE.ADD after the map.
        V6_16 = "6.16",
    }
);

/// SEAMCALL leaves that can be made to report OPERAND_BUSY (index into `TdxOptions::busy`).
pub const BUSY_LEAVES: &[&str] = &[
    "TDH.MEM.SEPT.ADD",
    "TDH.MEM.PAGE.AUG",
    "TDH.MEM.RANGE.BLOCK",
    "TDH.MEM.TRACK",
    "TDH.MEM.PAGE.REMOVE",
];

/// Options of the TDX side of a TD-shaped mirror (tdx, and sw_protected with mirror=True).
#[derive(Debug, Clone, PartialEq)]
pub struct TdxOptions {
    pub version: TdxVersion,
    pub sept_free: SeptFree,
    pub track: Track,
    pub interface: Interface,
    pub teardown: Teardown,
    /// Map private memory at 2M where guest_memfd's folio and the attributes allow
    /// (TDH.MEM.PAGE.AUG at 2M; a 2M leaf is split by BLOCK, TRACK, kick, DEMOTE).
    pub huge_pages: bool,
    /// Issue TDH.MR.EXTEND for every 256 bytes of an initial-image page.
    pub measure: bool,
    /// Probability of OPERAND_BUSY per try of each leaf of `BUSY_LEAVES`.
    pub busy: [f64; 5],
    /// Local retries of a private fault before it returns to the guest.
    pub max_local_retries: u32,
    /// Any option was set explicitly (they only apply to VMs with a TD-shaped mirror).
    pub given: bool,
}

impl Default for TdxOptions {
    fn default() -> Self {
        Self {
            version: TdxVersion::V6_19,
            sept_free: SeptFree::Teardown,
            track: Track::PerPage,
            interface: Interface::FourHook,
            teardown: Teardown::Remove,
            huge_pages: false,
            measure: false,
            busy: [0.0; 5],
            max_local_retries: 1000,
            given: false,
        }
    }
}

/// A TDX option value as it crosses the binding: typed, never re-parsed from text.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OptionValue<'a> {
    Name(&'a str),
    Bool(bool),
    Number(f64),
}

/// The TDX option keys with their allowed values ("bool", "probability" or names).
pub fn tdx_option_choices() -> Vec<(&'static str, Vec<&'static str>)> {
    let mut v = vec![
        ("version", TdxVersion::NAMES.to_vec()),
        ("sept_free", SeptFree::NAMES.to_vec()),
        ("track", Track::NAMES.to_vec()),
        ("interface", Interface::NAMES.to_vec()),
        ("teardown", Teardown::NAMES.to_vec()),
        ("measure", vec!["bool"]),
        ("huge_pages", vec!["bool"]),
        ("max_local_retries", vec!["int"]),
    ];
    v.extend(BUSY_LEAVES.iter().map(|l| (*l, vec!["probability"])));
    v
}

impl TdxOptions {
    pub fn v6_16(&self) -> bool {
        self.version == TdxVersion::V6_16
    }

    /// Set one option from a typed value; the error names the key and what it allows.
    pub fn set(&mut self, key: &str, value: OptionValue<'_>) -> Result<()> {
        let arg = format!("tdx[{key:?}]");
        let want_name = || match value {
            OptionValue::Name(n) => Ok(n),
            other => Err(bad_arg(&arg, format!("expected a name, got {other:?}"))),
        };
        // The enum's own error names the option; say it once, as tdx["key"].
        let renamed = |e: crate::error::Error| {
            let msg = e.to_string();
            let bare = msg
                .split_once(": ")
                .map_or(msg.as_str(), |(_, m)| m)
                .to_string();
            bad_arg(&arg, bare)
        };
        match key {
            "version" => self.version = TdxVersion::parse(want_name()?).map_err(renamed)?,
            "sept_free" => self.sept_free = SeptFree::parse(want_name()?).map_err(renamed)?,
            "track" => self.track = Track::parse(want_name()?).map_err(renamed)?,
            "interface" => self.interface = Interface::parse(want_name()?).map_err(renamed)?,
            "teardown" => self.teardown = Teardown::parse(want_name()?).map_err(renamed)?,
            "measure" => match value {
                OptionValue::Bool(b) => self.measure = b,
                other => return Err(bad_arg(&arg, format!("expected a bool, got {other:?}"))),
            },
            "huge_pages" => match value {
                OptionValue::Bool(b) => self.huge_pages = b,
                other => return Err(bad_arg(&arg, format!("expected a bool, got {other:?}"))),
            },
            "max_local_retries" => match value {
                OptionValue::Number(n) if n.fract() == 0.0 && (0.0..=1e6).contains(&n) => {
                    self.max_local_retries = n as u32
                }
                other => {
                    return Err(bad_arg(
                        &arg,
                        format!("expected an integer in 0..=1000000, got {other:?}"),
                    ));
                }
            },
            _ => {
                let Some(i) = BUSY_LEAVES.iter().position(|l| *l == key) else {
                    let keys: Vec<&str> = tdx_option_choices().iter().map(|c| c.0).collect();
                    return Err(bad_arg(
                        "tdx",
                        format!("unknown option {key:?}; allowed: {}", keys.join(", ")),
                    ));
                };
                match value {
                    OptionValue::Number(p) if (0.0..=1.0).contains(&p) => self.busy[i] = p,
                    other => {
                        return Err(bad_arg(
                            &arg,
                            format!("expected a probability in [0, 1], got {other:?}"),
                        ));
                    }
                }
            }
        }
        self.given = true;
        Ok(())
    }
}

/// One row of the VM-type x design matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Variant {
    pub vm_type: VmType,
    /// sw_protected only: the seed's "mirrored page table with a shared bit" variant.
    pub mirror: bool,
    /// Designs this variant accepts; the first is its default (upstream behaviour).
    pub designs: &'static [Design],
    /// The VM has a mirror root beside the direct root (and a shared alias bit).
    pub mirror_root: bool,
    /// TDX options apply.
    pub tdx_options: bool,
}

impl Variant {
    pub fn default_design(&self) -> Design {
        self.designs[0]
    }
}

/// Every valid (vm_type, mirror) variant with its designs (architecture §3, §4).
pub const MATRIX: &[Variant] = &[
    Variant {
        vm_type: VmType::Default,
        mirror: false,
        designs: &[Design::None],
        mirror_root: false,
        tdx_options: false,
    },
    Variant {
        vm_type: VmType::SwProtected,
        mirror: false,
        designs: &[Design::None],
        mirror_root: false,
        tdx_options: false,
    },
    Variant {
        vm_type: VmType::SwProtected,
        mirror: true,
        designs: &[Design::Mirror, Design::Private],
        mirror_root: true,
        tdx_options: true,
    },
    Variant {
        vm_type: VmType::Snp,
        mirror: false,
        designs: &[Design::Gmem, Design::Private],
        mirror_root: false,
        tdx_options: false,
    },
    Variant {
        vm_type: VmType::Tdx,
        mirror: false,
        designs: &[Design::Mirror, Design::Private],
        mirror_root: true,
        tdx_options: true,
    },
];

/// The matrix row of (vm_type, mirror), or an error saying which VM types take `mirror`.
pub fn variant(vm_type: VmType, mirror: bool) -> Result<&'static Variant> {
    MATRIX
        .iter()
        .find(|v| v.vm_type == vm_type && v.mirror == mirror)
        .ok_or_else(|| {
            bad_arg(
                "mirror",
                format!(
                    "only sw_protected VMs take mirror=True, not {}",
                    vm_type.name()
                ),
            )
        })
}

/// The design named `name` for a VM of `vm_type` (with `mirror`); an unknown name is refused
/// with the designs that VM takes.
pub fn parse_design(name: &str, vm_type: VmType, mirror: bool) -> Result<Design> {
    Design::parse(name).map_err(|_| {
        let allowed = variant(vm_type, mirror)
            .map(|v| {
                v.designs
                    .iter()
                    .map(|d| d.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_else(|_| Design::NAMES.join(", "));
        bad_arg(
            "hooks",
            format!("{name:?} is not a hook design; allowed: {allowed}"),
        )
    })
}

/// Guest-memory level of a guest_memfd folio: 1 (4K) or 2 (2M).
pub const FOLIO_LEVELS: &[u8] = &[1, 2];

/// Everything a VM is built from.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub vm_type: VmType,
    /// Guest memory in bytes (slot 0 covers it from gfn 0).
    pub memory: u64,
    pub vcpus: u32,
    pub levels: u8,
    /// Host page size behind slot 0, in bytes.
    pub backing: u64,
    /// None = the variant's default design.
    pub hooks: Option<Design>,
    pub costs: CostModel,
    pub seed: u64,
    pub trace: bool,
    pub nx_huge_pages: bool,
    /// KVM_X86_QUIRK_SLOT_ZAP_ALL (default VMs): memslot deletion zaps everything.
    pub slot_zap_all: bool,
    pub tdx: TdxOptions,
    /// sw_protected only: a mirror root with a shared bit (the seed's variant).
    pub mirror: bool,
    /// guest_memfd folio level: 1 (4K) or 2 (2M).
    pub folio_level: u8,
    /// A folio size was given explicitly (only VM types with guest_memfd take one).
    pub folio_given: bool,
    /// Bytes of page tables and per-page metadata the VM may commit (None = the host's RAM).
    pub budget: Option<u64>,
    /// KVM's `enable_ept_ad_bits` (kvm_intel's `eptad`): EPT A/D bits on (default). Off, the
    /// SPTEs are A/D-disabled and aging marks them for access tracking; NPT (SNP) always
    /// has A/D, and TDX needs them.
    pub ad_bits: bool,
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            vm_type: VmType::Default,
            memory: 1 << 30,
            vcpus: 1,
            levels: 4,
            backing: 4096,
            hooks: None,
            costs: CostModel::default(),
            seed: 0,
            trace: false,
            nx_huge_pages: false,
            slot_zap_all: true,
            tdx: TdxOptions::default(),
            mirror: false,
            folio_level: 1,
            folio_given: false,
            budget: None,
            ad_bits: true,
        }
    }
}

impl VmConfig {
    /// The matrix row and the design this configuration selects, or the first reason it is
    /// not a valid combination.
    pub fn resolve(&self) -> Result<(&'static Variant, Design)> {
        let v = variant(self.vm_type, self.mirror)?;
        let design = self.hooks.unwrap_or(v.default_design());
        if !v.designs.contains(&design) {
            let allowed: Vec<&str> = v.designs.iter().map(|d| d.name()).collect();
            let what = if self.mirror {
                format!("{} with mirror=True", self.vm_type.name())
            } else {
                self.vm_type.name().to_string()
            };
            let hint = if self.vm_type == VmType::SwProtected && !self.mirror {
                " (mirror and private need mirror=True)"
            } else {
                ""
            };
            return Err(bad_arg(
                "hooks",
                format!(
                    "{:?} is not valid for a {what} VM; allowed: {}{hint}",
                    design.name(),
                    allowed.join(", ")
                ),
            ));
        }
        if self.tdx.given && !v.tdx_options {
            return Err(bad_arg(
                "tdx",
                format!(
                    "TDX options apply to tdx VMs (and sw_protected with mirror=True), not {}",
                    self.vm_type.name()
                ),
            ));
        }
        if !self.ad_bits {
            if self.vm_type == VmType::Snp {
                return Err(bad_arg(
                    "ad_bits",
                    "an snp VM runs on AMD NPT, whose A/D bits are always on; ad_bits=False \
                     (kvm_intel eptad=0) applies to default and sw_protected VMs",
                ));
            }
            if v.mirror_root {
                return Err(bad_arg(
                    "ad_bits",
                    format!(
                        "KVM refuses TDX without EPT A/D bits (tdx_bringup needs \
                         enable_ept_ad_bits: the mirror/external page tables assume them), so \
                         a {} VM with a mirror root takes ad_bits=True only; ad_bits=False \
                         applies to default and sw_protected VMs",
                        self.vm_type.name()
                    ),
                ));
            }
        }
        if !FOLIO_LEVELS.contains(&self.folio_level) {
            return Err(bad_arg("folio", "guest_memfd folio size must be 4K or 2M"));
        }
        if self.folio_given && !self.vm_type.has_private_mem() {
            return Err(bad_arg(
                "folio",
                format!(
                    "a {} VM has no guest_memfd; folio applies to tdx, snp and sw_protected",
                    self.vm_type.name()
                ),
            ));
        }
        Ok((v, design))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matrix_defaults_are_upstream() {
        let d = |t, m| variant(t, m).unwrap().default_design();
        assert_eq!(d(VmType::Default, false), Design::None);
        assert_eq!(d(VmType::Tdx, false), Design::Mirror);
        assert_eq!(d(VmType::Snp, false), Design::Gmem);
        assert_eq!(d(VmType::SwProtected, false), Design::None);
        assert_eq!(d(VmType::SwProtected, true), Design::Mirror);
        assert!(variant(VmType::Tdx, true).is_err());
    }

    #[test]
    fn typed_tdx_options() {
        let mut o = TdxOptions::default();
        o.set("track", OptionValue::Name("batched")).unwrap();
        assert_eq!(o.track, Track::Batched);
        assert!(o.given);
        let e = o.set("track", OptionValue::Bool(true)).unwrap_err();
        assert!(e.to_string().contains("tdx[\"track\"]"), "{e}");
        o.set("TDH.MEM.PAGE.AUG", OptionValue::Number(0.5)).unwrap();
        assert_eq!(o.busy[1], 0.5);
        assert!(o.set("TDH.MEM.PAGE.AUG", OptionValue::Number(1.5)).is_err());
        assert!(o.set("nope", OptionValue::Bool(true)).is_err());
    }

    #[test]
    fn resolve_rejects_bad_combinations() {
        let cfg = VmConfig {
            vm_type: VmType::Snp,
            hooks: Some(Design::Mirror),
            ..VmConfig::default()
        };
        let e = cfg.resolve().unwrap_err().to_string();
        assert!(e.contains("gmem, private"), "{e}");
        let cfg = VmConfig {
            folio_given: true,
            folio_level: 2,
            ..VmConfig::default()
        };
        assert!(cfg.resolve().unwrap_err().to_string().contains("folio"));
        let mut cfg = VmConfig {
            vm_type: VmType::SwProtected,
            ..VmConfig::default()
        };
        cfg.tdx.given = true;
        // sw_protected without mirror: the TDX options are what is wrong, not the hooks.
        assert!(cfg.resolve().unwrap_err().to_string().starts_with("tdx"));
        // A/D bits off: Intel default and sw_protected VMs only.
        for (vm_type, mirror, ok) in [
            (VmType::Default, false, true),
            (VmType::SwProtected, false, true),
            (VmType::SwProtected, true, false),
            (VmType::Tdx, false, false),
            (VmType::Snp, false, false),
        ] {
            let cfg = VmConfig {
                vm_type,
                mirror,
                ad_bits: false,
                ..VmConfig::default()
            };
            match cfg.resolve() {
                Ok(_) => assert!(ok, "{vm_type:?} took ad_bits=False"),
                Err(e) => {
                    assert!(!ok, "{vm_type:?}: {e}");
                    assert!(e.to_string().starts_with("ad_bits"), "{e}");
                }
            }
        }
    }
}
