"""`gateway policy test`: the shipped cases (the floors and the visibility matrix) pass on
the shipped policy, catch a change of it case by case, and a malformed case file is an
error naming the file and the case, never a case that passes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import POLICY_DIR


def policy_test(policy_dir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["GATEWAY_POLICY_DIR"] = str(policy_dir)
    return subprocess.run([sys.executable, "-m", "gateway", "policy", "test", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def test_the_shipped_cases_pass_on_the_shipped_policy():
    done = policy_test(POLICY_DIR)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().startswith("policy test: 144 cases in 2 files, 0 failed")


def test_a_changed_policy_fails_the_cases_that_see_it(policy_dir):
    """EUO admins lose call recordings: the matrix names each request that changed."""
    csv = policy_dir / "policy.csv"
    line = "p, euo_admin, same_euo, call_recordings, read"
    assert line in csv.read_text()
    csv.write_text(csv.read_text().replace(line + "\n", ""))
    done = policy_test(policy_dir)
    assert done.returncode == 1, done.stdout + done.stderr
    failed = [line for line in done.stdout.splitlines() if line.startswith("FAIL ")]
    assert failed == [
        "FAIL visibility.yaml: admin GET /telephony/euos/euo-acme/users/u-alice/recordings",
        "FAIL visibility.yaml: admin GET /telephony/euos/euo-acme/users/u-alice/recordings/"
        "rec-u-alice-1"], done.stdout
    assert ("expected allowed, got refused 403 dataset_not_permitted" in done.stdout)
    assert "2 failed" in done.stdout.splitlines()[-1]


def test_a_wider_policy_fails_the_cases_too(policy_dir):
    """Within the floors but wider than the default: EUO admins given voicemails."""
    with open(policy_dir / "policy.csv", "a") as f:
        f.write("p, euo_admin, same_euo, voicemails, read\n")
    done = policy_test(policy_dir)
    assert done.returncode == 1
    assert ("FAIL visibility.yaml: admin GET /telephony/euos/euo-acme/users/u-alice/voicemails"
            in done.stdout)
    assert "expected refused 403 dataset_not_permitted, got allowed, serving voicemails" \
        in done.stdout


def test_a_policy_below_a_floor_is_refused_before_any_case_runs(policy_dir):
    with open(policy_dir / "policy.csv", "a") as f:
        f.write("p, partner, contracted_partner, meeting_topic, read\n")
    done = policy_test(policy_dir)
    assert done.returncode == 2
    assert "meeting_topic" in done.stderr and "policy.csv" in done.stderr


CASE = """
callers:
  partner: {role: partner, sub: pat@northwind, partner: p-northwind}
contracts: {euo-acme: p-northwind}
cases:
  - as: partner
    request: GET /telephony/euos/euo-acme/users/u-alice
    expect:
      served: [user_address, user_email, user_language, user_mobile, user_name]
"""


@pytest.mark.parametrize(("change", "message"), [
    (("served:", "serves:"), "case 1 (partner GET /telephony/euos/euo-acme/users/u-alice): "
                              "expect: unknown keys serves"),
    (("user_name]", "user_nmae]"), "served: no data set user_nmae in datasets.yaml"),
    (("as: partner", "as: parnter"), "`as` must name one of callers: partner"),
    (("request: GET", "request: BREW"), "request is 'METHOD /path'"),
    (("{role: partner, sub: pat@northwind, partner: p-northwind}",
      "{role: partner, sub: pat@northwind}"), "caller partner: role partner needs the partner "
                                               "claim"),
    (("{role: partner,", "{role: reseller,"), "no role 'reseller' in roles.yaml"),
    (("cases:", "kases:"), "unknown keys kases"),
    (("    expect:\n      served: [user_address, user_email, user_language, user_mobile, "
      "user_name]\n", "    expect: {}\n"), "`expect` must say what is decided"),
])
def test_a_malformed_case_file_is_an_error_naming_where(tmp_path, change, message):
    (tmp_path / "cases.yaml").write_text(CASE.replace(*change))
    done = policy_test(POLICY_DIR, str(tmp_path))
    assert done.returncode == 2, done.stdout
    assert done.stderr.startswith("gateway policy test: cases.yaml: ")
    assert message in done.stderr


def test_cases_of_their_own_report_each_failure_with_what_was_expected(tmp_path):
    (tmp_path / "mine.yaml").write_text(CASE + """
  - name: "partners may not read recordings (wrong: the default policy lets them)"
    as: partner
    request: GET /telephony/euos/euo-acme/users/u-alice/recordings
    expect:
      refused: {status: 403}
  - name: "a partner reads the whole record (wrong: not the personal directory)"
    as: partner
    request: GET /telephony/euos/euo-acme/users/u-alice
    expect:
      includes: [personal_directory]
""")
    assert policy_test(POLICY_DIR, str(tmp_path / "nowhere")).returncode == 2
    done = policy_test(POLICY_DIR, str(tmp_path))
    assert done.returncode == 1
    assert "FAIL mine.yaml: partners may not read recordings" in done.stdout
    assert "expected refused 403, got allowed, serving call_recordings" in done.stdout
    assert "includes: not served: [personal_directory]" in done.stdout
    assert done.stdout.splitlines()[-1].startswith("policy test: 3 cases in 1 file, 2 failed")
