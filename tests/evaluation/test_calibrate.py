"""`radar calibrate`: the written YAML loads for the model, reaches its recall targets on the
calibration data, handles too few positives (tau 0 under a guarantee, a refusal under
`quantile`), recalibrates some categories over a base file, plans, and hot-loads in the running
service. The statistics themselves: test_guarantees.py."""

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from app.cli import main
from app.data.records import fingerprint
from app.evaluation.calibrate import (
    CalibrationError,
    calibrate_category,
    calibrate_model,
    calibrate_scored,
    parse_overrides,
    required_positives,
)
from app.evaluation.evaluate import ScoredData, score_data
from app.evaluation.guarantees import METHODS, clopper_pearson_upper, crc_bound
from app.service.app import create_app
from app.service.settings import Settings
from app.thresholds import load_thresholds
from tests.evaluation.test_evaluate import CATEGORIES, write_posts

MODEL_VERSION = "tiny-qwen3vl-1"


def balanced(i: int) -> dict[str, int]:
    """Every post annotated for one category; half of each category's posts positive."""
    return {CATEGORIES[i % 3]: (i // 3) % 2}


def few_fe_positives(i: int) -> dict[str, int]:
    labels = balanced(i)
    if "fe" in labels and i > 30:
        labels["fe"] = 0  # fe keeps only its early positives
    return labels


@pytest.fixture(scope="module")
def val(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 72 posts: 24 annotated per category, 12 positives each.
    return write_posts(tmp_path_factory.mktemp("cal") / "val.jsonl", 72, balanced)


@pytest.fixture(scope="module")
def scored(tiny_store: Path, val: Path) -> ScoredData:
    return score_data(tiny_store, val)


def realised_recall(scored: ScoredData, k: int, tau: float) -> float:
    y, s = scored.labels[:, k], scored.scores[:, k]
    return float(np.mean(s[y == 1] > tau))


def test_required_positives() -> None:
    # P positives move recall in steps of 1/P: R is told from 100 % only when P ≥ 1/(1 - R).
    assert required_positives(0.9, 1) == 10
    assert required_positives(0.95, 1) == 20
    assert required_positives(0.5, 1) == 2
    assert required_positives(1.0, 5) == 5
    assert required_positives(0.9, 20) == 20


def test_dispatch_everything_is_written_as_zero() -> None:
    y = np.array([1, 0, 1, -1])
    s = np.array([0.2, 0.4, 0.1, 0.0])  # the lowest annotated score is a positive
    cal = calibrate_category("fe", y, s, 1.0)
    assert cal.tau == 0.0 and cal.achieved_recall == 1.0 and cal.expected_auto_pass_rate == 0.0
    # A negative sitting at exactly 0.0 is auto-passed by tau = 0 (recall is unaffected).
    cal = calibrate_category("fe", np.array([1, 0]), np.array([0.3, 0.0]), 1.0)
    assert cal.tau == 0.0 and cal.expected_auto_pass_rate == 0.5
    # A positive whose float32 sigmoid underflowed to 0.0 cannot be dispatched by any tau.
    with pytest.raises(CalibrationError, match=r"scored exactly 0\.0"):
        calibrate_category("fe", np.array([1, 1]), np.array([0.3, 0.0]), 1.0)


def test_ties_are_never_split() -> None:
    # Two positives tie with a negative: recall 0.9 needs the tie group dispatched whole.
    y = np.array([1, 1, 0, 1, 0, 0])
    s = np.array([0.9, 0.5, 0.5, 0.5, 0.2, 0.1])
    cal = calibrate_category("lqc", y, s, 0.9, guarantee="quantile")
    assert cal.tau == 0.2 and cal.achieved_recall == 1.0
    assert cal.expected_auto_pass_rate == pytest.approx(2 / 6)


def test_written_file_loads_and_reaches_every_target(scored: ScoredData, tmp_path) -> None:
    out = tmp_path / "thresholds" / "cal.yaml"
    result = calibrate_scored(
        scored, out, recall=0.9, per_category={"fe": 0.95}, min_positives=5,
        allow_few_positives=True, command="radar calibrate (test)", guarantee="quantile",
    )  # fmt: skip
    active = load_thresholds(out, CATEGORIES, MODEL_VERSION)
    assert active.version == result.version and result.version.startswith(MODEL_VERSION + "@")
    document = yaml.safe_load(out.read_text())
    targets = {"lqc": 0.9, "rcs": 0.9, "fe": 0.95}
    for k, name in enumerate(CATEGORIES):
        entry, tau = document["categories"][name], active.taus[name]
        assert 0.0 <= tau <= 1.0
        assert realised_recall(scored, k, tau) >= targets[name]
        assert entry["recall_target"] == targets[name]
        assert entry["achieved_recall"] == realised_recall(scored, k, tau)
        annotated = scored.scores[scored.labels[:, k] != -1, k]
        assert entry["expected_auto_pass_rate"] == pytest.approx(np.mean(annotated <= tau))
        assert (entry["n_positive"], entry["n_annotated"]) == (12, 24)
    provenance = document["calibration"]
    assert provenance["data_fingerprint"] == fingerprint([scored.data])
    assert provenance["command"] == "radar calibrate (test)"
    assert provenance["recall_targets"] == targets
    assert provenance["taus"] == active.taus  # what the rates were measured with
    assert datetime.fromisoformat(provenance["date"]).tzinfo is not None
    assert not list(out.parent.glob(".*.tmp"))  # the temporary file was renamed away
    assert out.stat().st_mode & 0o777 == 0o644


def test_too_few_positives_are_refused_unless_allowed(tiny_store: Path, tmp_path: Path) -> None:
    data = write_posts(tmp_path / "few.jsonl", 72, few_fe_positives)
    out = tmp_path / "few.yaml"
    with pytest.raises(CalibrationError, match=r"fe: \d positives of 24 annotated") as info:
        calibrate_model(tiny_store, data, out, recall=0.9, min_positives=8, guarantee="quantile")
    assert "lqc" not in str(info.value) and "--allow-few-positives" in str(info.value)
    assert not out.exists()
    scored = score_data(tiny_store, data)
    result = calibrate_scored(
        scored, out, recall=0.9, min_positives=8, allow_few_positives=True, guarantee="quantile"
    )
    notes = yaml.safe_load(out.read_text())["calibration"]["notes"]
    assert list(notes) == ["fe"] and "allowed with few positives" in notes["fe"]
    assert [c.note is None for c in result.categories] == [True, True, False]


def test_a_target_finer_than_the_positives_is_refused(scored: ScoredData, tmp_path) -> None:
    # 12 positives: recall 0.95 is indistinguishable from 1.0 even with --min-positives 1.
    with pytest.raises(CalibrationError, match=r"recall 0\.95 needs at least 20"):
        calibrate_scored(
            scored, tmp_path / "t.yaml", recall=0.95, min_positives=1, guarantee="quantile"
        )


def test_no_positive_at_all_dispatches_everything_when_allowed(tiny_store, tmp_path) -> None:
    data = write_posts(tmp_path / "d.jsonl", 30, lambda i: {"lqc": i % 2, "fe": 0})
    scored = score_data(tiny_store, data)
    result = calibrate_scored(
        scored,
        tmp_path / "t.yaml",
        recall=0.9,
        min_positives=1,
        allow_few_positives=True,
        guarantee="quantile",
    )
    by_name = {c.category: c for c in result.categories}
    assert by_name["fe"].tau == 0.0 and math.isnan(by_name["fe"].achieved_recall)
    assert by_name["rcs"].n_annotated == 0 and by_name["rcs"].tau == 0.0
    entry = yaml.safe_load((tmp_path / "t.yaml").read_text())["categories"]["fe"]
    assert entry["achieved_recall"] is None and entry["tau"] == 0.0


def test_overrides_parse_and_unknown_categories_fail_fast(tiny_store, tmp_path) -> None:
    assert parse_overrides(["fe=0.95", "rcs = 0.8"]) == {"fe": 0.95, "rcs": 0.8}
    for bad in ("fe", "fe=", "=0.9", "fe=high"):
        with pytest.raises(CalibrationError, match="CATEGORY=RECALL"):
            parse_overrides([bad])
    missing = tmp_path / "does-not-exist.jsonl"  # never read: the check comes first
    with pytest.raises(CalibrationError, match="unknown categories"):
        calibrate_model(tiny_store, missing, tmp_path / "t.yaml", recall=0.9, per_category={"x": 1})
    with pytest.raises(CalibrationError, match="must be in"):
        calibrate_model(tiny_store, missing, tmp_path / "t.yaml", recall=1.5)


def test_cli_calibrate_with_a_per_category_override(
    tiny_store: Path, val: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cli.yaml"
    argv = ["calibrate", "--model", str(tiny_store), "--data", str(val), "--out", str(out)]
    flags = ["--recall", "0.8", "--recall-per-category", "fe=0.9", "--min-positives", "10"]
    flags += ["--guarantee", "quantile"]
    assert main([*argv, *flags, "--version", "cal-7", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "expected overall auto-pass rate" in printed and "'cal-7' written" in printed
    document = yaml.safe_load(out.read_text())
    assert document["version"] == "cal-7" and document["model_version"] == MODEL_VERSION
    assert {k: v["recall_target"] for k, v in document["categories"].items()} == {
        "lqc": 0.8, "rcs": 0.8, "fe": 0.9,
    }  # fmt: skip
    assert "--recall-per-category fe=0.9" in document["calibration"]["command"]
    assert main([*argv, "--recall", "0.95", "--guarantee", "quantile", "--no-progress"]) == 2
    assert "too few positives" in capsys.readouterr().err


def synthetic_scored(seed: int = 0) -> ScoredData:
    """400 posts scored without a model: lqc with 120 positives, rcs 40, fe 20 (too few for
    `confidence` at R = 0.9, enough for `expected`)."""
    rng = np.random.default_rng(seed)
    n = 400
    labels = np.full((n, 3), -1)
    labels[:, 0] = (np.arange(n) < 120).astype(int)  # lqc: every post annotated
    labels[:100, 1] = (np.arange(100) < 40).astype(int)  # rcs: 100 annotated
    labels[100:180, 2] = (np.arange(80) < 20).astype(int)  # fe: 80 annotated
    scores = np.where(labels == 1, rng.beta(4, 1.5, (n, 3)), rng.beta(1.5, 4, (n, 3)))
    return ScoredData(
        model_dir=Path("model"),
        model_version=MODEL_VERSION,
        categories=CATEGORIES,
        data=Path("synthetic.jsonl"),
        data_fingerprint="synthetic",
        post_ids=tuple(f"p{i}" for i in range(n)),
        labels=labels,
        scores=scores,
        ignored_categories=(),
    )


def test_too_few_positives_for_the_guarantee_dispatch_everything(scored, tmp_path) -> None:
    # 12 positives per category: confidence at R = 0.9, δ = 0.05 needs 29. No refusal.
    out = tmp_path / "t.yaml"
    result = calibrate_scored(scored, out, recall=0.9)
    document = yaml.safe_load(out.read_text())
    assert document["calibration"]["guarantee"] == "confidence"
    assert document["calibration"]["delta"] == 0.05
    assert "min_positives" not in document["calibration"]  # quantile's knob, unused
    for c in result.categories:
        assert c.tau == 0.0 and c.achieved_recall == 1.0
        entry = document["categories"][c.category]
        assert entry == entry | {
            "tau": 0.0, "guarantee": "confidence", "delta": 0.05, "n_positive": 12,
            "positives_needed": 29, "miss_rate_bound": None,
        }  # fmt: skip
        note = document["calibration"]["notes"][c.category]
        assert "needs at least 29 positives, the data has 12" in note
        assert "tau 0.0 dispatches everything" in note
    load_thresholds(out, CATEGORIES, MODEL_VERSION)
    # expected needs 9: these 12 positives do.
    result = calibrate_scored(scored, out, recall=0.9, guarantee="expected")
    for k, c in enumerate(result.categories):
        assert c.note is None and c.positives_needed == 9
        misses = int(np.sum(scored.scores[scored.labels[:, k] == 1, k] <= c.tau))
        assert c.miss_rate_bound == crc_bound(misses, 12) <= 0.1


def test_each_guarantee_records_its_bound(tmp_path: Path) -> None:
    scored = synthetic_scored()
    taus = {}
    for guarantee in ("confidence", "expected", "quantile"):
        out = tmp_path / f"{guarantee}.yaml"
        calibrate_scored(scored, out, recall=0.9, guarantee=guarantee, min_positives=10)
        load_thresholds(out, CATEGORIES, MODEL_VERSION)
        document = yaml.safe_load(out.read_text())
        assert document["calibration"]["method"] == METHODS[guarantee]
        taus[guarantee] = {}
        for k, name in enumerate(CATEGORIES):
            entry = document["categories"][name]
            pos = scored.scores[scored.labels[:, k] == 1, k]
            n, misses = pos.size, int(np.sum(pos <= entry["tau"]))
            assert entry["guarantee"] == guarantee and entry["n_positive"] == n
            assert entry["achieved_recall"] == pytest.approx(1 - misses / n)
            taus[guarantee][name] = entry["tau"]
            if guarantee == "confidence" and name == "fe":  # 20 < 29 positives
                assert entry["tau"] == 0.0 and entry["miss_rate_bound"] is None
            elif guarantee == "confidence":
                assert entry["delta"] == 0.05 and entry["tau"] > 0.0
                assert entry["miss_rate_bound"] == clopper_pearson_upper(misses, n, 0.05)
                assert entry["miss_rate_bound"] <= 0.1
            elif guarantee == "expected":
                assert "delta" not in entry
                assert entry["miss_rate_bound"] == crc_bound(misses, n) <= 0.1
            else:
                assert entry["miss_rate_bound"] is None and misses / n <= 0.1
    for name in CATEGORIES:  # the stronger the promise, the lower (safer) the threshold
        assert taus["confidence"][name] <= taus["expected"][name] <= taus["quantile"][name]
    assert taus["confidence"]["lqc"] < taus["quantile"]["lqc"]


def test_only_recalibrates_some_categories_over_a_base_file(
    tiny_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = tmp_path / "base.yaml"
    base.write_text(
        yaml.safe_dump(
            {
                "version": "hand-1",
                "model_version": MODEL_VERSION,
                "categories": {
                    "lqc": {"tau": 0.31, "recall_target": 0.9},
                    "rcs": {"tau": 0.42},
                    "fe": {"tau": 0.5},
                },
                "calibration": {"notes": {"rcs": "set by hand"}},
            }
        )
    )
    data = write_posts(tmp_path / "fe.jsonl", 72, lambda i: {"fe": i % 2})  # fe only: 36 of 72
    out = tmp_path / "new.yaml"
    argv = ["calibrate", "--model", str(tiny_store), "--data", str(data), "--recall", "0.9"]
    flags = ["--only", "fe", "--base", str(base), "--out", str(out), "--no-progress"]
    assert main([*argv, *flags]) == 0
    printed = capsys.readouterr().out
    assert f"kept from {base}: lqc, rcs" in printed
    document = yaml.safe_load(out.read_text())
    assert document["categories"]["lqc"] == {"tau": 0.31, "recall_target": 0.9}
    assert document["categories"]["rcs"] == {"tau": 0.42}
    fe = document["categories"]["fe"]
    assert fe["guarantee"] == "confidence" and fe["n_positive"] == 36 and fe["n_annotated"] == 72
    assert fe["positives_needed"] == 29 and fe["miss_rate_bound"] <= 0.1
    provenance = document["calibration"]
    assert provenance["recalibrated"] == ["fe"] and provenance["recall_targets"] == {"fe": 0.9}
    assert provenance["kept_from"] == {
        "path": str(base), "version": "hand-1", "categories": ["lqc", "rcs"],
    }  # fmt: skip
    assert provenance["notes"] == {"rcs": "kept from hand-1: set by hand"}
    active = load_thresholds(out, CATEGORIES, MODEL_VERSION)
    assert active.taus == {"lqc": 0.31, "rcs": 0.42, "fe": fe["tau"]}
    # Without --only the same data calibrates every category: the unlabelled ones
    # dispatch everything (with a note), none is refused.
    assert main([*argv, "--out", str(out), "--no-progress"]) == 0
    document = yaml.safe_load(out.read_text())
    assert document["categories"]["lqc"]["tau"] == document["categories"]["rcs"]["tau"] == 0.0
    assert document["categories"]["fe"]["tau"] == fe["tau"]
    assert set(document["calibration"]["notes"]) == {"lqc", "rcs"}
    assert "the data has 0" in document["calibration"]["notes"]["lqc"]


def test_only_and_base_are_checked_before_scoring(
    tiny_store: Path, val: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    def no_scoring(*args: object, **kwargs: object) -> None:
        raise AssertionError("scored")

    monkeypatch.setattr("app.evaluation.calibrate.score_data", no_scoring)
    taus = {name: {"tau": 0.5} for name in CATEGORIES}
    good, other = tmp_path / "good.yaml", tmp_path / "other.yaml"
    good.write_text(
        yaml.safe_dump({"version": "x", "model_version": MODEL_VERSION, "categories": taus})
    )
    other.write_text(
        yaml.safe_dump({"version": "x", "model_version": "another", "categories": taus})
    )
    missing = str(tmp_path / "missing.yaml")
    out = tmp_path / "t.yaml"
    argv = ["calibrate", "--model", str(tiny_store), "--data", str(val), "--recall", "0.9"]
    argv += ["--out", str(out), "--no-progress"]
    cases = {
        ("--only", "fe"): "--only needs --base",
        ("--base", str(other)): "--base is only read with --only",
        ("--only", "spam", "--base", str(other)): "unknown categories ['spam']",
        ("--only", "fe", "--base", str(other)): "--base refused (model_version)",
        ("--only", "fe", "--base", missing): "--base refused (unreadable)",
        ("--only", "fe", "--base", str(good), "--recall-per-category", "lqc=0.8"): (
            "not recalibrated"
        ),
        ("--min-positives", "10"): "apply to --guarantee quantile only",
        ("--allow-few-positives", "--guarantee", "expected"): "quantile only",
        ("--delta", "0.1", "--guarantee", "expected"): "--delta applies to --guarantee conf",
        ("--delta", "0.6"): "--delta must be in (0, 0.5)",
    }
    for flags, message in cases.items():
        assert main([*argv, *flags]) == 2, flags
        assert message in capsys.readouterr().err, flags
    assert main(["calibrate", "--model", str(tiny_store), "--recall", "0.9"]) == 2
    assert "--data and --out required (unless --plan)" in capsys.readouterr().err
    assert not out.exists()


def test_plan_counts_positives_without_scoring(
    tiny_store: Path, val: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    def no_scoring(*args: object, **kwargs: object) -> None:
        raise AssertionError("scored")

    monkeypatch.setattr("app.evaluation.calibrate.score_data", no_scoring)
    argv = ["calibrate", "--model", str(tiny_store), "--recall", "0.9", "--plan"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "probability >= 0.95" in printed and "no --data given" in printed
    rows = {line.split()[0]: line.split() for line in printed.splitlines()[3:6]}
    assert set(rows) == set(CATEGORIES)
    assert all(row[1:5] == ["0.90", "29", "n/a", "n/a"] for row in rows.values())
    assert main([*argv, "--data", str(val), "--recall-per-category", "fe=0.8"]) == 0
    printed = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in printed.splitlines()[3:6]}
    assert rows["lqc"][1:5] == ["0.90", "29", "12", "24"] and "no: tau 0" in printed
    assert rows["fe"][1:6] == ["0.80", "14", "12", "24", "no:"]
    assert main([*argv, "--data", str(val), "--guarantee", "expected", "--only", "rcs"]) == 0
    printed = capsys.readouterr().out
    assert "expected recall" in printed
    assert printed.splitlines()[3].split() == [
        "rcs", "0.90", "9", "12", "24", "yes",
    ]  # fmt: skip
    assert main([*argv, "--recall", "1.0"]) == 0
    assert "never" in capsys.readouterr().out


@asynccontextmanager
async def running_service(store: Path, thresholds: Path) -> AsyncIterator[httpx.AsyncClient]:
    """The real app (model load, warm-up, thresholds poller) on `store`, over ASGI."""
    settings = Settings(
        model_dir=store,
        thresholds_path=thresholds,
        device="cpu",
        admin_token="s3cret",
        thresholds_poll_s=3600,  # only the admin reload below may pick the new file up
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://radar") as client:
            yield client


async def test_calibrated_file_hot_loads_in_the_service(
    tiny_store: Path, scored: ScoredData, tmp_path: Path
) -> None:
    path = tmp_path / "active.yaml"
    initial = {"version": "hand-1", "model_version": MODEL_VERSION}
    initial["categories"] = {name: {"tau": 0.5} for name in CATEGORIES}
    path.write_text(yaml.safe_dump(initial))
    post = {"post_id": "p1", "title": "cheap pills free money", "ocr_text": "dm me", "images": []}
    async with running_service(tiny_store, path) as client:
        before = (await client.post("/route", json=post)).json()
        result = calibrate_scored(
            scored, path, recall=0.9, version="cal-1", min_positives=10
        )  # written over the active file, as ops deploy it
        reload = await client.post(
            "/admin/thresholds/reload", headers={"Authorization": "Bearer s3cret"}
        )
        after = (await client.post("/route", json=post)).json()
    assert before["thresholds_version"] == "hand-1"
    assert reload.status_code == 200, reload.text
    assert reload.json()["status"] == "changed"
    assert after["thresholds_version"] == "cal-1"
    taus = {c.category: c.tau for c in result.categories}
    assert after["dispatch"] == [k for k in CATEGORIES if after["scores"][k] > taus[k]]
