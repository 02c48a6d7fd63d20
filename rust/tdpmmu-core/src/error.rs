//! Errors of the core. The bindings map each variant to a Python exception.

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Bad VM configuration or argument; names the argument and the allowed range.
    #[error("{0}")]
    Config(String),
    /// A rule KVM guards with KVM_BUG_ON was broken; the VM is now bugged.
    #[error("VM is bugged: {0}")]
    Bugged(String),
    /// `check()` found a broken invariant.
    #[error("invariant violated: {0}")]
    Invariant(String),
    #[error("out of memory: {0}")]
    OutOfMemory(String),
    /// The caller asked a long operation to stop (Ctrl-C); the VM is consistent.
    #[error("interrupted")]
    Interrupted,
    /// A fault kept returning RETRY without progress (e.g. a hook that always answers -EBUSY).
    #[error("livelock: {0}")]
    Livelock(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Shorthand for argument errors: `bad_arg("gfn", format!(...))`.
pub fn bad_arg(name: &str, msg: impl std::fmt::Display) -> Error {
    Error::Config(format!("{name}: {msg}"))
}
