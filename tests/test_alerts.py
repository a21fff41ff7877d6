"""The PrometheusRule of manifests/alerts under `promtool test rules` (tests/alerts/rules_test.yaml).

Skipped only when promtool is missing (`apt-get install prometheus`; .ci/run installs it).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
RULE = ROOT / "manifests" / "alerts" / "prometheusrule.yaml"
TESTS = ROOT / "tests" / "alerts" / "rules_test.yaml"


@pytest.fixture
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is not on PATH (apt-get install prometheus)")
    return found


def _rules_dir(tmp_path: Path) -> Path:
    spec = yaml.safe_load(RULE.read_text())["spec"]
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(spec))
    shutil.copy(TESTS, tmp_path / TESTS.name)
    return tmp_path


def test_rules_are_valid(promtool: str, tmp_path: Path) -> None:
    folder = _rules_dir(tmp_path)
    proc = subprocess.run(
        [promtool, "check", "rules", "rules.yaml"], cwd=folder, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_rules_fire_as_the_unit_tests_expect(promtool: str, tmp_path: Path) -> None:
    folder = _rules_dir(tmp_path)
    proc = subprocess.run(
        [promtool, "test", "rules", TESTS.name], cwd=folder, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_alert_has_a_unit_test() -> None:
    spec = yaml.safe_load(RULE.read_text())["spec"]
    alerts = {r["alert"] for g in spec["groups"] for r in g["rules"] if "alert" in r}
    tested = {
        t["alertname"] for case in yaml.safe_load(TESTS.read_text())["tests"] for t in case["alert_rule_test"]
    }
    assert alerts - tested == set()
