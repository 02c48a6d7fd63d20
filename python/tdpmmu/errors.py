"""tdpmmu's exception hierarchy (defined by the native module so Rust errors map onto it).

``TdpmmuError`` is the base; ``ConfigError`` is also a ``ValueError`` so that bad arguments can
be caught either way.
"""

from tdpmmu._core import ConfigError, InvariantError, OutOfMemory, TdpmmuError, VmBugged

__all__ = ["ConfigError", "InvariantError", "OutOfMemory", "TdpmmuError", "VmBugged"]
