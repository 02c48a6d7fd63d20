"""``Envelope``: the one record every workload result and ``compare`` is saved as.

Whatever ran, its JSON has the same outer shape, so results of different runs and tools can be
read, compared and re-loaded the same way::

    {"tool": "tdpmmu", "version": "0.1.0", "simulated": true, "schema": 1,
     "workload": "demand_paging",
     "config": {"vm": {...VmSpec.to_dict()...}, "workload": {...its parameters...}},
     "seed": 0,
     "modeled_ns": 1.2e8, "cost_breakdown": {"exit_entry_ns": ..., ...},
     "wall_s": 0.41,
     "result": {...what the workload measured...}}

- ``config`` is the full configuration: every VM field (costs included) and every workload
  parameter, so the run can be repeated from the record alone.
- ``modeled_ns`` is the modeled clock (cost model) of all work the run did, and
  ``cost_breakdown`` splits it by ``CostModel`` field (``VM.cost_breakdown()``; the parts sum
  to ``modeled_ns``). For ``compare`` both are summed over its rows; each row carries its own.
- ``wall_s`` is host wall-clock time of the whole run (the simulator's time, never mixed with
  the modeled clock).

``Envelope.from_json(e.to_json()) == e`` for every envelope whose numbers are finite
(non-finite floats, e.g. the rate of an all-zero cost model, are written as ``null``).
"""

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any, Protocol, Self

from tdpmmu import __version__
from tdpmmu._core import ConfigError
from tdpmmu.vm import VM

__all__ = ["SCHEMA", "Envelope", "Result", "json_safe", "sum_breakdowns"]

#: Version of the envelope's layout (bumped when a field changes meaning).
SCHEMA = 1


def json_safe(value: Any) -> Any:
    """``value`` with plain JSON types only: mappings -> dict, sequences -> list, non-finite
    floats -> None, objects with ``to_dict()`` -> their dict.

    Args:
        value: a bool, int, str, None, float, mapping, list or tuple of those, or an object
            with ``to_dict()``.

    Returns:
        Any: the converted value (a new object; mapping keys become str).

    Raises:
        TypeError: a value of any other type ("cannot store ... in a result envelope").
    """
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict):
        return json_safe(to_dict())
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    raise TypeError(f"cannot store {type(value).__name__} in a result envelope")


