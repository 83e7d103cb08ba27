"""The README names every series `/metrics` exports and every `RADAR_*` setting (issue 14,
item 7): an operator reads the README, not `app/service/metrics.py`."""

import re
from pathlib import Path

from app.service.settings import Settings
from tests.service.conftest import write_thresholds

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_every_setting_is_in_the_readme() -> None:
    missing = [
        f"RADAR_{n.upper()}" for n in Settings.model_fields if f"RADAR_{n.upper()}" not in README
    ]
    assert not missing, f"settings the README does not name: {missing}"


async def test_every_exported_series_is_in_the_readme(running, tmp_path, tiny_store) -> None:
    shadow = tmp_path / "shadow.yaml"
    write_thresholds(shadow, tiny_store, "shadow-1", 0.4)
    # Everything on: decision log (default in the tests), shadow, quality gauges.
    async with running(shadow_thresholds_path=shadow) as (client, _):
        text = (await client.get("/metrics")).text
    families = re.findall(r"^# TYPE (\S+) (\S+)$", text, flags=re.M)
    assert len(families) > 20
    missing = [
        name
        for name, kind in families
        if name.startswith("radar_")
        and f"`{name}" not in README
        and not (kind == "counter" and f"`{name}_total`" in README)
    ]
    assert not missing, f"series the README does not name: {missing}"
