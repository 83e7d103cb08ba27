"""A thresholds ConfigMap update, as the kubelet performs it, reaches the service's poll.

The kubelet's atomic writer keeps each version in a timestamped directory, points `..data` at
it, and exposes `default.yaml -> ..data/default.yaml`. An update writes a new directory, then
renames a fresh `..data_tmp` symlink over `..data` (one atomic rename) and deletes the old
directory. The service polls the path it was given; this plays that sequence on a tmp dir.
"""

import os
from pathlib import Path

import yaml

from app.thresholds import ThresholdsStore

CATEGORIES = ("lqc", "rcs", "fe")
MODEL = "tiny-qwen3vl-1"


def document(version: str, tau: float | str) -> str:
    categories = {name: {"tau": tau} for name in CATEGORIES}
    return yaml.safe_dump({"version": version, "model_version": MODEL, "categories": categories})


class KubeletVolume:
    """A ConfigMap volume with the kubelet's layout and update sequence."""

    def __init__(self, root: Path, key: str) -> None:
        self.root, self.key, self.generation = root, key, 0
        self.path = root / key
        self.mtime_ns = 1_700_000_000 * 10**9

    def publish(self, text: str) -> None:
        self.generation += 1
        payload = self.root / f"..2026_01_01_00_00_0{self.generation}.000000001"
        payload.mkdir()
        (payload / self.key).write_text(text)
        # The kubelet writes each version seconds apart at the least; pin that ordering
        # instead of depending on the file system's timestamp granularity.
        self.mtime_ns += 10**9
        os.utime(payload / self.key, ns=(self.mtime_ns, self.mtime_ns))
        data, tmp = self.root / "..data", self.root / "..data_tmp"
        old = data.resolve() if data.is_symlink() else None
        tmp.symlink_to(payload.name)
        tmp.replace(data)  # rename(2): readers see the old or the new version, never neither
        if not self.path.is_symlink():
            self.path.symlink_to(f"..data/{self.key}")
        if old is not None:
            (old / self.key).unlink()
            old.rmdir()


def test_configmap_update_is_reloaded_and_a_bad_one_refused(tmp_path: Path) -> None:
    volume = KubeletVolume(tmp_path, "default.yaml")
    volume.publish(document("v1", 0.5))
    store = ThresholdsStore(volume.path, CATEGORIES, MODEL)
    assert store.reload().status == "changed"
    assert store.reload_if_modified() is None  # nothing new: no reload

    volume.publish(document("v2", 0.7))
    assert store.reload_if_modified() is None  # seen; applied at the next poll
    result = store.reload_if_modified()
    assert result is not None
    assert (result.status, store.active.version if store.active else None) == ("changed", "v2")

    volume.publish(document("v3", "high"))  # invalid: refused, v2 stays
    assert store.reload_if_modified() is None
    refused = store.reload_if_modified()
    assert refused is not None
    assert (refused.status, refused.reason) == ("refused", "schema")
    assert store.active is not None
    assert store.active.version == "v2"
