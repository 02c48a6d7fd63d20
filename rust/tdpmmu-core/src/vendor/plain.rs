//! The vendor of default and SW_PROTECTED VMs: a plain VMX/SVM guest with no private-memory
//! hardware. Private memory (SW_PROTECTED) is guest_memfd pages behind the same NPT/EPT.

use std::any::Any;

use super::Vendor;
use crate::config::VmType;
use crate::error::{Result, bad_arg};

pub struct Plain {
    pub vm_type: VmType,
}

impl Vendor for Plain {
    fn finalize_supported(&self) -> Result<()> {
        Err(bad_arg(
            "vm_type",
            format!(
                "finalize is a TDX operation; a {} VM is not a TD",
                self.vm_type.name()
            ),
        ))
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}
