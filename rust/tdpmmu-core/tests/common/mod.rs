//! Helpers shared by the integration tests: configurations by name, as a user writes them.
#![allow(dead_code)]

use tdpmmu_core::config::OptionValue;
use tdpmmu_core::stats::{C, Event};
use tdpmmu_core::{Design, Vm, VmConfig, VmType};

/// A configuration of `vm_type` with `hooks` ("" = the VM type's default design) and options
/// given as text: `mirror`, `folio` ("4K"/"2M"), `measure` ("true"/"false"), SEAMCALL busy
/// probabilities, or any other TDX option by name.
pub fn config(vm_type: &str, hooks: &str, opts: &[(&str, &str)]) -> tdpmmu_core::Result<VmConfig> {
    let mut cfg = VmConfig {
        vm_type: VmType::parse(vm_type)?,
        hooks: if hooks.is_empty() {
            None
        } else {
            Some(Design::parse(hooks)?)
        },
        memory: 1 << 30,
        ..VmConfig::default()
    };
    for (k, v) in opts {
        match *k {
            "mirror" => cfg.mirror = *v == "true",
            "folio" => {
                cfg.folio_given = true;
                cfg.folio_level = match *v {
                    "4K" => 1,
                    "2M" => 2,
                    _ => 3,
                };
            }
            "measure" | "huge_pages" => cfg.tdx.set(k, OptionValue::Bool(*v == "true"))?,
            _ => match v.parse::<f64>() {
                Ok(p) if k.starts_with("TDH.") || *k == "max_local_retries" => {
                    cfg.tdx.set(k, OptionValue::Number(p))?
                }
                _ => cfg.tdx.set(k, OptionValue::Name(v))?,
            },
        }
    }
    Ok(cfg)
}

pub fn c(vm: &Vm, c: C) -> i64 {
    vm.counter(c)
}

pub fn ops(vm: &Vm) -> Vec<&'static str> {
    vm.events().iter().map(|e| e.op).collect()
}

pub fn hook_events(vm: &Vm) -> Vec<Event> {
    vm.events()
        .into_iter()
        .filter(|e| e.op.ends_with("_spt") || e.op.ends_with("_spte"))
        .collect()
}
