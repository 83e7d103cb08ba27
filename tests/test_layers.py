"""The import directions of DESIGN.md ("Layout"), checked on every module's source.

Every `import` counts, including those inside functions (the CLI and a few modules import
lazily to keep start-up fast): a lazy upward import is still an upward import.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What no bottom layer (model, thresholds, data) may import.
ABOVE_THE_BOTTOM = (
    "fastapi",
    "app.service",
    "app.training",
    "app.evaluation",
    "app.feedback",
    "app.cli",
    "app.cli_ops",
)
# package prefix → prefixes it must never import
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "app.model": (*ABOVE_THE_BOTTOM, "app.data"),  # data builds on model, not the reverse
    "app.thresholds": ABOVE_THE_BOTTOM,
    "app.thresholds_tools": ABOVE_THE_BOTTOM,
    "app.data": ABOVE_THE_BOTTOM,
    "app.evaluation": ("app.training", "app.service", "app.feedback", "app.cli", "fastapi"),
    "app.training": ("app.service", "app.feedback", "app.cli", "fastapi"),
    "app.feedback": ("app.service", "app.training", "app.evaluation", "app.cli"),
    "app.service": ("app.training", "app.evaluation", "app.cli"),
    "app": ("experiments", "benchmarks"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(source: str) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations(module: str, source: str) -> list[str]:
    found = []
    for layer, banned in FORBIDDEN.items():
        if not within(module, layer):
            continue
        for name in sorted(imported(source)):
            found += [f"{module} imports {name}" for b in banned if within(name, b)]
    return found


@pytest.mark.parametrize(
    "path", sorted((ROOT / "app").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT))
)
def test_no_module_imports_upward(path: Path) -> None:
    assert violations(module_name(path), path.read_text(encoding="utf-8")) == []


def test_the_check_sees_a_lazy_upward_import() -> None:
    # The rule must be able to fail: a function-level import of training from evaluation.
    source = "def f():\n    from app.training.trainer import train\n    return train\n"
    assert violations("app.evaluation.probe", source) == [
        "app.evaluation.probe imports app.training.trainer"
    ]
