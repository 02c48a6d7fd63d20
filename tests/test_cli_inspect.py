"""``tdpmmu inspect GFN``: one page's walk through each root with decoded SPTEs, its S-EPT and
RMP entries and its trace, on default, TDX and SNP VMs; text and JSON."""

import json
import subprocess
import sys

import pytest

from tdpmmu import spte
from tdpmmu.cli import main
from tdpmmu.cli.inspect import inspect_gfn
from tdpmmu.results import Envelope


def run_json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    assert main(["inspect", *argv, "--json"]) == 0
    text = capsys.readouterr().out
    doc = json.loads(text)
    assert doc["workload"] == "inspect" and doc["simulated"] is True
    assert Envelope.from_json(text.strip()).to_dict() == doc
    return doc


def leaf(entries: list[dict]) -> dict:
    assert entries, "no walk"
    last = entries[-1]
    assert last["leaf"], last
    return last


def test_default_vm_fault(capsys: pytest.CaptureFixture[str]) -> None:
    doc = run_json(["0x205", "--fault"], capsys)
    r = doc["result"]
    assert r["gfn"] == 0x205 and r["gpa"] == 0x205000
    assert r["fault"]["ret"] == "FIXED" and r["fault"]["level"] == 1
    assert r["fault"]["private"] is False
    assert set(r["walks"]) == {"direct"} and "sept" not in r and "rmp" not in r
    walk = r["walks"]["direct"]
    assert [e["level"] for e in walk] == [4, 3, 2, 1]
    # Each entry's index is the gfn's 9 bits at that level; the leaf is the fault's SPTE.
    assert [e["index"] for e in walk] == [0, 0, 1, 5]
    last = leaf(walk)
    assert last["spte"] == r["fault"]["spte"]
    assert last["decoded"] == {k: v for k, v in spte.decode(last["spte"]).items() if k != "value"}
    assert last["decoded"]["writable"] and last["decoded"]["dirty"]
    for e in walk[:-1]:
        assert not e["leaf"] and e["decoded"]["present"]
    assert r["trace"] == []  # a default VM has no hooks, SEAMCALLs or RMP
    assert r["check"] == "ok"


def test_default_vm_read_fault_and_nothing_faulted(capsys: pytest.CaptureFixture[str]) -> None:
    read = run_json(["7", "--fault", "--read"], capsys)["result"]
    write = run_json(["7", "--fault"], capsys)["result"]
    # VM.fault: a read of a writable host page maps the same writable SPTE as a write.
    assert read["fault"]["ret"] == "FIXED"
    assert leaf(read["walks"]["direct"])["spte"] == leaf(write["walks"]["direct"])["spte"]
    r = run_json(["7"], capsys)["result"]
    assert "fault" not in r and r["walks"]["direct"] == []  # no root before a fault


def test_tdx_private_fault(capsys: pytest.CaptureFixture[str]) -> None:
    r = run_json(["100", "--vm-type", "tdx", "--fault"], capsys)["result"]
    assert r["fault"]["ret"] == "FIXED" and r["fault"]["private"] is True
    mirror = r["walks"]["mirror"]
    assert leaf(mirror)["spte"] == r["fault"]["spte"]
    assert [e["index"] for e in mirror] == [0, 0, 0, 100]
    # The direct root is walked at the shared alias (gfn | bit 35): top index 256, nothing mapped.
    direct = r["walks"]["direct"]
    assert direct[0]["index"] == 256 and not direct[-1]["decoded"]["present"]
    # The S-EPT holds the page MAPPED (accepted) under three TABLE entries.
    assert [(s["level"], s["state"]) for s in r["sept"]] == [
        (4, "TABLE"),
        (3, "TABLE"),
        (2, "TABLE"),
        (1, "MAPPED"),
    ]
    assert r["sept"][-1]["gfn"] == 100
    ops = [e["op"] for e in r["trace"] if e["gfn"] == 100 and e["level"] == 1]
    assert ops == ["set_external_spte", "TDH.MEM.PAGE.AUG", "TDG.MEM.PAGE.ACCEPT"]
    assert r["check"] == "ok"


