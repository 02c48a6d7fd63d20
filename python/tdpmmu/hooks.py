"""``tdpmmu.HookDesign``: a hook design with its TDX options, as one value to pass as ``hooks=``.

``VM(vm_type="tdx", hooks=HookDesign("mirror", track="batched"))`` is the same VM as
``VM(vm_type="tdx", hooks="mirror", tdx={"track": "batched"})``; a design is easier to sweep
and to print next to its results.
"""

import dataclasses

from tdpmmu import config
from tdpmmu._core import ConfigError

__all__ = ["DESIGNS", "HookDesign"]

#: Design names the engine knows (which VM types take which: ``tdpmmu.config.VARIANTS``).
DESIGNS = config.DESIGNS

#: The TDX options a design carries (those whose values are names), with their choices.
_CHOICES = {
    key: config.TDX_OPTION_CHOICES[key] for key in ("sept_free", "track", "interface", "version")
}


@dataclasses.dataclass(frozen=True, slots=True)
class HookDesign:
    """Which SPTE changes call the external hooks (``name``) and, for TD-shaped mirrors, how
    the TDX side answers them. ``None`` for an option means the engine's default (upstream).

    Args:
        name: the design: ``"mirror"`` (every change of an entry in a mirror table: upstream
            TDX), ``"private"`` (every change made for a private fault or a PRIVATE-filtered
            zap), ``"gmem"`` (guest_memfd prepare/invalidate only: upstream SNP) or
            ``"none"``. Which VM types take which: ``tdpmmu.config.VARIANTS``.
        sept_free: ``"teardown"`` (upstream: S-EPT tables live until the HKID is released) or
            ``"sept_remove"`` (BLOCK, TRACK, SEPT.REMOVE when a mirror table is freed).
        track: ``"per_page"`` (BLOCK, TRACK, kick, REMOVE per page) or ``"batched"`` (one TRACK
            and kick per zap).
        interface: ``"four_hook"`` or ``"two_hook"`` (links and removals as set_external_spte).
        version: ``"6.19"`` (PAGE.ADD from set_external_spte) or ``"6.16"`` (nr_premapped).

    Raises:
        ConfigError: an unknown design or option value, naming it and the allowed values.
    """

    name: str = "mirror"
    sept_free: str | None = None
    track: str | None = None
    interface: str | None = None
    version: str | None = None

    def __post_init__(self) -> None:
        if self.name not in DESIGNS:
            raise ConfigError(f"hooks: unknown design {self.name!r}; allowed: {', '.join(DESIGNS)}")
        for key, allowed in _CHOICES.items():
            value = getattr(self, key)
            if value is not None and value not in allowed:
                raise ConfigError(
                    f"hooks.{key}: {value!r} is not allowed; allowed: {', '.join(allowed)}"
                )

    def tdx_options(self) -> dict[str, str]:
        """The options this design sets (only those given), as ``VM(tdx=...)`` takes them."""
        return {k: v for k in _CHOICES if (v := getattr(self, k)) is not None}

    def __str__(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.tdx_options().items())
        return f"{self.name}[{opts}]" if opts else self.name
