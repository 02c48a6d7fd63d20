"""``VmSpec``: the full configuration of one VM, and how a VMM brings it up.

Every workload and ``compare`` builds its VMs through ``VmSpec.create(...).build()`` (the same
arguments as ``tdpmmu.VM``, coerced once by ``tdpmmu.coerce``) and then ``launch``es them the
way a VMM would for that VM type before any vCPU runs:

- **default**: nothing to do (the memslot exists, vCPUs run).
- **SNP, SW_PROTECTED** (with or without the mirror): the VMM sets the memory attributes of
  guest memory to private (``KVM_SET_MEMORY_ATTRIBUTES``) — a confidential guest's memory
  starts private — and loads the initial image, if any, as private memory.
- **TDX**: the VMM sets the attributes private, adds the initial image with
  ``KVM_TDX_INIT_MEM_REGION`` (``TDH.MEM.PAGE.ADD``, before the TD runs), then
  ``KVM_TDX_FINALIZE_VM``. Only then can a vCPU fault.

The spec is plain data (``to_dict``/``from_dict`` round-trip through JSON): it is the
``config["vm"]`` of every result envelope (``tdpmmu.results``).
"""

import dataclasses
import weakref
from collections.abc import Mapping
from typing import Any

from tdpmmu import coerce, config
from tdpmmu._core import ConfigError
from tdpmmu.costs import CostModel
from tdpmmu.sizes import format_size
from tdpmmu.vm import VM