def test_tdx_shared_page(capsys: pytest.CaptureFixture[str]) -> None:
    r = run_json(["100", "--vm-type", "tdx", "--shared", "--fault"], capsys)["result"]
    assert r["fault"]["private"] is False
    assert leaf(r["walks"]["direct"])["spte"] == r["fault"]["spte"]
    assert all(s["level"] > 1 for s in r["sept"])  # no S-EPT leaf for a shared page
    assert not any(e["op"] == "TDH.MEM.PAGE.AUG" for e in r["trace"])


def test_snp_rmp_entry(capsys: pytest.CaptureFixture[str]) -> None:
    before = run_json(["9", "--vm-type", "snp"], capsys)["result"]
    assert before["rmp"]["assigned"] is False
    r = run_json(["9", "--vm-type", "snp", "--fault"], capsys)["result"]
    assert r["rmp"] == {"assigned": True, "validated": True, "size": "4K", "gpa": 9 << 12}
    assert set(r["walks"]) == {"direct"}  # one NPT root
    assert leaf(r["walks"]["direct"])["spte"] == r["fault"]["spte"]
    assert [e["op"] for e in r["trace"]] == ["rmpupdate", "pvalidate"]
    # 2M folios and backing: the fault maps a 2M leaf from a 2M RMP entry.
    r = run_json(["9", "--vm-type", "snp", "--fault", "--folio", "2M", "--backing", "2M"], capsys)[
        "result"
    ]
    assert r["fault"]["level"] == 2 and r["rmp"]["size"] == "2M"
    assert leaf(r["walks"]["direct"])["level"] == 2


def test_text_output(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "100", "--vm-type", "tdx", "--fault"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("# tdpmmu ") and "simulated inspect on tdx/mirror" in lines[0]
    assert lines[1] == "gfn 0x64 (gpa 0x64000)"
    assert lines[2].startswith("fault: FIXED at level 1, private")
    assert "mirror (private) root:" in lines and "direct (shared) root:" in lines
    assert any(ln.split()[:2] == ["1", "100"] and " leaf pfn " in ln for ln in lines)
    assert any(ln.startswith("  level 1 gfn 0x64: MAPPED") for ln in lines)
    assert any(ln.startswith("  TDH.MEM.PAGE.AUG gfn 0x64 level 1") for ln in lines)
    assert lines[-1] == "VM.check(): ok"


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["4096", "--memory", "16M"], "gfn"),  # just past the memory
        (["5", "--private"], "private"),  # a default VM has no private memory
        (["x"], "GFN"),
        (["5", "--private", "--shared"], "not allowed"),
        (["5", "--vm-type", "snp", "--hooks", "mirror"], "hooks"),
        (["5", "--memory", "3000"], "--memory"),
    ],
)
def test_bad_input(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    try:
        status = main(["inspect", *argv])
    except SystemExit as e:
        status = int(e.code or 0)
    assert status == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.splitlines()) == 1, err


def test_inspect_gfn_is_deterministic() -> None:
    a = inspect_gfn(3, vm_type="sw_protected", mirror=True, fault=True)
    b = inspect_gfn(3, vm_type="sw_protected", mirror=True, fault=True)
    assert a.result == b.result
    assert a.result["sept"][-1]["state"] == "MAPPED"  # the software external tree
    assert a.modeled_ns == a.result["fault"]["modeled_ns"]  # only the fault was charged


@pytest.mark.cli
def test_inspect_subprocess() -> None:
    p = subprocess.run(
        [sys.executable, "-m", "tdpmmu", "inspect", "1", "--vm-type", "snp", "--fault"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert p.returncode == 0 and p.stderr == "", p.stderr
    assert "RMP entry:" in p.stdout and "assigned yes, validated yes" in p.stdout
