//! The event log of a traced VM (`VM(trace=True)`): hook calls, SEAMCALLs, RMP instructions
//! and a few KVM steps, in the order they happened.

/// One trace event: hook or SEAMCALL name (or a KVM step), gfn, level, and a detail word
/// (a SEAMCALL's status, a hook's SPTE, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub op: &'static str,
    pub gfn: u64,
    pub level: u8,
    pub detail: u64,
}
