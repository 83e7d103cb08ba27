"""`radar thresholds validate | diff | promote`, through the real CLI entry (`app.cli.main`)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from app.cli import main
from app.model.config import read_config
from app.thresholds import ThresholdsStore

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "thresholds" / "tiny.yaml"
PROXY = REPO / "thresholds" / "proxy.yaml"


def tiny_doc(version: str = "tiny-1", tau: float = 0.5) -> dict:
    """thresholds/tiny.yaml's document, with another version and lqc's tau if asked."""
    doc = yaml.safe_load(TINY.read_bytes())
    doc["version"] = version
    doc["categories"]["lqc"]["tau"] = tau
    return doc


def write(path: Path, doc: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    rc = main(["thresholds", *map(str, argv)])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.fixture
def active(tmp_path: Path) -> Path:
    """The service's active file, in its own directory: a copy of thresholds/tiny.yaml."""
    path = tmp_path / "live" / "active.yaml"
    path.parent.mkdir()
    path.write_bytes(TINY.read_bytes())
    return path


def snapshot(path: Path) -> tuple[bytes, int, list[str]]:
    """A file's bytes and inode, and what its directory holds (stray temp files show)."""
    return path.read_bytes(), path.stat().st_ino, sorted(os.listdir(path.parent))


def test_tiny_yaml_fits_the_tiny_store(tiny_store: Path, capsys) -> None:
    config = read_config(tiny_store)
    doc = yaml.safe_load(TINY.read_bytes())
    assert (tuple(doc["categories"]), doc["model_version"]) == (
        config.categories,
        config.model_version,
    )
    rc, out, _ = run(capsys, "validate", TINY, "--model", tiny_store)
    assert rc == 0
    assert out.startswith("OK tiny-1: 3 categories") and "fits model store" in out


def test_validate_without_model_checks_the_schema_only(tmp_path: Path, capsys) -> None:
    doc = tiny_doc()
    doc["model_version"] = "some-other-model"
    rc, out, _ = run(capsys, "validate", write(tmp_path / "t.yaml", doc))
    assert rc == 0 and out.startswith("OK tiny-1: 3 categories (schema only")


@pytest.mark.parametrize(
    ("mutate", "reason", "problem"),
    [
        (lambda d: d["categories"]["lqc"].update(tau=1.5), "schema", "categories.lqc.tau"),
        (lambda d: d["categories"].pop("fe"), "categories", "missing ['fe']"),
        (lambda d: d["categories"].update(spam={"tau": 0.1}), "categories", "unknown ['spam']"),
        (lambda d: d.update(model_version="tiny-qwen3vl-2"), "model_version", "tiny-qwen3vl-2"),
    ],
)
def test_validate_refuses_with_reason_and_problem(
    tiny_store: Path, tmp_path: Path, capsys, mutate, reason: str, problem: str
) -> None:
    doc = tiny_doc()
    mutate(doc)
    rc, out, err = run(capsys, "validate", write(tmp_path / "t.yaml", doc), "--model", tiny_store)
    assert rc == 1 and out == ""
    assert f"refused ({reason})" in err and problem in err and "t.yaml" in err


def test_validate_refuses_bad_yaml_and_a_missing_file(tmp_path: Path, capsys) -> None:
    (tmp_path / "bad.yaml").write_text("version: [unclosed\n")
    rc, _, err = run(capsys, "validate", tmp_path / "bad.yaml")
    assert rc == 1 and "refused (yaml)" in err
    rc, _, err = run(capsys, "validate", tmp_path / "absent.yaml")
    assert rc == 1 and "refused (unreadable)" in err and "no such file" in err


def test_validate_with_a_directory_that_is_no_model_store(tmp_path: Path, capsys) -> None:
    rc, _, err = run(capsys, "validate", TINY, "--model", tmp_path)
    assert rc == 2 and "router.json" in err


def test_diff_shows_changed_taus_and_one_sided_categories(tmp_path: Path, capsys) -> None:
    doc = tiny_doc("tiny-2", tau=0.3)
    doc["categories"].pop("fe")
    doc["categories"]["spam"] = {"tau": 0.7}
    b = write(tmp_path / "b.yaml", doc)
    rc, out, _ = run(capsys, "diff", TINY, b)
    assert rc == 0
    assert "version tiny-1" in out and "version tiny-2" in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert lines["lqc"].split()[1:4] == ["0.5000", "0.3000", "-0.2000"]
    assert lines["rcs"].split()[1:4] == ["0.5000", "0.5000", "="]
    assert lines["fe"].endswith("only in A") and lines["spam"].endswith("only in B")

    rc, out, _ = run(capsys, "diff", TINY, b, "--json")
    assert rc == 0
    d = json.loads(out)
    rows = {r["category"]: r for r in d["categories"]}
    assert rows["lqc"]["tau_a"] == 0.5 and rows["lqc"]["tau_b"] == 0.3
    assert rows["lqc"]["change"] == pytest.approx(-0.2)
    assert rows["fe"]["only_in"] == "A" and rows["spam"]["only_in"] == "B"
    assert (d["a"]["version"], d["b"]["version"]) == ("tiny-1", "tiny-2")


