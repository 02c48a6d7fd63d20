"""The external page-table hooks: the interface KVM calls, and the one place it calls them.

``kvm_x86_ops`` has four hooks for page tables KVM cannot write itself (TDX's S-EPT):
``link_external_spt`` when a table is linked, ``set_external_spte`` when a leaf is installed,
``remove_external_spte`` when a leaf is zapped and ``free_external_spt`` when a table is torn
down; the TDX huge-page series adds ``split_external_spt``, when a huge leaf is split under
the write lock (never on a fault).  A backend (``ExternalOps``) implements them: the TDX
module, the software mirror, or the RMP on SNP.  The *hook design* decides which SPTE changes
call them (architecture §4):

* ``mirror``: every change of an entry in a mirror table (upstream TDX);
* ``private``: every change made for private memory (a private fault, a PRIVATE-filtered
  zap), on whatever root it lands;
* ``gmem`` and ``none``: no SPTE change calls a hook.

:class:`ExternalHooks` is the dispatch site: the TDP MMU asks it whether a change of a table
calls the hooks (:meth:`ExternalHooks.fires`) and calls them through it.
"""

from __future__ import annotations

from typing import Protocol

from .arena import MmuPage
from .stats import Ctx

#: what an install hook returns: 0, -EBUSY or -EIO (the backend then hit a KVM_BUG_ON).
HOOK_OK, HOOK_EBUSY, HOOK_EIO = 0, -16, -5

#: the hook designs (architecture §4).
HOOK_DESIGNS = ("none", "mirror", "private", "gmem")


class ExternalOps(Protocol):
    """A backend of the four hooks; ``level`` is the level of the entry written (of the freed
    table for ``free_external_spt``), ``gfn`` the first gfn it maps."""

    def link_external_spt(self, gfn: int, level: int, child: MmuPage) -> int:
        """Link the child table ``child`` at (``gfn``, ``level``); returns ``HOOK_OK``,
        ``HOOK_EBUSY`` or ``HOOK_EIO``."""
        ...

    def set_external_spte(self, gfn: int, level: int, new_spte: int) -> int:
        """Install ``new_spte`` at (``gfn``, ``level``); returns ``HOOK_OK``, ``HOOK_EBUSY`` or
        ``HOOK_EIO``."""
        ...

    def remove_external_spte(self, gfn: int, level: int, old_spte: int) -> None:
        """Remove the leaf ``old_spte`` at (``gfn``, ``level``); failures are KVM_BUG_ONs."""
        ...

    def free_external_spt(self, gfn: int, level: int, sp: MmuPage) -> int:
        """Free the table ``sp`` of level ``level`` covering ``gfn``; returns a ``HOOK_*`` code."""
        ...

    def split_external_spt(self, gfn: int, level: int, child: MmuPage) -> int:
        """Split the huge leaf at (``gfn``, ``level``) into the new table ``child``; returns a
        ``HOOK_*`` code (backends without huge private pages never get it)."""
        ...


class ExternalHooks:
    """The hook design plus its backend: the one place the TDP MMU calls the external hooks.

    Every call is counted under the hook's name and traced (``op`` the hook name, ``detail``
    the arena index of the linked table or of a split's new table, the new or the old SPTE,
    0 for a freed table) before
    the backend runs, the same for every backend.  With the TDX ``interface="two_hook"``
    option, links and removals are delivered, and so counted and traced, as
    ``set_external_spte``.
    """

    def __init__(
        self, ctx: Ctx, design: str, backend: ExternalOps | None, *, two_hook: bool = False
    ) -> None:
        self.ctx = ctx
        self.design = design
        self.backend = backend
        self.two_hook = two_hook

    def fires(self, sp: MmuPage) -> bool:
        """Does a change of an entry of ``sp`` call the external hooks?"""
        if self.design == "mirror":
            return sp.is_mirror  # upstream TDX: every change of a mirror SPTE
        if self.design == "private":
            return self.ctx.op_private  # every change made for private memory
        return False  # "none", and "gmem" (guest_memfd prepare/invalidate only)

    def _call(self, hook: str, gfn: int, level: int, detail: int) -> ExternalOps | None:
        """Count and trace one call of ``hook``, as the interface delivers it; the backend
        that receives it (a KVM_BUG_ON if the VM has none)."""
        if self.two_hook and hook in ("link_external_spt", "remove_external_spte"):
            hook = "set_external_spte"  # the 2026 two-hook interface
        self.ctx.count(hook)
        self.ctx.trace(hook, gfn, level, detail)
        if self.backend is None:
            self.ctx.kvm_bug_on("external SPTE change without an external backend")
        return self.backend

    def link_external_spt(self, gfn: int, level: int, child: MmuPage) -> int:
        """Count and trace ``link_external_spt(gfn, level, child)``, then call the backend; returns
        its ``HOOK_*`` code (``HOOK_EIO`` without one)."""
        backend = self._call("link_external_spt", gfn, level, child.index)
        return HOOK_EIO if backend is None else backend.link_external_spt(gfn, level, child)

    def set_external_spte(self, gfn: int, level: int, new_spte: int) -> int:
        """Count and trace ``set_external_spte(gfn, level, new_spte)``, then call the backend;
        returns its ``HOOK_*`` code (``HOOK_EIO`` without one)."""
        backend = self._call("set_external_spte", gfn, level, new_spte)
        return HOOK_EIO if backend is None else backend.set_external_spte(gfn, level, new_spte)

    def remove_external_spte(self, gfn: int, level: int, old_spte: int) -> None:
        """Count and trace ``remove_external_spte(gfn, level, old_spte)`` (as ``set_external_spte``
        under the two-hook interface), then call the backend."""
        backend = self._call("remove_external_spte", gfn, level, old_spte)
        if backend is not None:
            backend.remove_external_spte(gfn, level, old_spte)

    def free_external_spt(self, gfn: int, level: int, sp: MmuPage) -> None:
        """Count and trace ``free_external_spt(gfn, level, sp)``, then call the backend (returns
        None)."""
        backend = self._call("free_external_spt", gfn, level, 0)
        if backend is not None:
            backend.free_external_spt(gfn, level, sp)

    def split_external_spt(self, gfn: int, level: int, child: MmuPage) -> int:
        """Count and trace ``split_external_spt(gfn, level, child)``, then call the backend;
        returns its ``HOOK_*`` code (``HOOK_EIO`` without one)."""
        backend = self._call("split_external_spt", gfn, level, child.index)
        return HOOK_EIO if backend is None else backend.split_external_spt(gfn, level, child)
