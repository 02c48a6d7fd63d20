"""tdpmmu's exception hierarchy (defined by the native module so Rust errors map onto it).

``TdpmmuError`` is the base; ``ConfigError`` is also a ``ValueError`` so that bad arguments can
be caught either way.

- ``TdpmmuError``: the base class; raised itself for an internal error (a Rust panic, which
  never crashes the interpreter) and when a hook object calls back into its own VM.
- ``ConfigError`` (``TdpmmuError`` and ``ValueError``): a bad configuration or argument. The
  message starts with the argument's name (``"gfn: ..."``, ``"tdx['track']: ..."``) and says
  what is allowed; the VM is unchanged. Also raised for operations on a destroyed VM (naming
  ``vm``) and for operations the VM type does not have (naming ``vm_type``).
- ``VmBugged``: a rule KVM guards with ``KVM_BUG_ON`` was broken (a SEAMCALL, RMP instruction
  or hook failed where KVM does not expect it); the VM is marked bugged (``VM.bugged``) and
  refuses every further operation with this error.
- ``InvariantError``: ``VM.check()`` found a broken invariant; the message says which.
- ``OutOfMemory``: page-table or metadata memory could not be had (the arena's reservation,
  a memslot's bookkeeping, the host); nothing changed.

Wrong Python types (a bool for an int, a list for a numpy array, ...) raise ``TypeError``.
"""

from tdpmmu._core import ConfigError, InvariantError, OutOfMemory, TdpmmuError, VmBugged

__all__ = ["ConfigError", "InvariantError", "OutOfMemory", "TdpmmuError", "VmBugged"]
