"""README.md's ```python blocks run as written, as a user would type them into a Python REPL.

The blocks run in order in one namespace (a later block may use what an earlier one defined).
Each top-level statement is compiled exactly as the interactive interpreter compiles it
(``codeop``, "single" mode), so a block that only runs as a script (say, a ``for`` loop followed
by another statement without a blank line) fails here too.

A comment of the form ``# -> VALUE`` on an expression statement states what the REPL shows for
it: ``repr()`` of the value must be exactly ``VALUE`` (``None`` when the REPL shows nothing).
Other comments are descriptions; where the README wants to state a value that is not a repr it
uses an ``assert``.
"""

from __future__ import annotations

import codeop
import io
import re
import sys
import tokenize
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)
_EXPECT = "# -> "


@dataclass(frozen=True)
class Statement:
    """One top-level statement of a block: its source and where it starts in README.md."""

    source: str
    line: int
    expected: str | None


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number in the file of the block's first code line, code) for each python block."""
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in _BLOCK.finditer(text)]


def _expectation(source: str) -> str | None:
    """The VALUE of the statement's ``# -> VALUE`` comment (at most one), else None."""
    comments = [
        tok.string
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT and tok.string.startswith(_EXPECT)
    ]
    assert len(comments) <= 1, f"one '# -> ' comment per statement, got {comments}"
    return comments[0][len(_EXPECT) :].rstrip() if comments else None


def statements(code: str, first_line: int) -> Iterator[Statement]:
    """Split a block into the statements the interactive interpreter would run, line by line
    as typed: a statement is complete when ``codeop`` compiles what was typed so far; a blank
    line ends a compound statement. Raises SyntaxError where the REPL would report one."""
    compiler = codeop.CommandCompiler()
    buf: list[str] = []
    start = first_line
    for offset, text in enumerate([*code.splitlines(), ""]):
        if not buf:
            if not text.strip() or text.lstrip().startswith("#"):
                continue
            start = first_line + offset
        buf.append(text)
        source = "\n".join(buf)
        try:
            complete = compiler(source, f"README.md:{start}", "single")
        except SyntaxError as exc:
            raise SyntaxError(f"README.md line {start}: not valid in a REPL: {exc}") from exc
        if complete is not None:
            yield Statement(source, start, _expectation(source))
            buf = []
    assert not buf, f"README.md line {start}: incomplete statement at the end of the block"


class _Shown:
    """sys.displayhook stand-in: records what the REPL would print for expression statements."""

    def __init__(self) -> None:
        self.values: list[Any] = []

    def __call__(self, value: Any) -> None:
        if value is not None:
            self.values.append(value)


def run_blocks(blocks: list[tuple[int, str]]) -> int:
    """Run every statement of every block in one namespace as the REPL would; check each
    ``# -> VALUE``. Returns the number of values checked."""
    namespace: dict[str, Any] = {"__name__": "__main__"}
    checked = 0
    for first_line, code in blocks:
        for stmt in statements(code, first_line):
            compiled = compile(stmt.source, f"README.md:{stmt.line}", "single")
            shown = _Shown()
            saved, sys.displayhook = sys.displayhook, shown
            try:
                exec(compiled, namespace)
            except Exception as exc:
                raise AssertionError(
                    f"README.md line {stmt.line}: {stmt.source!r} raised {exc!r}"
                ) from exc
            finally:
                sys.displayhook = saved
            if stmt.expected is None:
                continue
            got = [repr(v) for v in shown.values] or ["None"]
            assert len(got) == 1, f"README.md line {stmt.line}: '# -> ' on several values {got}"
            assert got[0] == stmt.expected, (
                f"README.md line {stmt.line}: {stmt.source.strip()!r} shows {got[0]}, "
                f"the README says {stmt.expected}"
            )
            checked += 1
    return checked


def test_readme_python_blocks_run_and_show_what_they_say() -> None:
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    assert len(blocks) >= 3, "README.md lost its python examples (or this test its parser)"
    checked = run_blocks(blocks)
    stated = sum(code.count(_EXPECT) for _, code in blocks)
    assert checked == stated > 0, (checked, stated)


# The harness itself must be able to fail.


def test_a_wrong_stated_value_fails() -> None:
    with pytest.raises(AssertionError, match=r"shows 3, the README says 4"):
        run_blocks([(1, "1 + 2   # -> 4\n")])


def test_none_is_what_a_statement_without_a_value_shows() -> None:
    assert run_blocks([(1, "x = [1]\nx.append(2)   # -> None\nx   # -> [1, 2]\n")]) == 2


def test_a_block_that_is_not_valid_in_a_repl_fails() -> None:
    # Valid as a script, not when typed: the loop needs a blank line before the next statement.
    code = "for i in range(2):\n    i\nprint(i)\n"
    compile(code, "script", "exec")
    with pytest.raises(SyntaxError, match="not valid in a REPL"):
        run_blocks([(1, code)])


def test_an_exception_names_its_readme_line() -> None:
    with pytest.raises(AssertionError, match=r"README.md line 2: .*ZeroDivisionError"):
        run_blocks([(1, "x = 1\n1 / 0\n")])


def test_blocks_share_one_namespace_in_order() -> None:
    assert run_blocks([(1, "a = 20\n"), (5, "a + 1   # -> 21\n")]) == 1
