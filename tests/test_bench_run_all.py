"""benchmarks/run_all.py: runs real benchmark scripts and writes README's table."""

import json
import subprocess
import sys
from pathlib import Path

RUN_ALL = Path(__file__).resolve().parents[1] / "benchmarks" / "run_all.py"


def run(*args, cwd):
    return subprocess.run(
        [sys.executable, str(RUN_ALL), *args], capture_output=True, text=True, cwd=cwd
    )


def test_runs_a_benchmark_and_replaces_the_readme_table(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(
        "# x\n\nbefore\n<!-- bench-table:start -->\nold table\n<!-- bench-table:end -->\nafter\n"
    )
    out = run("--only", "data", "--output", tmp_path / "res", "--readme", readme, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    records = [
        json.loads(x) for x in (tmp_path / "res" / "results.jsonl").read_text().split("\n") if x
    ]
    assert [r["bench"] for r in records] == ["data"]
    result = records[0]["result"]
    assert result["bench"] == "data" and result["objects_per_s_per_core"] > 0
    text = readme.read_text()
    assert (
        "old table" not in text and text.startswith("# x\n\nbefore\n") and text.endswith("after\n")
    )
    row = next(ln for ln in text.splitlines() if ln.startswith("| `bench_data.py`"))
    assert f"{result['objects_per_s_per_core']} 4-view" in row
    assert (tmp_path / "res" / "table.md").read_text() in text


def test_a_failing_benchmark_becomes_a_row_and_a_nonzero_exit(tmp_path):
    out = run("--only", "data", "--timeout", "0.5", "--output", tmp_path / "res", cwd=tmp_path)
    assert out.returncode == 1
    table = (tmp_path / "res" / "table.md").read_text()
    assert "failed: timed out after 0 s" in table or "failed: timed out after 1 s" in table


def test_readme_without_markers_is_a_clear_error(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("no markers\n")
    out = run(
        "--only",
        "data",
        "--timeout",
        "0.5",
        "--output",
        tmp_path / "r",
        "--readme",
        readme,
        cwd=tmp_path,
    )
    assert out.returncode != 0 and "no <!-- bench-table:start -->" in out.stderr
    assert readme.read_text() == "no markers\n"
