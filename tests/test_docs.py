"""The docs document every setting and every ScaledObject metadata key the code accepts, and hold together.

Each component's settings and keys are in its own page under ``docs/``; the README stays an entry
page under 250 lines whose links, like every page's, lead somewhere.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

from scaler.metadata import KEYS

ROOT = Path(__file__).parent.parent
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def doc(name: str) -> str:
    return (DOCS / name).read_text()


@pytest.mark.parametrize(
    ("module", "page"),
    [("scaler.config", "scaler.md"), ("sidecar.config", "sidecar.md"), ("gateway.config", "gateway.md")],
)
def test_every_option_is_documented(module: str, page: str) -> None:
    try:
        options = importlib.import_module(module).OPTIONS
    except (ImportError, AttributeError):
        pytest.skip(f"{module} has no OPTIONS")
    text = doc(page)
    missing = [
        f"{o.flag} / {o.env}" for o in options.values() if f"`{o.flag}`" not in text or o.env not in text
    ]
    assert not missing, f"docs/{page} lacks: {missing}"


def test_every_metadata_key_is_documented() -> None:
    text = doc("scaler.md")
    assert [key for key in KEYS if f"`{key}`" not in text] == []


def test_every_policy_key_is_in_the_policies_example() -> None:
    from sidecar.policy import schema

    keys = set().union(
        *(getattr(schema, name) for name in dir(schema) if name.startswith("_") and name.endswith("_KEYS"))
    )
    text = doc("policies.md")
    assert sorted(key for key in keys if f"{key}:" not in text) == []


def test_the_metadata_table_shows_each_keys_default() -> None:
    """Each key's row in the metadata table of docs/scaler.md shows the default the code uses."""
    rows = [line for line in doc("scaler.md").splitlines() if line.startswith("| `")]
    wrong = []
    for key, (_help, default) in KEYS.items():
        row = next((r for r in rows if r.startswith(f"| `{key}`") or f", `{key}` |" in r), None)
        if row is None or (f"`{default}`" not in row and f"| {default} |" not in row):
            wrong.append(f"{key}: {default}")
    assert wrong == []


def test_the_readme_is_an_entry_page() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) < 250, f"README.md has {len(lines)} lines: move detail into docs/"


def _anchors(text: str) -> set[str]:
    """GitHub's anchors for the headings outside code blocks."""
    anchors, in_code = set(), False
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        heading = None if in_code else re.match(r"#+ (.*)", line)
        if heading:
            anchors.add(re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-"))
    return anchors


def test_every_relative_link_leads_somewhere() -> None:
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            path, _, anchor = target.partition("#")
            if re.match(r"[a-z]+:", path):
                continue
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest.read_text()):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert broken == []


def test_the_examples_use_one_trigger_type() -> None:
    """Every ScaledObject trigger shown in the docs is the `external-push` form the manifests use."""
    other = [
        f"{page.relative_to(ROOT)}: {line.strip()}"
        for page in PAGES
        for line in page.read_text().splitlines()
        if re.match(r"\s*- type: external", line) and line.split("#")[0].split()[-1] != "external-push"
    ]
    assert other == []
