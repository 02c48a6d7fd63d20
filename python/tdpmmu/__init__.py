"""tdpmmu: a user-space model of Linux KVM's x86 TDP MMU.

It executes the MMU logic (SPTE encodings, the walker, cmpxchg installs, zaps) over real
page-table memory and models what it cannot execute (exits, host page allocation, TLB
shootdowns, SEAMCALLs) with sourced costs. Start with ``tdpmmu.VM``.
"""

from tdpmmu import spte
from tdpmmu._core import Fault, __version__
from tdpmmu.costs import CostModel
from tdpmmu.errors import ConfigError, InvariantError, OutOfMemory, TdpmmuError, VmBugged
from tdpmmu.hooks import HookDesign
from tdpmmu.ret import Ret
from tdpmmu.stats import Stats
from tdpmmu.sweep import SweepPoint, SweepResult, sweep
from tdpmmu.trace import Event
from tdpmmu.vm import VM
from tdpmmu.workloads import DemandPagingResult, demand_paging

__all__ = [
    "VM",
    "ConfigError",
    "CostModel",
    "DemandPagingResult",
    "Event",
    "Fault",
    "HookDesign",
    "InvariantError",
    "OutOfMemory",
    "Ret",
    "Stats",
    "SweepPoint",
    "SweepResult",
    "TdpmmuError",
    "VmBugged",
    "__version__",
    "demand_paging",
    "spte",
    "sweep",
]
