"""The thresholds file: schema, validation against a model, reload semantics."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from app.thresholds import ThresholdsError, ThresholdsStore, load_thresholds, parse_thresholds

CATEGORIES = ("lqc", "rcs", "fe")


def write(path: Path, doc: object) -> None:
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))


def valid_doc(version: str = "v1", tau: float = 0.5, model: str = "m1") -> dict:
    return {
        "version": version,
        "model_version": model,
        "categories": {c: {"tau": tau} for c in CATEGORIES},
        "calibration": {"recall": 0.9, "data": "sha256:abc"},
    }


def test_valid_file_loads_in_category_order(tmp_path: Path) -> None:
    doc = valid_doc()
    doc["categories"] = {"fe": {"tau": 0.1}, "lqc": {"tau": 0.2}, "rcs": {"tau": 0.3}}
    write(tmp_path / "t.yaml", doc)
    active = load_thresholds(tmp_path / "t.yaml", CATEGORIES, "m1")
    assert list(active.taus) == list(CATEGORIES)
    assert active.taus == {"lqc": 0.2, "rcs": 0.3, "fe": 0.1}
    assert active.dispatch({"lqc": 0.25, "rcs": 0.3, "fe": 0.9}) == ["lqc", "fe"]


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda d: d["categories"].pop("fe"), "categories"),
        (lambda d: d["categories"].update(spam={"tau": 0.5}), "categories"),
        (lambda d: d.update(model_version="other"), "model_version"),
        (lambda d: d["categories"]["lqc"].update(tau=1.5), "schema"),
        (lambda d: d["categories"]["lqc"].update(tau=-0.1), "schema"),
        (lambda d: d["categories"]["lqc"].update(tua=0.5), "schema"),
        (lambda d: d.pop("version"), "schema"),
    ],
)
def test_invalid_files_are_refused_with_a_reason(tmp_path: Path, mutate, reason: str) -> None:
    doc = valid_doc()
    mutate(doc)
    write(tmp_path / "t.yaml", doc)
    with pytest.raises(ThresholdsError) as caught:
        load_thresholds(tmp_path / "t.yaml", CATEGORIES, "m1")
    assert caught.value.reason == reason
    assert "t.yaml" in str(caught.value)


def test_broken_yaml_and_non_mapping() -> None:
    with pytest.raises(ThresholdsError) as caught:
        parse_thresholds(b"version: [unclosed")
    assert caught.value.reason == "yaml"
    with pytest.raises(ThresholdsError) as caught:
        parse_thresholds(b"- a list")
    assert caught.value.reason == "schema"


def test_store_keeps_the_old_version_when_a_reload_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    write(path, valid_doc("v1"))
    store = ThresholdsStore(path, CATEGORIES, "m1")
    assert store.reload().status == "changed"
    write(path, "version: v2\ncategories: {lqc: {tau: 0.5}")  # half-written
    result = store.reload()
    assert (result.status, result.reason) == ("refused", "yaml")
    assert store.active is not None and store.active.version == "v1"
    write(path, valid_doc("v2", tau=0.7))
    assert store.reload().status == "changed"
    assert store.active.version == "v2" and store.active.taus["fe"] == 0.7
    assert store.reload().status == "unchanged"


def test_missing_file_is_refused_as_unreadable(tmp_path: Path) -> None:
    store = ThresholdsStore(tmp_path / "absent.yaml", CATEGORIES, "m1")
    result = store.reload()
    assert (result.status, result.reason, result.active) == ("refused", "unreadable", None)


def test_poll_reloads_only_after_a_change(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    write(path, valid_doc("v1"))
    store = ThresholdsStore(path, CATEGORIES, "m1")
    # A change is applied at the poll after the one that saw it, once the file held still.
    assert store.reload_if_modified() is None
    assert store.reload_if_modified() is not None
    assert store.reload_if_modified() is None
    write(path, valid_doc("v2-longer-name"))
    assert store.reload_if_modified() is None
    result = store.reload_if_modified()
    assert result is not None and result.active is not None
    assert result.active.version == "v2-longer-name"


def test_poll_sees_an_atomic_replace_with_the_same_mtime_and_size(tmp_path: Path) -> None:
    """Write a temp file, rename it over the path, same size and mtime: a new inode."""
    path = tmp_path / "t.yaml"
    write(path, valid_doc("v1", tau=0.1))
    store = ThresholdsStore(path, CATEGORIES, "m1")
    assert store.reload().status == "changed"
    before = path.stat()
    tmp = tmp_path / "t.yaml.tmp"
    write(tmp, valid_doc("v2", tau=0.2))
    assert tmp.stat().st_size == before.st_size
    os.utime(tmp, ns=(before.st_atime_ns, before.st_mtime_ns))
    tmp.replace(path)
    after = path.stat()
    assert (after.st_mtime_ns, after.st_size) == (before.st_mtime_ns, before.st_size)
    assert after.st_ino != before.st_ino
    assert store.reload_if_modified() is None  # seen; applied at the next poll
    result = store.reload_if_modified()
    assert result is not None and result.status == "changed"
    assert store.active is not None and store.active.version == "v2"
    assert store.reload_if_modified() is None


def test_unreadable_file_is_refused_as_permission_denied(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "t.yaml"
    write(path, valid_doc())
    real_open = Path.open

    def denying_open(self: Path, *args, **kwargs):
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", denying_open)
    result = ThresholdsStore(path, CATEGORIES, "m1").reload()
    assert (result.status, result.reason) == ("refused", "unreadable")
    assert result.message.startswith("permission denied")
    missing = ThresholdsStore(tmp_path / "absent.yaml", CATEGORIES, "m1").reload()
    assert missing.message == "no such file"


def test_mode_000_file_is_refused_as_permission_denied(
    tmp_path: Path, modes_enforced: tuple[str, ...]
) -> None:
    """The real thing, in a child that honours file modes (root does not)."""
    path = tmp_path / "t.yaml"
    write(path, valid_doc())
    path.chmod(0)
    code = (
        "import sys; from app.thresholds import ThresholdsStore; "
        "print(ThresholdsStore(sys.argv[1], ('lqc', 'rcs', 'fe'), 'm1').reload().message)"
    )
    result = subprocess.run(
        [*modes_enforced, sys.executable, "-c", code, str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().startswith("permission denied"), result.stdout


HEAD = "version: v1\nmodel_version: m1\ncalibration: {recall: 0.9}\ncategories:\n"


@pytest.mark.parametrize(
    ("body", "reason", "problem"),
    [
        # YAML 1.1 reads `on` as true: lax validation made it tau 1.0, never dispatched.
        ("  lqc: {tau: on}\n  rcs: {tau: 0.5}\n  fe: {tau: 0.5}\n", "schema", "valid number"),
        ("  lqc: {tau: yes}\n  rcs: {tau: 0.5}\n  fe: {tau: 0.5}\n", "schema", "valid number"),
        ('  lqc: {tau: "0.9"}\n  rcs: {tau: 0.5}\n  fe: {tau: 0.5}\n', "schema", "valid number"),
        # A repeated category: the second silently replaced the first.
        (
            "  lqc: {tau: 0.1}\n  rcs: {tau: 0.5}\n  fe: {tau: 0.5}\n  lqc: {tau: 0.9}\n",
            "yaml",
            "repeated",
        ),
        ("  lqc: {tau: 0.1, tau: 0.9}\n  rcs: {tau: 0.5}\n  fe: {tau: 0.5}\n", "yaml", "repeated"),
    ],
)
def test_ambiguous_values_and_repeated_keys_are_refused(
    tmp_path: Path, body: str, reason: str, problem: str
) -> None:
    path = tmp_path / "t.yaml"
    write(path, HEAD + body)
    with pytest.raises(ThresholdsError) as info:
        load_thresholds(path, CATEGORIES, "m1")
    assert info.value.reason == reason and problem in info.value.problem, info.value.problem


def test_repeated_top_level_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    write(path, "version: v1\n" + HEAD + "  lqc: {tau: 0.1}\n  rcs: {tau: 0.5}\n  fe: {tau: 0.5}\n")
    with pytest.raises(ThresholdsError, match="'version' repeated"):
        load_thresholds(path, CATEGORIES, "m1")


def test_integers_still_read_as_taus(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    write(path, HEAD + "  lqc: {tau: 0}\n  rcs: {tau: 1}\n  fe: {tau: 0.5}\n")
    assert load_thresholds(path, CATEGORIES, "m1").taus == {"lqc": 0.0, "rcs": 1.0, "fe": 0.5}


def test_a_huge_file_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    padding = "".join(f"  - {'x' * 100}\n" for _ in range(200_000))  # ~20 MB of valid YAML
    write(path, yaml.safe_dump(valid_doc()) + "padding:\n" + padding)
    assert path.stat().st_size > 20_000_000
    store = ThresholdsStore(path, CATEGORIES, "m1")
    result = store.reload()
    assert (result.status, result.reason) == ("refused", "too_large")
    assert "larger than 1048576 bytes" in result.message


def test_new_content_under_the_same_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    write(path, valid_doc("v1", tau=0.5))
    store = ThresholdsStore(path, CATEGORIES, "m1")
    assert store.reload().status == "changed"
    write(path, valid_doc("v1", tau=0.2))
    result = store.reload()
    assert (result.status, result.reason) == ("refused", "version_reused")
    assert store.active is not None and store.active.taus["fe"] == 0.5
    assert "give the new thresholds a new version" in result.message
    write(path, valid_doc("v2", tau=0.2))
    assert store.reload().status == "changed" and store.active.taus["fe"] == 0.2


def test_a_file_written_in_two_steps_goes_live_only_once_whole(tmp_path: Path) -> None:
    """An in-place edit seen between its two writes: both halves are valid YAML, and the
    first half's `fe` tau (0.8) must never be active."""
    path = tmp_path / "t.yaml"
    write(path, valid_doc("v1", tau=0.5))
    store = ThresholdsStore(path, CATEGORIES, "m1")
    assert store.reload().status == "changed"
    whole = HEAD.replace("v1", "v2") + "  lqc: {tau: 0.5}\n  rcs: {tau: 0.5}\n  fe: {tau: 0.8656}\n"
    first = whole[: whole.index("656}")] + "}\n"  # `fe: {tau: 0.8}`: valid, and wrong
    active_seen = []
    with path.open("w") as handle:
        handle.write(first)
        handle.flush()
        active_seen.append((store.reload_if_modified(), store.active.taus["fe"]))
        handle.seek(0)
        handle.write(whole)
        handle.flush()
        active_seen.append((store.reload_if_modified(), store.active.taus["fe"]))
    result = store.reload_if_modified()
    assert active_seen == [(None, 0.5), (None, 0.5)]
    assert result is not None and result.status == "changed"
    assert store.active.version == "v2" and store.active.taus["fe"] == 0.8656


def test_log_lines_name_the_file_role(tmp_path: Path, caplog) -> None:
    caplog.set_level("INFO", logger="app.thresholds")
    ThresholdsStore(tmp_path / "absent.yaml", CATEGORIES, "m1").reload()
    ThresholdsStore(tmp_path / "absent.yaml", CATEGORIES, "m1", role="shadow").reload()
    write(tmp_path / "s.yaml", valid_doc("s1"))
    ThresholdsStore(tmp_path / "s.yaml", CATEGORIES, "m1", role="shadow").reload()
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert lines[0][0] == "ERROR" and lines[0][1].startswith("active thresholds refused")
    # A missing shadow file is not an error of the service: the shadow only watches.
    assert lines[1][0] == "WARNING" and lines[1][1].startswith("shadow thresholds refused")
    assert lines[2] == ("INFO", "shadow thresholds version s1 loaded (model m1)")
