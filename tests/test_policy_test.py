"""`gateway policy test`: the shipped cases (the floors and the visibility matrix) pass on
the shipped policy, catch a change of it case by case, and a malformed case file is an
error naming the file and the case, never a case that passes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import POLICY_DIR, gateway_main


def policy_test(policy_dir: Path, *args: str) -> subprocess.CompletedProcess:
    """`gateway policy test ARGS` on this policy directory, in this process."""
    return gateway_main("policy", "test", *args, env={"GATEWAY_POLICY_DIR": str(policy_dir)})


def policy_test_process(policy_dir: Path, *args: str) -> subprocess.CompletedProcess:
    """`gateway policy test ARGS` as a process of its own (the command line itself)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["GATEWAY_POLICY_DIR"] = str(policy_dir)
    return subprocess.run([sys.executable, "-m", "gateway", "policy", "test", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def test_the_shipped_cases_pass_on_the_shipped_policy():
    done = policy_test_process(POLICY_DIR)
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


def _billion_laughs() -> str:
    """A few hundred bytes that stand for 9**10 strings once every alias is followed."""
    levels = ['&a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    levels += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    return CASE.replace("  - as: partner\n", "  - x: [" + ", ".join(levels) + "]\n"
                        "    as: partner\n").replace(
        "request: GET /telephony/euos/euo-acme/users/u-alice", "request: *a9")


HOSTILE_FILES = [
    # (what, file text, what stderr says): each is an error naming the file, exit 2
    ("a billion laughs", _billion_laughs(), "aliases (*name) are not allowed"),
    ("nesting deeper than the parser's recursion", "cases: " + "[" * 20000 + "]" * 20000,
     "nested too deeply"),
    ("a file over the size limit", CASE + "# " + "x" * (4 * 1024 * 1024) + "\n",
     "larger than 4194304 bytes"),
    ("`as` a list", CASE.replace("as: partner", "as: [partner]"),
     "`as` must name one of callers"),
    ("`as` a mapping", CASE.replace("as: partner", "as: {partner: 1}"),
     "`as` must name one of callers"),
    ("a role that is a list", CASE.replace("{role: partner,", "{role: [partner],"),
     "no role <list> in roles.yaml"),
    ("restricted a number", CASE.replace("contracts:", "restricted: 5\ncontracts:"),
     "restricted is a list of EUO/USER"),
    ("contracts a list", CASE.replace("contracts: {euo-acme: p-northwind}", "contracts: [a]"),
     "contracts maps an EUO id to a partner id"),
    ("request a list", CASE.replace("request: GET /telephony/euos/euo-acme/users/u-alice",
                                    "request: [GET, /x]"), "request is 'METHOD /path'"),
    ("a status that is a boolean", CASE.replace(
        "      served: [user_address, user_email, user_language, user_mobile, user_name]",
        "      refused: {status: true}"), "refused is {status: 4xx, reason: id}"),
    ("a reason that is a list", CASE.replace(
        "      served: [user_address, user_email, user_language, user_mobile, user_name]",
        "      refused: {status: 403, reason: [a]}"), "refused is {status: 4xx, reason: id}"),
    ("a tenant claim a token could not carry", CASE.replace("partner: p-northwind}",
                                                           "partner: p/northwind}"),
     "a token with these claims is refused (bad_claim"),
    ("a python tag", CASE.replace("callers:", "x: !!python/object/apply:os.system [id]\n"
                                  "callers:"), "cannot be read"),
]


@pytest.mark.parametrize(("what", "text", "message"), HOSTILE_FILES,
                         ids=[h[0] for h in HOSTILE_FILES])
def test_a_hostile_case_file_is_an_error_never_a_traceback(tmp_path, what, text, message):
    (tmp_path / "cases.yaml").write_text(text)
    done = policy_test(POLICY_DIR, str(tmp_path))
    assert done.returncode == 2, (what, done.stdout, done.stderr[-2000:])
    assert done.stderr.startswith("gateway policy test: cases.yaml: "), done.stderr[-2000:]
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_a_case_file_that_is_no_regular_file_is_an_error_not_a_hang(tmp_path):
    """A FIFO named *.yaml blocked the run for ever (nobody writes to it); a device never
    ends. Neither is read."""
    os.mkfifo(tmp_path / "fifo.yaml")
    done = policy_test_process(POLICY_DIR, str(tmp_path))      # a hang ends at its timeout
    assert done.returncode == 2 and "fifo.yaml: cannot be read: not a regular file" in done.stderr
    (tmp_path / "fifo.yaml").unlink()
    (tmp_path / "zero.yaml").symlink_to("/dev/zero")
    done = policy_test_process(POLICY_DIR, str(tmp_path))
    assert done.returncode == 2 and "zero.yaml: cannot be read: not a regular file" in done.stderr


def test_contracts_and_restrictions_are_optional(tmp_path):
    """A file assuming no contract: the partner is refused no_active_contract, as the
    proxy would refuse it, rather than the file being an error."""
    (tmp_path / "cases.yaml").write_text(CASE.replace("contracts: {euo-acme: p-northwind}\n", "")
                                         .replace("served: [user_address, user_email, "
                                                  "user_language, user_mobile, user_name]",
                                                  "refused: {status: 403, reason: "
                                                  "no_active_contract}"))
    done = policy_test(POLICY_DIR, str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr


# --- property: whatever a case file holds, loading and running it ends in cases or a
# CaseError, never another exception (the CLI turns CaseError into exit 2)

_ANY = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-1000, 1000), st.floats(allow_nan=True),
              st.text(max_size=12), st.sampled_from(
                  ["partner", "user", "euo-acme", "GET /telephony/euos/euo-acme", "u-alice",
                   "euo-acme/u-alice", "user_name", "p-northwind"])),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.one_of(st.sampled_from(
                                ["role", "sub", "partner", "euo", "as", "request", "expect",
                                 "name", "refused", "status", "reason", "served", "includes",
                                 "excludes", "removed", "served_where_the_answer_shows",
                                 "cases", "callers", "contracts", "restricted"]),
                                st.integers(0, 3)), inner, max_size=4)),
    max_leaves=12)


@st.composite
def case_files(draw) -> str:
    """The sample case file with one of its values, at any depth, replaced by anything."""
    doc = yaml.safe_load(CASE)
    paths = []

    def walk(node, path):
        paths.append(path)
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, path + (k,))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, path + (i,))
    walk(doc, ())
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(paths))
        value = draw(_ANY)
        if not path:
            doc = value
            break
        node = doc
        try:
            for step in path[:-1]:
                node = node[step]
            node[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            pass
    return yaml.safe_dump(doc)


@pytest.mark.slow
@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(text=case_files())
def test_any_case_file_gives_cases_or_a_case_error(tmp_path, text):
    from gateway.policy.policyset import load_policy_set
    from gateway.policytest import CaseError, check, load_cases
    global _POLICY_SET
    if _POLICY_SET is None:
        _POLICY_SET = load_policy_set(POLICY_DIR)
    (tmp_path / "cases.yaml").write_text(text)
    try:
        cases = load_cases(tmp_path, _POLICY_SET)
    except CaseError as e:
        assert str(e).startswith("cases.yaml: ")
        return
    for case in cases:
        check(case)


_POLICY_SET = None
