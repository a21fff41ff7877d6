"""The README documents every setting and every ScaledObject metadata key the code accepts."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from scaler.metadata import KEYS

README = (Path(__file__).parent.parent / "README.md").read_text()


@pytest.mark.parametrize("module", ["scaler.config", "sidecar.config", "gateway.config"])
def test_every_option_is_documented(module: str) -> None:
    try:
        options = importlib.import_module(module).OPTIONS
    except (ImportError, AttributeError):
        pytest.skip(f"{module} has no OPTIONS")
    missing = [
        f"{o.flag} / {o.env}" for o in options.values() if f"`{o.flag}`" not in README or o.env not in README
    ]
    assert not missing, f"README lacks: {missing}"


def test_every_metadata_key_is_documented() -> None:
    assert [key for key in KEYS if f"`{key}`" not in README] == []


def test_every_policy_key_is_in_the_readme_example() -> None:
    from sidecar.policy import schema

    keys = set().union(
        *(getattr(schema, name) for name in dir(schema) if name.startswith("_") and name.endswith("_KEYS"))
    )
    section = README[README.index("## Policies") :]
    assert sorted(key for key in keys if f"{key}:" not in section) == []


def test_the_metadata_table_shows_each_keys_default() -> None:
    """Each key's row in the README's metadata table shows the default the code uses."""
    rows = [line for line in README.splitlines() if line.startswith("| `")]
    wrong = []
    for key, (_help, default) in KEYS.items():
        row = next((r for r in rows if r.startswith(f"| `{key}`") or f", `{key}` |" in r), None)
        if row is None or (f"`{default}`" not in row and f"| {default} |" not in row):
            wrong.append(f"{key}: {default}")
    assert wrong == []