def sum_breakdowns(parts: list[Mapping[str, float]]) -> dict[str, float]:
    """Field-wise sum of cost breakdowns (keys in first-seen order).

    Args:
        parts: breakdowns, each field name -> modeled nanoseconds (``VM.cost_breakdown()``).

    Returns:
        dict[str, float]: field -> the sum over ``parts`` (a field missing from a part counts
        as 0). Never raises for numeric values.
    """
    out: dict[str, float] = {}
    for part in parts:
        for k, v in part.items():
            out[k] = out.get(k, 0.0) + float(v)
    return out


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Envelope:
    """One run: what was configured, both clocks, and what the workload measured.

    The fields below are keyword-only. The envelope checks that ``cost_breakdown`` sums to
    ``modeled_ns`` when it is made.

    Raises:
        ConfigError: ``cost_breakdown`` does not sum to ``modeled_ns`` (relative tolerance
            1e-9, absolute 1e-3 ns), naming ``cost_breakdown``.
    """

    #: Which workload produced it: "demand_paging", "private_mem_conversions", "compare".
    workload: str
    #: The full configuration: ``{"vm": VmSpec.to_dict(), "workload": {...}}`` (compare:
    #: ``{"workload": {...}, "rows": [...]}``, each row with its own ``vm``).
    config: Mapping[str, Any]
    seed: int
    #: Modeled nanoseconds of everything the run did (cost model; all vCPUs and host work).
    modeled_ns: float
    #: ``modeled_ns`` by ``CostModel`` field; sums to ``modeled_ns``.
    cost_breakdown: Mapping[str, float]
    #: Host wall-clock seconds of the whole run (VM creation included).
    wall_s: float
    #: The workload's own result (JSON-safe).
    result: Mapping[str, Any]
    version: str = __version__
    tool: str = "tdpmmu"
    simulated: bool = True
    schema: int = SCHEMA

    def __post_init__(self) -> None:
        total = sum(self.cost_breakdown.values())
        if not math.isclose(total, self.modeled_ns, rel_tol=1e-9, abs_tol=1e-3):
            raise ConfigError(
                f"cost_breakdown: sums to {total} ns, not modeled_ns = {self.modeled_ns}"
            )

    @classmethod
    def of_vm(
        cls,
        workload: str,
        vm: VM,
        *,
        config: Mapping[str, Any],
        seed: int,
        wall_s: float,
        result: Mapping[str, Any],
    ) -> "Envelope":
        """An envelope whose modeled clock and breakdown are ``vm``'s now.

        Args:
            workload: the workload's name, e.g. ``"demand_paging"``.
            vm: the VM the workload ran on; its ``modeled_ns`` and ``cost_breakdown()`` are
                taken now.
            config: the full configuration (made JSON-safe).
            seed: the run's seed.
            wall_s: host wall-clock seconds of the run.
            result: what the workload measured (made JSON-safe).

        Returns:
            Envelope: the record.

        Raises:
            TypeError: ``config`` or ``result`` holds a value ``json_safe`` cannot store.
        """
        return cls(
            workload=workload,
            config=json_safe(config),
            seed=seed,
            modeled_ns=float(vm.stats_dict()["modeled_ns"]),
            cost_breakdown=dict(vm.cost_breakdown()),
            wall_s=wall_s,
            result=json_safe(result),
        )

    def to_dict(self) -> dict[str, Any]:
        """The envelope as plain JSON types, in the documented key order.

        Returns:
            dict[str, Any]: tool, version, simulated, schema, workload, config, seed,
            modeled_ns, cost_breakdown, wall_s, result (non-finite floats as None). Never
            raises.
        """
        out = {
            "tool": self.tool,
            "version": self.version,
            "simulated": self.simulated,
            "schema": self.schema,
            "workload": self.workload,
            "config": self.config,
            "seed": self.seed,
            "modeled_ns": self.modeled_ns,
            "cost_breakdown": self.cost_breakdown,
            "wall_s": self.wall_s,
            "result": self.result,
        }
        return dict(json_safe(out))

    def to_json(self, **kwargs: Any) -> str:
        """The envelope as one JSON document (``to_dict()``; never NaN or Infinity).

        Args:
            **kwargs: passed to ``json.dumps`` (e.g. ``indent=2``).

        Returns:
            str: the JSON text; ``from_json`` reads it back.
        """
        return json.dumps(self.to_dict(), allow_nan=False, **kwargs)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Envelope":
        """The envelope a ``to_dict()`` mapping (or parsed JSON) describes.

        Args:
            data: the mapping; ``tool``, ``version``, ``simulated``, ``schema`` and
                ``result`` may be absent (defaults: this tdpmmu, schema ``SCHEMA``).

        Returns:
            Envelope: the envelope.

        Raises:
            ConfigError: not a tdpmmu envelope (a required key missing, or another tool),
                another schema, or a breakdown that does not sum (naming ``envelope`` or
                ``cost_breakdown``).
        """
        missing = [
            k
            for k in ("workload", "config", "seed", "modeled_ns", "cost_breakdown", "wall_s")
            if k not in data
        ]
        if missing or data.get("tool", "tdpmmu") != "tdpmmu":
            raise ConfigError(
                f"envelope: not a tdpmmu result (missing {', '.join(missing) or 'tool'})"
            )
        if data.get("schema", SCHEMA) != SCHEMA:
            raise ConfigError(f"envelope: schema {data['schema']} is not {SCHEMA}")
        return cls(
            workload=str(data["workload"]),
            config=data["config"],
            seed=int(data["seed"]),
            modeled_ns=float(data["modeled_ns"]),
            cost_breakdown={str(k): float(v) for k, v in data["cost_breakdown"].items()},
            wall_s=float(data["wall_s"]),
            result=data.get("result", {}),
            version=str(data.get("version", __version__)),
            tool=str(data.get("tool", "tdpmmu")),
            simulated=bool(data.get("simulated", True)),
            schema=int(data.get("schema", SCHEMA)),
        )

    @classmethod
    def from_json(cls, text: str) -> "Envelope":
        """The envelope a ``to_json()`` text describes.

        Args:
            text: the JSON text.

        Returns:
            Envelope: the envelope.

        Raises:
            ConfigError: as ``from_dict``.
            json.JSONDecodeError: ``text`` is not JSON.
        """
        return cls.from_dict(json.loads(text))


class Result(Protocol):
    """What every workload result offers: its envelope, JSON both ways."""

    def envelope(self) -> Envelope:
        """The result as an ``Envelope`` (configuration, both clocks, what was measured)."""
        ...

    def to_dict(self) -> dict[str, Any]:
        """``envelope().to_dict()``: the result as plain JSON types."""
        ...

    def to_json(self, **kwargs: Any) -> str:
        """``envelope().to_json(**kwargs)``: the result as one JSON document."""
        ...

    @classmethod
    def from_envelope(cls, env: Envelope) -> Self:
        """The result an ``env`` of its workload describes (``ConfigError`` for another)."""
        ...
