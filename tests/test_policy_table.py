"""The decision table is policy.csv's lines, and that is exactly what Casbin answers: for the
shipped policy, for any policy lines, and a model.conf for which it would not be is refused."""

from __future__ import annotations

import itertools

import casbin
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.policy.authz import MODEL, load_policy, read_policy
from gateway.policy.catalog import ACTIONS, RELATIONS, PolicyError
from gateway.policy.catalog_files import load_catalog

from .conftest import POLICY_DIR

CATALOG = load_catalog(POLICY_DIR)
QUESTIONS = list(itertools.product(CATALOG.roles, RELATIONS, CATALOG.data_sets, ACTIONS))
CATALOG_DOMAIN = frozenset(QUESTIONS)


def casbin_says(policy_dir, questions):
    """Casbin's own answer to each (role, relation, data set, action) question."""
    enforcer = casbin.Enforcer(str(policy_dir / "model.conf"), str(policy_dir / "policy.csv"))
    return {q: enforcer.enforce(*q) for q in questions}


def table_says(policy, questions):
    return {(role, rel, ds, act): ds in policy.granted(role, frozenset({rel}), act)
            for role, rel, ds, act in questions}


def test_the_shipped_policy_decides_every_question_as_casbin_does():
    """Every (role, relation, data set, action) the gateway can ask, 2,688 of them."""
    policy = load_policy(POLICY_DIR, CATALOG)
    casbin_answers = casbin_says(POLICY_DIR, QUESTIONS)
    assert table_says(policy, QUESTIONS) == casbin_answers
    assert sum(casbin_answers.values()) > 100     # not a vacuous match


_TERMS = st.tuples(st.sampled_from([*CATALOG.roles, "auditor"]),
                   st.sampled_from([*RELATIONS, "anyone"]),
                   st.sampled_from([*CATALOG.data_sets, "voicemail"]),
                   st.sampled_from([*ACTIONS, "erase"]))
_SPACE = st.sampled_from(["", " ", "  ", "\t"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.tuples(_TERMS, st.lists(_SPACE, min_size=4, max_size=4)), max_size=40),
       comments=st.lists(st.sampled_from(["# a comment", "", "   "]), max_size=3),
       asked=st.lists(st.sampled_from(QUESTIONS), max_size=40))
def test_any_policy_lines_decide_as_casbin_does(tmp_path, lines, comments, asked):
    """Lines of known and unknown terms, spaced any way, among comments and blank lines:
    the table grants a question exactly when Casbin's enforce() does (floors aside)."""
    text = [f"p,{s[0]}{t[0]},{s[1]}{t[1]},{s[2]}{t[2]},{s[3]}{t[3]}" for t, s in lines]
    (tmp_path / "model.conf").write_text(MODEL)
    (tmp_path / "policy.csv").write_text("\n".join(comments + text) + "\n")
    questions = asked + [t for t, _ in lines if t in CATALOG_DOMAIN]
    assert table_says(read_policy(tmp_path, CATALOG), questions) == casbin_says(tmp_path, questions)



@pytest.mark.parametrize(("change", "why"), [
    (("r.act == p.act", 'keyMatch(r.act, p.act)'), "a pattern match"),
    (("r.act == p.act", "r.act == p.act || r.role == p.role"), "an or"),
    ((" && r.act == p.act", ""), "a field not compared"),
    (("some(where (p.eft == allow))", "!some(where (p.eft == deny))"), "deny by line"),
    (("p = role, rel, ds, act", "p = role, rel, ds, act, eft"), "an effect column"),
    (("r = role, rel, ds, act", "r = role, rel, act, ds"), "fields in another order"),
    (("[matchers]", "[role_definition]\ng = _, _\n\n[matchers]"), "roles (g lines)"),
    (("r.role == p.role", "g(r.role, p.role)"), "role inheritance"),
])
def test_a_model_whose_decisions_are_not_its_lines_is_refused(policy_dir, change, why):
    """model.conf other than the four-field equality match with allow-only effect: the
    table would not be Casbin's answer, so the gateway will not load it."""
    model = policy_dir / "model.conf"
    text = model.read_text()
    assert change[0] in text
    model.write_text(text.replace(change[0], change[1], 1))
    with pytest.raises(PolicyError, match="is not the model the gateway decides with") as e:
        load_policy(policy_dir, CATALOG)
    assert "r.role == p.role && r.rel == p.rel" in str(e.value)      # it says what is wanted


def test_the_shipped_model_is_the_one_the_gateway_decides_with():
    """Comments aside, policies/model.conf is MODEL, spacing and all."""
    lines = [line for line in (POLICY_DIR / "model.conf").read_text().splitlines()
             if not line.startswith("#")]
    assert "\n".join(lines).strip() == MODEL.strip()


def test_a_line_of_the_wrong_length_is_a_policy_error(policy_dir):
    """Casbin's enforce() would raise on it; the table names it as a broken floor."""
    with open(policy_dir / "policy.csv", "a") as f:
        f.write("\np, user, self, voicemails\n")
    with pytest.raises(PolicyError, match="does not have 4 fields"):
        load_policy(policy_dir, CATALOG)
