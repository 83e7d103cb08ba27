"""The decision-log benchmark, CI-sized: it runs on both backends and reports every figure."""

import json
from pathlib import Path

from benchmarks.decision_log_bench import main


def test_the_benchmark_measures_every_writer(tmp_path: Path, postgres_url: str, capsys) -> None:
    out = tmp_path / "figures.json"
    argv = ["--batches", "2", "--posts-per-batch", "10", "--verdicts", "5"]
    assert main([*argv, "--postgres-url", postgres_url, "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert list(figures) == ["sqlite3 (baseline)", "sqlite", "postgresql"]
    for name, r in figures.items():
        assert r["rows"] == 2 * 10 * 6, name
        assert r["rows_per_s"] > 0 and r["cpu_us_per_row"] > 0
        assert r["flush_max_ms"] >= r["flush_p50_ms"] > 0
    assert all(figures[n]["feedback_commit_ms"] > 0 for n in ("sqlite", "postgresql"))
    table = capsys.readouterr().out
    assert "120 rows in 2 flushes of 60 rows" in table and "postgresql" in table


def test_the_long_log_mode_reports_its_figures(tmp_path: Path, postgres_url: str) -> None:
    out = tmp_path / "long.json"
    argv = ["--long-log", "2", "--posts-per-batch", "10", "--postgres-url", postgres_url]
    assert main([*argv, "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert list(figures) == ["sqlite", "postgresql"]
    for r in figures.values():
        assert r["decisions"] == 2 * 10 * 6
        assert 0 < r["last_verdict_request_size"] == r["verdicts"] <= r["decisions"]
        assert r["estimate_s"] > 0 and r["last_verdict_request_s"] > 0
