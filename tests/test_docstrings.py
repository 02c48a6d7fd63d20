"""Every public name of tdpmmu is documented where ``help()`` finds it.

The rule (the issue "help(tdpmmu.VM) is not enough to use the API"): every public name gets a
docstring that says what it models, its arguments, what it returns and what it raises. This
file checks what a program can check:

- every public module (``tdpmmu`` and its submodules) has a module docstring;
- every class, function and module in a module's ``__all__`` has a docstring of its own (not
  the one ``dataclasses`` or ``NamedTuple`` generate), and every constant in it a ``#:``
  comment above its assignment (or a comment on its line);
- every public method and property of those classes has a docstring, and every argument of a
  public function or method is named in its docstring (outside ``tdpmmu.reference``, whose
  methods are KVM's functions and say so);
- ``tdpmmu.VM`` (with every method it inherits from the native ``tdpmmu._core.Vm``) and
  ``tdpmmu.Fault``: every public method and property has a docstring; a method's docstring
  has an ``Args:`` entry for each argument, a ``Returns:`` section and, unless the method
  cannot raise, a ``Raises:`` section; the class docstring of ``VM`` has an ``Args:`` entry for
  every constructor argument;
- every ``tdpmmu.Ret`` member is named in ``Ret``'s docstring.

A name whose docstring has to wait (e.g. in a module being rewritten elsewhere) can go in
``PENDING``: a strict xfail, so the suite fails once the name gets its docstring and the entry
must be deleted.
"""

import ast
import dataclasses
import importlib
import inspect
import pkgutil
import re
import types
from collections.abc import Iterator

import pytest

import tdpmmu

# Names whose docstring is still missing in a module this work does not own. Each is a strict
# xfail: documenting it makes the test pass unexpectedly, and the entry must then be removed.
PENDING: frozenset[str] = frozenset()

# VM methods that cannot raise (they only read what the VM already has); every other public
# method of VM must have a Raises: section.
NEVER_RAISES = frozenset({"cost_breakdown", "stats_dict", "tables", "trace_events"})


# ----- helpers (each tested on a bad example at the end of this file) --------------------------


def public_modules() -> list[str]:
    """``tdpmmu`` and every submodule without a leading underscore in its path."""
    names = ["tdpmmu"]
    for info in pkgutil.walk_packages(tdpmmu.__path__, "tdpmmu."):
        if not any(part.startswith("_") for part in info.name.split(".")[1:]):
            names.append(info.name)
    return names


def own_doc(obj: object) -> str:
    """The docstring ``obj`` itself has ("" when it has none, or only a generated one)."""
    if isinstance(obj, property):
        obj = obj.fget
    if isinstance(obj, staticmethod | classmethod):
        obj = obj.__func__
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else getattr(obj, "__doc__", None)
    if not isinstance(doc, str):
        return ""
    doc = doc.strip()
    # dataclasses and NamedTuple write "Name(field, ...)" when a class has no docstring.
    if inspect.isclass(obj) and doc.startswith(f"{obj.__name__}("):
        return ""
    return doc


def is_documentable(obj: object) -> bool:
    """Things that carry a ``__doc__`` of their own (everything else is a constant)."""
    return (
        inspect.isclass(obj)
        or inspect.isfunction(obj)
        or inspect.isbuiltin(obj)
        or isinstance(obj, types.ModuleType)
    )


def members(cls: type) -> Iterator[tuple[str, object]]:
    """Public methods and properties defined in ``cls`` itself (not fields or constants)."""
    for name, attr in vars(cls).items():
        if name.startswith("_"):
            continue
        if (
            isinstance(attr, staticmethod | classmethod | property)
            or inspect.isfunction(attr)
            or isinstance(attr, types.MethodDescriptorType | types.GetSetDescriptorType)
        ):
            yield name, attr


def parameters(func: object) -> list[str]:
    """Argument names of a function or native method, without ``self``/``cls``."""
    if isinstance(func, staticmethod | classmethod):
        func = func.__func__
    try:
        sig = inspect.signature(func)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return []
    return [p for p in sig.parameters if p not in ("self", "cls")]


def section(doc: str, title: str) -> list[str] | None:
    """The lines of a Google-style section (``Args:``, ``Returns:``, ``Raises:``), or None."""
    lines = inspect.cleandoc(doc).splitlines()
    for i, line in enumerate(lines):
        if line.strip() == f"{title}:":
            indent = len(line) - len(line.lstrip())
            body = []
            for nxt in lines[i + 1 :]:
                if nxt.strip() and len(nxt) - len(nxt.lstrip()) <= indent:
                    break
                body.append(nxt)
            return body
    return None