def test_diff_shows_calibrated_auto_pass_rates(tmp_path: Path, capsys) -> None:
    shipped = yaml.safe_load(PROXY.read_bytes())  # whatever is shipped: figures read from it
    hate = shipped["categories"]["hate"]
    doc = yaml.safe_load(PROXY.read_bytes())
    doc["version"] = "proxy-candidate"
    doc["categories"]["hate"].update(tau=0.2, expected_auto_pass_rate=0.55)
    rc, out, _ = run(capsys, "diff", PROXY, write(tmp_path / "p.yaml", doc))
    assert rc == 0
    line = next(line for line in out.splitlines() if line.startswith("hate"))
    assert line.split()[1:6] == [
        f"{hate['tau']:.4f}",
        "0.2000",
        f"{0.2 - hate['tau']:+.4f}",
        f"{hate['expected_auto_pass_rate']:.1%}",
        "55.0%",
    ]
    overall = shipped["calibration"]["expected_overall_auto_pass_rate"]
    assert f"expected overall auto-pass {overall:.1%}" in out


def test_diff_says_when_a_tau_was_edited_after_calibration(tmp_path: Path, capsys) -> None:
    calibrated = yaml.safe_load(PROXY.read_bytes())
    calibrated["version"] = "proxy-recorded"
    taus = {name: entry["tau"] for name, entry in calibrated["categories"].items()}
    calibrated["calibration"]["taus"] = taus  # as `radar calibrate` now records them
    a = write(tmp_path / "a.yaml", calibrated)
    edited = yaml.safe_load(a.read_bytes())
    edited["version"] = "proxy-hand-edit"
    edited["categories"]["smear"]["tau"] = 0.9  # by hand: the recorded rates are another file's
    rc, out, _ = run(capsys, "diff", a, write(tmp_path / "b.yaml", edited))
    assert rc == 0
    a_line, b_line = (next(x for x in out.splitlines() if x.startswith(f"{k}:")) for k in "AB")
    assert "STALE" not in a_line and "unchecked" not in a_line
    assert b_line.endswith("STALE: measured before the tau edits in smear")
    smear = next(line for line in out.splitlines() if line.startswith("smear"))
    assert smear.endswith("WARNING auto-pass B stale: tau edited after calibration")
    hate = next(line for line in out.splitlines() if line.startswith("hate"))
    assert "stale" not in hate

    rc, out, _ = run(capsys, "diff", a, tmp_path / "b.yaml", "--json")
    d = json.loads(out)
    assert d["a"]["edited_since_calibration"] == [] and d["b"]["edited_since_calibration"] == [
        "smear"
    ]
    rc, out, _ = run(capsys, "diff", PROXY, a)  # the shipped file predates the record
    assert "(unchecked: the file records no calibration.taus)" in out.splitlines()[0]


def test_diff_warns_about_a_category_at_tau_zero(tmp_path: Path, capsys) -> None:
    doc = tiny_doc("tiny-2", tau=0.3)
    doc["categories"]["lqc"] = {"tau": 0.0}
    rc, out, _ = run(capsys, "diff", TINY, write(tmp_path / "b.yaml", doc))
    assert rc == 0
    lqc = next(line for line in out.splitlines() if line.startswith("lqc"))
    assert lqc.endswith("WARNING tau 0 in B: every post dispatched, none released")
    rcs = next(line for line in out.splitlines() if line.startswith("rcs"))
    assert "WARNING" not in rcs


def test_diff_with_model_marks_the_file_that_does_not_fit(
    tiny_store: Path, tmp_path: Path, capsys
) -> None:
    doc = tiny_doc("tiny-2")
    doc["model_version"] = "elsewhere"
    rc, out, _ = run(capsys, "diff", TINY, write(tmp_path / "b.yaml", doc), "--model", tiny_store)
    assert rc == 0 and "refused (model_version)" in out
    assert "model_version differs" in out


def test_promote_replaces_the_active_file_atomically(active: Path, tmp_path: Path, capsys) -> None:
    candidate = write(tmp_path / "cand" / "tiny-2.yaml", tiny_doc("tiny-2", tau=0.3))
    before = snapshot(active)
    rc, out, err = run(capsys, "promote", candidate, "--to", active)
    assert rc == 0, err
    assert "tiny-1 -> tiny-2" in out
    data, inode, listing = snapshot(active)
    assert data == candidate.read_bytes()
    assert inode != before[1]  # renamed over, not rewritten in place
    assert listing == before[2]  # no temp file left