__all__ = ["VmSpec", "describe_vm", "launch", "spec_of", "vm_config"]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class VmSpec:
    """Everything ``tdpmmu.VM(...)`` is built from, coerced: sizes in bytes, the resolved hook
    design (never ``None``), typed TDX options, a ``CostModel``."""

    vm_type: str = "default"
    mirror: bool = False
    #: Bytes of guest memory (the default memslot, from gfn 0).
    memory: int = 1 << 30
    vcpus: int = 1
    levels: int = 4
    #: Host page size behind the default memslot (bytes).
    backing: int = 4096
    #: guest_memfd folio size (bytes); None: not given (the engine's default, 4 KiB).
    folio: int | None = None
    #: Hook design name (the variant's default when none was asked for).
    hooks: str = "none"
    #: TDX options as the engine takes them (only on variants with TDX options).
    tdx: Mapping[str, coerce.TdxValue] = dataclasses.field(default_factory=dict)
    costs: CostModel = dataclasses.field(default_factory=CostModel)
    seed: int = 0
    trace: bool = False
    nx_huge_pages: bool = False
    slot_zap_all: bool = True
    #: KVM's ``enable_ept_ad_bits`` (False: A/D-disabled SPTEs, aging by access tracking).
    ad_bits: bool = True
    #: A user object answering the hooks (not part of the serialized configuration).
    hook_object: object | None = dataclasses.field(default=None, compare=False, repr=False)

    @classmethod
    def create(
        cls,
        vm_type: str = "default",
        memory: str | int = "1GiB",
        vcpus: int = 1,
        levels: int = 4,
        backing: str | int = "4K",
        hooks: object = None,
        costs: CostModel | Mapping[str, float] | None = None,
        seed: int = 0,
        trace: bool = False,
        nx_huge_pages: bool = False,
        slot_zap_all: bool = True,
        *,
        tdx: Mapping[str, object] | None = None,
        mirror: bool = False,
        folio: str | int | None = None,
        ad_bits: bool = True,
    ) -> "VmSpec":
        """Coerce ``tdpmmu.VM``'s arguments (same names, same meaning) into a spec.

        Unlike ``tdpmmu.VM`` itself, TDX option values may be text (``"true"``, ``"0.1"``),
        as the CLI gives them (``tdpmmu.coerce.tdx_option``), and the VM-type x design matrix
        is checked here, before any VM is built.

        Args:
            vm_type: ``"default"``, ``"tdx"``, ``"snp"`` or ``"sw_protected"``.
            memory: guest memory, bytes or a size string; a positive multiple of 4096 and of
                the backing page.
            vcpus: number of vCPUs, >= 1.
            levels: 4 or 5.
            backing: ``"4K"``, ``"2M"``, ``"1G"`` or bytes.
            hooks: None (the VM type's default design), a design name, a ``HookDesign`` or a
                hook object.
            costs: a ``CostModel``, a mapping of overrides, or None.
            seed: an int >= 0.
            trace: record trace events (bool).
            nx_huge_pages: KVM's NX huge pages mitigation (bool).
            slot_zap_all: KVM_X86_QUIRK_SLOT_ZAP_ALL (bool).
            tdx: TDX options (``tdpmmu.VM`` documents each), or None.
            mirror: sw_protected's mirrored variant (bool).
            folio: ``"4K"``, ``"2M"`` or bytes, or None (not given).
            ad_bits: KVM's ``enable_ept_ad_bits`` (bool, default True); False only on
                default and sw_protected VMs without a mirror root.

        Returns:
            VmSpec: the coerced spec (hook design resolved, never None).

        Raises:
            ConfigError: a bad value, naming the argument.
            TypeError: a value of the wrong type.
        """
        variant = coerce.vm_type(vm_type, mirror)
        design, options, hook_object = coerce.hooks(hooks, variant, tdx)
        backing_bytes = coerce.backing(backing)
        memory_bytes = coerce.size(memory, "memory")
        if memory_bytes % backing_bytes:
            raise ConfigError(
                f"memory: must be a multiple of the backing page ({format_size(backing_bytes)}), "
                f"got {memory!r}"
            )
        return cls(
            vm_type=variant.vm_type,
            mirror=variant.mirror,
            memory=memory_bytes,
            vcpus=coerce.count(vcpus, "vcpus"),
            levels=coerce.levels(levels),
            backing=backing_bytes,
            folio=None if folio is None else coerce.folio(folio),
            hooks=design,
            tdx=options,
            costs=coerce.cost_model(costs),
            seed=coerce.count(seed, "seed", 0),
            trace=coerce.flag(trace, "trace"),
            nx_huge_pages=coerce.flag(nx_huge_pages, "nx_huge_pages"),
            slot_zap_all=coerce.flag(slot_zap_all, "slot_zap_all"),
            ad_bits=coerce.ad_bits(ad_bits, variant),
            hook_object=hook_object,
        )

    @property
    def variant(self) -> config.Variant:
        """The spec's row of the VM-type x design matrix (``tdpmmu.config.variant``)."""
        return config.variant(self.vm_type, self.mirror)

    @property
    def label(self) -> str:
        """``vm_type``, or ``vm_type+mirror`` for the mirrored sw_protected variant."""
        return self.variant.label

    @property
    def confidential(self) -> bool:
        """The VM has private memory (guest_memfd, memory attributes): every type but
        ``default``."""
        return self.vm_type != "default"

    @property
    def pages(self) -> int:
        """Guest memory in 4 KiB pages (``memory // 4096``)."""
        return self.memory // coerce.PAGE_SIZE

    def replace(self, **changes: Any) -> "VmSpec":
        """A copy with some fields changed, coerced again (``VmSpec.create`` rules).

        Args:
            **changes: field name -> new value, as ``create`` takes it (e.g.
                ``vcpus=8``, ``backing="2M"``). A hook object is kept unless ``hooks`` is
                changed.

        Returns:
            VmSpec: the new spec.

        Raises:
            ConfigError: a bad value, naming the field.
            TypeError: a value of the wrong type. (An unknown field name is ignored.)
        """
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields.update(changes)
        hook_object = fields.pop("hook_object")
        hooks = hook_object if hook_object is not None and "hooks" not in changes else None
        return VmSpec.create(
            vm_type=fields["vm_type"],
            memory=fields["memory"],
            vcpus=fields["vcpus"],
            levels=fields["levels"],
            backing=fields["backing"],
            hooks=fields["hooks"] if hooks is None else hooks,
            costs=fields["costs"],
            seed=fields["seed"],
            trace=fields["trace"],
            nx_huge_pages=fields["nx_huge_pages"],
            slot_zap_all=fields["slot_zap_all"],
            tdx=fields["tdx"],
            mirror=fields["mirror"],
            folio=fields["folio"],
            ad_bits=fields["ad_bits"],
        )

    def build(self) -> VM:
        """A new ``tdpmmu.VM`` of this configuration (not yet launched: see ``launch``).

        ``spec_of(vm)`` finds this spec again for the VM's results.

        Returns:
            VM: the new VM.

        Raises:
            ConfigError: what the engine refuses that coercion could not know (e.g. page
                tables too large for this machine's RAM).
            OutOfMemory: the VM's arena or metadata could not be reserved.
        """
        extra: dict[str, Any] = {} if self.folio is None else {"folio": self.folio}
        if not self.ad_bits:
            extra["ad_bits"] = False
        vm = VM(
            vm_type=self.vm_type,
            memory=self.memory,
            vcpus=self.vcpus,
            levels=self.levels,
            backing=self.backing,
            hooks=self.hooks if self.hook_object is None else self.hook_object,
            costs=self.costs,
            seed=self.seed,
            trace=self.trace,
            nx_huge_pages=self.nx_huge_pages,
            slot_zap_all=self.slot_zap_all,
            tdx=dict(self.tdx) if self.tdx else None,
            mirror=self.mirror,
            **extra,
        )
        _SPECS[vm] = self
        return vm

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: sizes in bytes, ``costs`` as field -> ns, ``tdx`` as given to the engine;
        a user hook object is recorded by its type name only.

        Returns:
            dict[str, Any]: every field, plus ``label`` (``vm_type`` or
            ``"sw_protected+mirror"``). Never raises.
        """
        out: dict[str, Any] = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "costs"
        }
        out["tdx"] = dict(self.tdx)
        out["costs"] = self.costs.to_dict()
        out["hook_object"] = None if self.hook_object is None else type(self.hook_object).__name__
        out["label"] = self.label
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "VmSpec":
        """The spec ``to_dict`` described (a hook object cannot be restored: ``hooks`` keeps
        its design name).

        Args:
            data: a ``to_dict()`` mapping; ``trace``, ``nx_huge_pages``, ``slot_zap_all``,
                ``tdx``, ``mirror``, ``folio`` and ``ad_bits`` may be absent (defaults as
                ``create``).

        Returns:
            VmSpec: the spec.

        Raises:
            KeyError: a required field is missing.
            ConfigError: a bad value (``create`` rules).
            TypeError: a value of the wrong type.
        """
        return cls.create(
            vm_type=data["vm_type"],
            memory=data["memory"],
            vcpus=data["vcpus"],
            levels=data["levels"],
            backing=data["backing"],
            hooks=data["hooks"],
            costs=data["costs"],
            seed=data["seed"],
            trace=data.get("trace", False),
            nx_huge_pages=data.get("nx_huge_pages", False),
            slot_zap_all=data.get("slot_zap_all", True),
            tdx=data.get("tdx") or None,
            mirror=data.get("mirror", False),
            folio=data.get("folio"),
            ad_bits=data.get("ad_bits", True),
        )

    def describe(self) -> str:
        """One line for people, e.g. ``tdx/mirror, 4 vCPUs, memory 4GiB, 4-level TDP, backing
        2M, folio 2M, tdx track=batched, seed 0`` (returns a str; never raises)."""
        parts = [
            f"{self.label}/{self.hooks}",
            f"{self.vcpus} vCPU{'s' if self.vcpus != 1 else ''}",
            f"memory {format_size(self.memory)}",
            f"{self.levels}-level TDP",
            f"backing {coerce.size_name(self.backing)}",
        ]
        if self.folio is not None:
            parts.append(f"folio {coerce.size_name(self.folio)}")
        if not self.ad_bits:
            parts.append("A/D bits off")
        if self.tdx:
            parts.append("tdx " + ",".join(f"{k}={_text(v)}" for k, v in self.tdx.items()))
        parts.append(f"seed {self.seed}")
        return ", ".join(parts)


def _text(value: object) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def launch(vm: VM, *, image_gfn: int = 0, image_pages: int = 0) -> None:
    """Bring ``vm`` up as a VMM would before its vCPUs run (module docstring).

    ``image_pages`` pages at ``image_gfn`` are the initial image: on a TD they are added with
    ``TDH.MEM.PAGE.ADD`` before ``finalize``; on other confidential VMs they are populated as
    private memory (``KVM_PRE_FAULT_MEMORY``); on a default VM, populated. A TD is then
    finalized.

    Args:
        vm: the VM to launch (new, or at least not yet finalized if a TD).
        image_gfn: first gfn of the initial image (default 0).
        image_pages: 4 KiB pages of the initial image, >= 0 (default 0: none).

    Returns:
        None.

    Raises:
        ConfigError: ``image_pages`` < 0, or what ``VM.set_memory_attributes``,
            ``VM.populate`` or ``VM.finalize`` refuse (e.g. an image outside every memslot).
        TypeError: ``image_pages`` is not an int.
        VmBugged: a SEAMCALL or RMP instruction failed during the launch.
        OutOfMemory: page-table memory ran out.
    """
    coerce.count(image_pages, "image_pages", 0)
    if vm.vm_type != "default":
        # A confidential guest's memory starts private; set it explicitly as the VMM does
        # (a no-op, and no conversion request, when the attributes already say so).
        vm.set_memory_attributes(0, vm.memory // coerce.PAGE_SIZE, private=True)
    if image_pages:
        vm.populate(image_gfn, image_pages, private=True if vm.vm_type != "default" else None)
    if vm.vm_type == "tdx" and not vm.finalized:
        vm.finalize()


def describe_vm(vm: VM) -> dict[str, Any]:
    """What a VM says about its own configuration, for results about a VM the caller built.

    Args:
        vm: any ``tdpmmu.VM``.

    Returns:
        dict[str, Any]: ``vm_type``, ``memory``, ``vcpus``, ``levels``, ``backing``,
        ``hooks``, ``costs`` (field -> ns) and ``shared_bit``. The seed, folio and TDX options
        are not included (``VM.seed``, ``VM.folio``, ``VM.tdx_options`` have them). Never
        raises.
    """
    return {
        "vm_type": vm.vm_type,
        "memory": vm.memory,
        "vcpus": vm.vcpus,
        "levels": vm.levels,
        "backing": vm.backing,
        "hooks": vm.hooks_name,
        "costs": vm.costs.to_dict(),
        "shared_bit": vm.shared_bit,
    }


#: Specs of the VMs ``VmSpec.build`` made, so a workload handed one of them can report its
#: full configuration (a VM does not expose its seed, folio or TDX options).
_SPECS: "weakref.WeakKeyDictionary[VM, VmSpec]" = weakref.WeakKeyDictionary()


def spec_of(vm: VM) -> VmSpec | None:
    """The spec ``vm`` was built from by ``VmSpec.build``, or None for a VM made directly.

    Args:
        vm: any ``tdpmmu.VM``.

    Returns:
        VmSpec | None: the spec (kept while the VM lives). Never raises.
    """
    return _SPECS.get(vm)


def vm_config(vm: VM) -> dict[str, Any]:
    """``vm``'s configuration for a result envelope: its full spec when ``VmSpec.build`` made it,
    else what the VM exposes (``describe_vm``).

    Args:
        vm: any ``tdpmmu.VM``.

    Returns:
        dict[str, Any]: ``spec_of(vm).to_dict()`` or ``describe_vm(vm)``. Never raises.
    """
    spec = spec_of(vm)
    return spec.to_dict() if spec is not None else describe_vm(vm)
