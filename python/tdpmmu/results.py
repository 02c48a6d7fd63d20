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

Files: ``write_json``/``read_json`` store one JSON document (an envelope, a result, a sweep);
``write_csv``/``read_csv`` store flat rows (one per run, ``row_of``'s record), reading back the
same values; ``rows_to_frame`` makes a ``pandas.DataFrame`` of such rows.
"""

import csv
import dataclasses
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, Self

from tdpmmu import __version__
from tdpmmu._core import ConfigError
from tdpmmu.vm import VM

if TYPE_CHECKING:
    import pandas

__all__ = [
    "SCHEMA",
    "Envelope",
    "Result",
    "envelope_row",
    "json_safe",
    "read_csv",
    "read_json",
    "row_of",
    "rows_to_frame",
    "sum_breakdowns",
    "write_csv",
    "write_json",
]

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


# ----- flat rows and files ----------------------------------------------------------------------


def _scalar(value: Any) -> Any:
    """A row cell: JSON scalars as they are (non-finite floats -> None), the rest as JSON text."""
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return json.dumps(json_safe(value), sort_keys=True)


def envelope_row(env: Envelope | Mapping[str, Any]) -> dict[str, Any]:
    """The flat record of a run, read from its envelope alone (for results without ``row()``).

    The record has the keys a ``WorkloadResult.row()`` has: ``workload``, ``vm_type``,
    ``hooks``, ``vcpus``, ``seed``, the workload parameters and run options
    (``config["workload"]``, nested values as JSON text), the metrics (``result["metrics"]``
    when the envelope has them, else every top-level number of ``result``), ``modeled_ns`` and
    ``wall_s``.

    Args:
        env: an ``Envelope`` or its ``to_dict()`` (parsed JSON).

    Returns:
        dict[str, Any]: JSON scalars (non-finite numbers as None).

    Raises:
        ConfigError: ``env`` is a mapping that is not a tdpmmu envelope (``Envelope.from_dict``).
    """
    e = env if isinstance(env, Envelope) else Envelope.from_dict(env)
    vm = e.config.get("vm", {})
    out: dict[str, Any] = {
        "workload": e.workload,
        "vm_type": vm.get("vm_type"),
        "hooks": vm.get("hooks"),
        "vcpus": vm.get("vcpus"),
        "seed": e.seed,
    }
    wl = dict(e.config.get("workload", {}))
    options = wl.pop("options", {})
    for k, v in {**wl, **(options if isinstance(options, Mapping) else {})}.items():
        if k not in out:
            out[k] = _scalar(v)
    metrics = e.result.get("metrics")
    if not isinstance(metrics, Mapping):
        metrics = {
            k: v
            for k, v in e.result.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
    out.update({str(k): _scalar(v) for k, v in metrics.items()})
    out["modeled_ns"] = e.modeled_ns
    out["wall_s"] = e.wall_s
    return out


def row_of(result: Any) -> dict[str, Any]:
    """A result's flat record: its ``row()`` when it has one, else ``envelope_row``'s.

    Args:
        result: a workload result (``WorkloadResult`` or any ``Result`` with ``envelope()``).

    Returns:
        dict[str, Any]: JSON scalars (non-finite numbers as None), keys as ``envelope_row``.

    Raises:
        TypeError: ``result`` has neither ``row()`` nor ``envelope()``.
    """
    row = getattr(result, "row", None)
    if callable(row):
        return {str(k): _scalar(v) for k, v in row().items()}
    envelope = getattr(result, "envelope", None)
    if callable(envelope):
        return envelope_row(envelope())
    raise TypeError(f"row_of: {type(result).__name__} has neither row() nor envelope()")


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write one JSON document (indented, a newline at the end, never NaN or Infinity).

    Args:
        path: the file to write (replaced if it exists).
        data: an object with ``to_dict()`` (an envelope, a result, a sweep) or JSON-safe data
            (``json_safe`` converts it; non-finite floats become null).

    Raises:
        TypeError: ``data`` holds a value ``json_safe`` cannot store.
        OSError: the file cannot be written.
    """
    text = json.dumps(json_safe(data), indent=2, allow_nan=False)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    """The JSON document in a file (``write_json``'s), as plain JSON types.

    Args:
        path: the file to read.

    Returns:
        Any: the parsed document (e.g. pass it to ``Envelope.from_dict``).

    Raises:
        OSError: the file cannot be read.
        json.JSONDecodeError: the file is not JSON.
    """
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_csv(path: str | os.PathLike[str], rows: Iterable[Mapping[str, Any]]) -> None:
    """Write flat rows as CSV: a header with every key (first-seen order), one line per row.

    A missing key and None are written as an empty cell; bools as ``true``/``false``; floats
    with ``repr`` (so ``read_csv`` gives back the same float); text that would read back as
    something else (``"1.5"``, ``"true"``, ``""``, or text starting with a double quote) as a
    JSON string (``"1.5"`` in quotes); other non-scalars as JSON text.

    Args:
        path: the file to write (replaced if it exists).
        rows: the records, e.g. ``row_of(result)`` for each result.

    Raises:
        OSError: the file cannot be written.
    """
    rows = [dict(r) for r in rows]
    header: dict[str, None] = {}
    for r in rows:
        header.update(dict.fromkeys(str(k) for k in r))
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(list(header))
        for r in rows:
            w.writerow([_cell(r.get(k)) for k in header])


def _cell(value: Any) -> str:
    v = _scalar(value)
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    text = str(v)
    if isinstance(v, str) and (not isinstance(_parse_cell(text), str) or text.startswith('"')):
        # Text that would read back as something else ("1.5", "true", "") goes as a JSON string.
        return json.dumps(text)
    return text


def _parse_cell(text: str) -> Any:
    if text == "":
        return None
    if text.startswith('"'):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return text
        if isinstance(value, str):
            return value
        return text
    if text in ("true", "false"):
        return text == "true"
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def read_csv(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows a ``write_csv`` file holds, with types back: empty -> None, ``true``/``false``
    -> bool, integers -> int, other numbers -> float, a JSON string (``"1.5"``) -> its text,
    the rest str (JSON text of a list or mapping stays text).

    Args:
        path: the file to read.

    Returns:
        list[dict[str, Any]]: one dict per line, every header key in each.

    Raises:
        OSError: the file cannot be read.
        ValueError: a line has more cells than the header.
    """
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        out = []
        for line in reader:
            if len(line) > len(header):
                raise ValueError(f"read_csv: a line has {len(line)} cells for {len(header)} keys")
            line = line + [""] * (len(header) - len(line))
            out.append({k: _parse_cell(v) for k, v in zip(header, line, strict=True)})
        return out


def rows_to_frame(rows: Sequence[Mapping[str, Any]] | Iterable[Any]) -> "pandas.DataFrame":
    """One ``pandas.DataFrame`` of many runs: a row per record (``row_of`` for results).

    Args:
        rows: flat records (mappings) or results (anything ``row_of`` takes), mixed freely.

    Returns:
        pandas.DataFrame: one row each, columns in first-seen order.

    Raises:
        ImportError: pandas is not installed (``pip install 'tdpmmu[pandas]'``).
        TypeError: an item is neither a mapping nor a result.
    """
    try:
        import pandas
    except ImportError as e:  # pragma: no cover - the dev environment has pandas
        raise ImportError("rows_to_frame needs pandas: pip install 'tdpmmu[pandas]'") from e
    records = [dict(r) if isinstance(r, Mapping) else row_of(r) for r in rows]
    return pandas.DataFrame(records)
