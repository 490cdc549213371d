"""The benchmark itself: `tests/bench.py --smoke` runs every registered
measurement with tiny sizes and reports a figure for each.  Speeds are
measured there, not asserted here; what is asserted is that every
measurement ran and produced numbers, in the printed table and in --json."""
import json
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (tests/bench.py, a script beside this module)

BENCH = Path(bench.__file__)


def test_registry_names_each_measurement_once_with_a_target():
    names = [b.name for b in bench.REGISTRY]
    assert len(names) == len(set(names))
    for b in bench.REGISTRY:
        assert (b.each is None) != (b.own is None), b.name
        assert b.about and b.targets, b.name
        # every measurement has at least one figure judged against a target
        assert any(t.check is not None and t.target != "-" for t in b.targets), b.name
    for name in ("dev2net", "net2dev", "echo", "fanout", "isolation", "load32"):
        assert name in names


def test_smoke_run_reports_a_figure_for_every_measurement(tmp_path):
    out = tmp_path / "smoke.json"
    r = subprocess.run([sys.executable, str(BENCH), "--smoke", "--json", str(out)],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
    text, err = r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")
    assert r.returncode == 0, "bench --smoke failed:\n%s\n%s" % (text[-3000:], err[-3000:])

    report = json.loads(out.read_text())
    assert report["meta"]["smoke"] is True
    assert report["errors"] == {}
    names = [b.name for b in bench.REGISTRY]
    assert report["meta"]["measurements"] == names
    for name in names:
        rows = [row for row in report["rows"] if row["name"] == name]
        assert len(rows) == len(bench.BENCH[name].targets), name
        numbers = [row["value"] for row in rows if isinstance(row["value"], (int, float))]
        assert numbers, "%s produced no figure: %r" % (name, rows)
        assert all(row["ok"] is None for row in rows), "a smoke run judged %s" % name

    # the printed table: a line per figure, starting with the measurement's
    # name, with what it measured (a number) and its target
    table = text[text.index("every measurement beside its target"):].splitlines()
    for name in names:
        lines = [line for line in table if line.split(" ", 1)[0] == name]
        assert len(lines) == len(bench.BENCH[name].targets), (name, table)
        for row, line in zip([row for row in report["rows"] if row["name"] == name], lines):
            assert row["label"] in line and row["measured"] in line and row["target"] in line, (row, line)
            if row["value"] is not None:
                assert re.search(r"\d", row["measured"]), row

    # the new rows carry their own figures
    isolation = report["own"]["isolation"]
    assert isolation["count"] > 0 and isolation["loaded_p99_us"] > 0 and isolation["a_bytes"] > 0
    load = report["own"]["load32"]
    assert load["ports"] == 32 and load["sertcp"]["delivered_min"] > 0.9
