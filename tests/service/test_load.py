"""The load test's CI-sized run (`benchmarks/load_test.py --profile ci`, ~1 min): a real
uvicorn process on loopback, saturation, 80 % held, 2x and 5x overload, recovery, a
cancellation storm and 100 thresholds reloads under load.

Shared CI machines are noisy: the strict figures (goodput >= 95 % of saturation, zero
errors at 80 %) are printed and recorded by the benchmark run (docs/reliability.md); here
the assertions are the properties that must hold however busy the machine is, with
generous bounds on the rest.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "load_test.py"


def test_load_test_ci_profile(tiny_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    args = ["--profile", "ci", "--model-dir", str(tiny_store), "--json", str(out)]
    args += ["--workdir", str(tmp_path / "work")]
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= 2:  # the load generator on one CPU, the server on the others
        args += ["--client-cpus", str(cpus[0]), "--server-cpus", ",".join(map(str, cpus[1:]))]
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=240
    )
    print(result.stdout[-6000:])  # the tables, for the CI log
    assert out.exists(), result.stderr[-3000:]
    report = json.loads(out.read_text())
    phases, checks, sat = report["phases"], report["checks"], report["saturation_rps"]
    assert sat > 0
    # Sustained 80 %: nothing but 200s and fast 503s, memory flat.
    hold = phases["hold"]
    # Admission may shed some of 80 % on a noisy VM: 686 of 768 answered (89 %) in runs of
    # the unchanged previous release on a quiet 2-core machine, which failed a 0.9 bound 3
    # times in 5 (2026-12-01). The property is "no error, most served"; the strict figure
    # is the benchmark's (docs/reliability.md).
    assert hold["other_err"] == 0 and hold["ok"] >= 0.75 * hold["requests"], hold
    assert report["hold_rss_growth_mb"] < 100
    for name in ("overload_2x", "overload_5x"):
        row = phases[name]
        assert row["other_err"] == 0, row  # 200 or 503, never a 5xx, a 504 or a reset
        assert row["shed_503"] > 0 and checks[f"overload {name[-2:]}: 503s carry Retry-After"]
        assert row["shed_p50_ms"] < 200, row  # refusals are quick
        assert row["goodput_rps"] >= 0.5 * sat, row  # no collapse (95 % in the benchmark)
    for name in ("recovery", "after_storm"):
        assert phases[name]["ok"] == phases[name]["requests"] > 0, phases[name]
    # Reloads at 50 %: no error of any kind; on a busy shared machine (the server now also
    # writes its decision log) a rare fast 503 from load shedding is not a reload failure
    # (seen: 130 of 132 answered, 2 refused, in a full CI run).
    reloads = phases["reloads"]
    assert reloads["other_err"] == 0 and reloads["ok"] >= 0.95 * reloads["requests"] > 0, reloads
    assert checks["storm: batch loop alive (ready)"]
    assert report["reloads"]["failed_reloads"] == 0
    assert report["reloads"]["inconsistent_answers"] == 0
    assert report["reloads"]["versions_seen_in_answers"] > 1
    assert report["exit_status"] in (0, -15)  # 0 once `radar serve` uses run_server