def test_promote_with_model_into_an_empty_place(tiny_store: Path, tmp_path: Path, capsys) -> None:
    target = tmp_path / "live" / "active.yaml"
    target.parent.mkdir()
    rc, out, _ = run(capsys, "promote", TINY, "--to", target, "--model", tiny_store)
    assert rc == 0 and "none -> tiny-1" in out
    assert target.read_bytes() == TINY.read_bytes()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["categories"]["lqc"].update(tau=2.0), "refused (schema)"),
        (lambda d: d["categories"].pop("fe"), "refused (categories)"),
        (lambda d: d.update(model_version="tiny-qwen3vl-2"), "differs from the active file"),
        (lambda d: d.update(version="tiny-1"), "already active with other content"),
    ],
)
def test_promote_refusals_leave_the_active_file_alone(
    active: Path, tmp_path: Path, capsys, mutate, message: str
) -> None:
    doc = tiny_doc("tiny-2", tau=0.3)
    mutate(doc)
    candidate = write(tmp_path / "cand" / "c.yaml", doc)
    before = snapshot(active)
    rc, out, err = run(capsys, "promote", candidate, "--to", active)
    assert rc == 1 and message in err, err
    assert "->" not in out
    assert snapshot(active) == before


def test_promote_checks_against_the_model_when_given(
    tiny_store: Path, active: Path, tmp_path: Path, capsys
) -> None:
    doc = tiny_doc("tiny-2")
    doc["categories"]["spam"] = {"tau": 0.1}
    candidate = write(tmp_path / "cand" / "c.yaml", doc)
    before = snapshot(active)
    rc, _, err = run(capsys, "promote", candidate, "--to", active, "--model", tiny_store)
    assert rc == 1 and "refused (categories)" in err and "model store" in err
    assert snapshot(active) == before


def test_promote_of_the_active_content_is_a_no_op(active: Path, capsys) -> None:
    before = snapshot(active)
    rc, out, _ = run(capsys, "promote", TINY, "--to", active)
    assert rc == 0 and "nothing to do" in out
    assert snapshot(active) == before


def test_dry_run_prints_the_diff_and_changes_nothing(active: Path, tmp_path: Path, capsys) -> None:
    candidate = write(tmp_path / "cand" / "c.yaml", tiny_doc("tiny-2", tau=0.3))
    before = snapshot(active)
    rc, out, _ = run(capsys, "promote", candidate, "--to", active, "--dry-run")
    assert rc == 0 and "would promote" in out and "tiny-1 -> tiny-2" in out
    assert "-0.2000" in out
    assert snapshot(active) == before


def test_promote_refuses_a_symlinked_target(active: Path, tmp_path: Path, capsys) -> None:
    link = active.parent / "link.yaml"
    link.symlink_to(active.name)
    candidate = write(tmp_path / "cand" / "c.yaml", tiny_doc("tiny-2"))
    rc, _, err = run(capsys, "promote", candidate, "--to", link)
    assert rc == 1 and "symlink" in err
    assert link.is_symlink() and active.read_bytes() == TINY.read_bytes()


def test_promote_refuses_a_directory_it_may_not_write(
    active: Path, tmp_path: Path, modes_enforced: tuple[str, ...]
) -> None:
    candidate = write(tmp_path / "cand" / "c.yaml", tiny_doc("tiny-2", tau=0.3))
    before = snapshot(active)
    active.parent.chmod(0o555)
    try:
        command = [*modes_enforced, sys.executable, "-m", "app.cli", "thresholds", "promote"]
        done = subprocess.run(
            [*command, str(candidate), "--to", str(active)],
            capture_output=True,
            text=True,
            cwd=REPO,
            check=False,
        )
    finally:
        active.parent.chmod(0o755)
    assert done.returncode == 1, done.stderr
    assert "not writable" in done.stderr
    assert snapshot(active) == before


def test_a_running_service_picks_up_the_promoted_file(
    tiny_store: Path, active: Path, tmp_path: Path, capsys
) -> None:
    config = read_config(tiny_store)
    store = ThresholdsStore(active, config.categories, config.model_version)
    assert store.reload().active.version == "tiny-1"
    assert store.reload_if_modified() is None
    # Same size as the active file: only the replaced inode tells the poller it changed.
    text = TINY.read_text().replace("version: tiny-1", "version: tiny-2")
    text = text.replace("lqc: {tau: 0.5}", "lqc: {tau: 0.3}")
    candidate = tmp_path / "c.yaml"
    candidate.write_text(text)
    assert candidate.stat().st_size == active.stat().st_size
    os.utime(candidate, ns=(active.stat().st_atime_ns, active.stat().st_mtime_ns))
    assert main(["thresholds", "promote", str(candidate), "--to", str(active)]) == 0
    assert store.reload_if_modified() is None  # seen; applied at the next poll
    result = store.reload_if_modified()
    assert result is not None and result.status == "changed"
    assert result.active.version == "tiny-2" and result.active.taus["lqc"] == 0.3