def arg_entries(doc: str) -> set[str]:
    """Names with an entry in the ``Args:`` section (``name: ...`` or ``**name: ...``)."""
    body = section(doc, "Args") or []
    if not body:
        return set()
    first = min(len(b) - len(b.lstrip()) for b in body if b.strip())
    entries = set()
    for line in body:
        if len(line) - len(line.lstrip()) == first:
            m = re.match(r"\s*\*{0,2}(\w+)\s*(\([^)]*\))?:", line)
            if m:
                entries.add(m[1])
    return entries


def undocumented_constants(module: types.ModuleType, source: str | None = None) -> list[str]:
    """Constants of ``module.__all__`` assigned in it without a ``#:`` comment above the
    assignment or a comment on its line (``source``: the module's, read when None)."""
    if source is None:
        source = inspect.getsource(module)
    lines = source.splitlines()
    assigned: dict[str, int] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for n in ast.walk(target):
                    if isinstance(n, ast.Name):
                        assigned[n.id] = node.lineno
    missing = []
    for name in getattr(module, "__all__", ()):
        if name.startswith("__") or is_documentable(getattr(module, name)):
            continue
        lineno = assigned.get(name)
        if lineno is None:
            continue  # imported: documented where it is defined
        above = lines[lineno - 2].strip() if lineno >= 2 else ""
        if not (above.startswith("#:") or "  #" in lines[lineno - 1]):
            missing.append(name)
    return missing


# ----- what is checked -------------------------------------------------------------------------


def exported() -> Iterator[tuple[str, object, bool]]:
    """``(qualified name, object, in the reference model)`` for every documentable name of
    every public module's ``__all__`` and every public member of the classes among them."""
    seen: set[tuple[int, str]] = set()
    for modname in public_modules():
        module = importlib.import_module(modname)
        reference = modname.startswith("tdpmmu.reference")
        for name in getattr(module, "__all__", ()):
            obj = getattr(module, name)
            if not is_documentable(obj) or (id(obj), "") in seen:
                continue
            seen.add((id(obj), ""))
            origin = getattr(obj, "__module__", modname) or modname
            qual = f"{origin}.{name}" if origin.startswith("tdpmmu") else f"{modname}.{name}"
            yield qual, obj, reference
            if inspect.isclass(obj) and obj.__module__.startswith("tdpmmu"):
                for mname, member in members(obj):
                    if (id(obj), mname) in seen:
                        continue
                    seen.add((id(obj), mname))
                    yield f"{obj.__module__}.{obj.__qualname__}.{mname}", member, reference


def cases() -> list[object]:
    """pytest params of the exported names, ``PENDING`` ones as strict xfails."""
    out: list[object] = []
    for qual, obj, reference in exported():
        marks = [pytest.mark.xfail(strict=True, reason="pending")] if qual in PENDING else []
        out.append(pytest.param(qual, obj, reference, id=qual, marks=marks))
    return out


def problems_of(qual: str, obj: object, reference: bool) -> list[str]:
    """What is wrong with the docstring of one exported name."""
    doc = own_doc(obj)
    if not doc:
        return [f"{qual}: no docstring"]
    if reference or inspect.isclass(obj) or isinstance(obj, property | types.ModuleType):
        return []
    missing = [p for p in parameters(obj) if not re.search(rf"\b{re.escape(p)}\b", doc)]
    return [f"{qual}: argument {p!r} is not named in the docstring" for p in missing]


def vm_problems(cls: type, name: str) -> list[str]:
    """What is wrong with the docstring of one public attribute of VM or Fault (inherited
    native ones included)."""
    attr = inspect.getattr_static(cls, name)
    where = f"{cls.__name__}.{name}"
    doc = own_doc(attr)
    if not doc:
        return [f"{where}: no docstring"]
    if isinstance(attr, property | types.GetSetDescriptorType):
        return []  # a property: its docstring says what it holds
    out = []
    args = parameters(attr)
    entries = arg_entries(doc)
    out += [f"{where}: no Args: entry for {a!r}" for a in args if a not in entries]
    out += [f"{where}: Args: entry {e!r} is not an argument" for e in entries - set(args)]
    if section(doc, "Returns") is None:
        out.append(f"{where}: no Returns: section")
    if name not in NEVER_RAISES and section(doc, "Raises") is None:
        out.append(f"{where}: no Raises: section")
    return out


def public_attributes(cls: type) -> list[str]:
    return sorted(n for n in dir(cls) if not n.startswith("_"))


