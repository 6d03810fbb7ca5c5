"""Alerts (README.md, Alerts): alerts.yaml's rules are policy, loaded and checked with the
other policy files; a malformed file is refused by `gateway check`, serve and reload."""

from __future__ import annotations

import asyncio
import shutil
from datetime import timedelta
from pathlib import Path

import pytest

from gateway.catalog import PolicyError
from gateway.policyset import load_policy_set, policy_version

from .conftest import POLICY_DIR, free_port, gateway_main, serve_env


def _own_policy(tmp_path: Path) -> Path:
    policy = tmp_path / "policy"
    shutil.copytree(POLICY_DIR, policy)
    return policy


def test_the_default_rules_load_and_count_in_the_policy_version(tmp_path):
    policy = _own_policy(tmp_path)
    rules = {rule.name: rule for rule in load_policy_set(policy).alert_rules}
    assert set(rules) == {"many_subjects", "many_subjects_partner",
                          "bulk_connection_statistics", "off_hours_access", "refusal_burst",
                          "repeated_break_glass"}
    assert rules["many_subjects"].baseline.factor == 5
    assert rules["refusal_burst"].window == timedelta(minutes=5)
    before = policy_version(policy)
    (policy / "alerts.yaml").write_text((policy / "alerts.yaml").read_text() + "\n# note\n")
    assert policy_version(policy) != before


BAD = [
    # (text replaced, by, what the error says)
    ("window: 5m", "window: 5 minutes", "rule refusal_burst: window must be a duration"),
    ("limit: 3\n", "limit: -3\n", "rule repeated_break_glass: limit must be"),
    ("data_set: connection_statistics", "data_set: connection_stats",
     "data_set 'connection_stats' is not in datasets.yaml"),
    ("measure: refusals", "measure: denials", "rule refusal_burst: measure must be one of"),
    ("roles: [provider_staff]\n", "roles: [staff]\n", "roles ['staff'] are not in roles.yaml"),
    ("{factor: 5, days: 30}", "{factor: 5, days: 365}", "baseline.days must be"),
    ('start: "07:00"', 'start: "21:00"', "working_hours.start must be before end"),
    ("name: refusal_burst", "name: many_subjects", "rule many_subjects is defined twice"),
    ("per: partner", "per: team", "per must be one of"),
    ("rules:", "rule:", "expected a mapping with a `rules:` list"),
]


@pytest.mark.parametrize("old, new, says", BAD)
def test_a_malformed_rule_is_a_policy_error_naming_it(tmp_path, old, new, says):
    policy = _own_policy(tmp_path)
    path = policy / "alerts.yaml"
    assert old in path.read_text()
    path.write_text(path.read_text().replace(old, new, 1))
    with pytest.raises(PolicyError) as e:
        load_policy_set(policy)
    assert "alerts.yaml" in str(e.value) and says in str(e.value), str(e.value)


def test_a_file_of_any_wrong_shape_is_a_policy_error(tmp_path):
    policy = _own_policy(tmp_path)
    for text in ("[]", "rules: {}", "rules: [1]", "rules: [{name: x, measure: rows}]",
                 "rules: [{name: x, measure: refusals, window: 1h, limit: 1, extra: 1}]",
                 "rules: [{name: X, measure: refusals, window: 1h, limit: 1}]",
                 "rules: [{name: x, measure: refusals, window: 1h, limit: true}]",
                 "rules: [{name: x, measure: refusals, window: 1h, limit: 1, "
                 "working_hours: {start: '07:00', end: '20:00'}}]", ": :"):
        (policy / "alerts.yaml").write_text(text)
        with pytest.raises(PolicyError, match="alerts.yaml"):
            load_policy_set(policy)
    (policy / "alerts.yaml").write_text("rules: []\n")
    assert load_policy_set(policy).alert_rules == ()


async def test_gateway_check_refuses_a_bad_alerts_file_and_a_missing_one(
        database_url, backends, tmp_path):
    policy = _own_policy(tmp_path)
    path = policy / "alerts.yaml"
    path.write_text(path.read_text().replace("window: 5m", "window: soon", 1))
    env = {k: v for k, v in serve_env(backends, database_url, tmp_path, free_port(),
                                      GATEWAY_POLICY_DIR=str(policy)).items()
           if k.startswith("GATEWAY_")}
    done = await asyncio.to_thread(gateway_main, "check", env=env)
    assert done.returncode == 2
    assert any(line.startswith(f"problem: policy {policy}") and "alerts.yaml: rule "
               "refusal_burst: window must be" in line
               for line in done.stdout.splitlines()), done.stdout
    path.unlink()
    done = await asyncio.to_thread(gateway_main, "check", env=env)
    assert done.returncode == 2
    assert f"problem: policy file {path} is not readable" in done.stdout, done.stdout