# ----- the tests -------------------------------------------------------------------------------


@pytest.mark.parametrize("modname", public_modules())
def test_module_has_docstring(modname: str) -> None:
    module = importlib.import_module(modname)
    assert own_doc(module), f"{modname}: no module docstring"


@pytest.mark.parametrize("modname", public_modules())
def test_exported_constants_are_commented(modname: str) -> None:
    module = importlib.import_module(modname)
    assert undocumented_constants(module) == [], f"{modname}: constants without a #: comment"


@pytest.mark.parametrize(("qual", "obj", "reference"), cases())
def test_exported_name_is_documented(qual: str, obj: object, reference: bool) -> None:
    assert problems_of(qual, obj, reference) == []


@pytest.mark.parametrize("name", public_attributes(tdpmmu.VM))
def test_vm_attribute_is_documented(name: str) -> None:
    assert vm_problems(tdpmmu.VM, name) == []


@pytest.mark.parametrize("name", public_attributes(tdpmmu.Fault))
def test_fault_attribute_is_documented(name: str) -> None:
    assert vm_problems(tdpmmu.Fault, name) == []


def test_vm_constructor_arguments_are_documented() -> None:
    args = parameters(tdpmmu.VM.__new__)
    entries = arg_entries(tdpmmu.VM.__doc__ or "")
    assert [a for a in args if a not in entries] == []
    assert section(tdpmmu.VM.__doc__ or "", "Raises") is not None


def test_vm_documents_every_tdx_option_and_design() -> None:
    doc = tdpmmu.VM.__doc__ or ""
    for key, allowed in tdpmmu.config.TDX_OPTION_CHOICES.items():
        assert f'"{key}"' in doc, f"TDX option {key} is not documented"
        for value in allowed:
            if value not in ("bool", "int", "probability"):
                assert f'"{value}"' in doc, f"tdx[{key!r}] = {value!r} is not documented"
    for design in tdpmmu.config.DESIGNS:
        assert f'"{design}"' in doc, f"hook design {design} is not documented"
    for vm_type in tdpmmu.config.VM_TYPES:
        assert f'"{vm_type}"' in doc, f"VM type {vm_type} is not documented"


def test_ret_members_are_documented() -> None:
    doc = own_doc(tdpmmu.Ret)
    assert [m.name for m in tdpmmu.Ret if not re.search(rf"\b{m.name}\b", doc)] == []


def test_pending_names_exist() -> None:
    # A stale PENDING entry (renamed or removed) would hide nothing and should go.
    names = {qual for qual, _, _ in exported()}
    assert sorted(PENDING - names) == []


# ----- the checks catch what they should -------------------------------------------------------


def test_checks_catch_missing_docstrings() -> None:
    @dataclasses.dataclass
    class Generated:
        x: int

        def method(self, a: int) -> int:
            return a

        @property
        def prop(self) -> int:
            return self.x

    def documented_without_args(gfn: int, npages: int) -> int:
        """Zap things."""
        return gfn + npages

    assert own_doc(Generated) == ""  # only the dataclass's "Generated(x: int)"
    assert problems_of("Generated", Generated, False) == ["Generated: no docstring"]
    names = dict(members(Generated))
    assert problems_of("m", names["method"], False) == ["m: no docstring"]
    assert problems_of("p", names["prop"], False) == ["p: no docstring"]
    assert problems_of("f", documented_without_args, False) == [
        "f: argument 'gfn' is not named in the docstring",
        "f: argument 'npages' is not named in the docstring",
    ]


def test_vm_checks_catch_incomplete_docstrings() -> None:
    class Fake:
        def zap(self, gfn: int, npages: int) -> int:
            """Zap a range.

            Args:
                gfn: first page.

            Returns:
                int: leaves zapped.
            """
            return gfn + npages

        def nothing(self) -> None:
            pass

        @property
        def value(self) -> int:
            """A value."""
            return 1

    assert vm_problems(Fake, "zap") == [
        "Fake.zap: no Args: entry for 'npages'",
        "Fake.zap: no Raises: section",
    ]
    assert vm_problems(Fake, "nothing") == ["Fake.nothing: no docstring"]
    assert vm_problems(Fake, "value") == []


def test_constant_check_catches_a_bare_constant() -> None:
    module = types.ModuleType("fake_constants")
    source = '"""Doc."""\n__all__ = ["A", "B", "C"]\n#: Documented.\nA = 1\nB = 2\nC = 3  # noted\n'
    exec(compile(source, "fake_constants", "exec"), module.__dict__)
    assert undocumented_constants(module, source) == ["B"]
