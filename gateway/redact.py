"""Pure redaction: (document, redaction plan) -> document, plus what was served and removed.

A plan is made once per (route, role, relations) and says whether anything can change.
When nothing can, `check_shape` still checks the whole answer's shape and subject (the
caller then gets it re-encoded). When something can, the body is walked along the route's
shape: fields of data sets the viewer may not read are removed (not nulled), list elements
of which nothing but identifiers would remain are dropped, and old call records are masked.
Both walks share the same checks (_leaf, _flat, _subject_of, _check_binds); the walk checks
the shape of each value it serves, not of a value it withholds (that reaches nobody).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import chain
from typing import Any

import orjson

from . import clock
from .policy.catalog import Catalog, Leaf, ListOf, Node, ObjectOf, Route
from .policy.retention import Cutoffs, cutoffs

_DROP = object()

Granted = Callable[[str, frozenset[str], str], frozenset[str]]


class Unmappable(Exception):
    """The backend's answer does not have the shape the route table declares."""


class SubjectMismatch(Unmappable):
    """The backend answered about another EUO, user or meeting than the request named."""


@dataclass(frozen=True, eq=False)
class RedactionPlan:
    route: Route
    role: str
    relations: frozenset[str]
    granted: frozenset[str]            # data sets readable at the document level
    passthrough: bool                  # nothing can change: check the shape, skip the walk
    visible: tuple[str, ...]           # the route's data sets this viewer reads, sorted
    data_subject: bool = False         # the viewer's role is a data subject's (roles.yaml)


# why an element was withheld (the receipt of the audit row: reason -> data set -> count;
# `*` where no data set is known: an undeclared field, a restricted user's whole element)
SCOPE, RETENTION, RESTRICTION, MASKING = "scope", "retention", "restriction", "masking"
UNKNOWN = "*"


@dataclass
class Outcome:
    """What a redaction served, removed and whom it was about (for the audit row), and the
    receipt: how many elements were withheld (or masked) and why."""
    served: set[str] = field(default_factory=set)
    removed: set[str] = field(default_factory=set)
    subjects: set[str] = field(default_factory=set)
    withheld: dict[str, dict[str, int]] = field(default_factory=dict)

    def count(self, reason: str, data_set: str | None, n: int = 1) -> None:
        by_ds = self.withheld.get(reason)
        if by_ds is None:
            by_ds = self.withheld[reason] = {}
        key = data_set or UNKNOWN
        by_ds[key] = by_ds.get(key, 0) + n


def make_plan(route: Route, role: str, relations: frozenset[str], catalog: Catalog,
              granted: Granted) -> RedactionPlan:
    """Decide once what a viewer of this role and relations may see of this route."""
    readable = granted(role, relations, "read")
    passthrough = (
        route.data_sets <= readable
        and bool(relations & catalog.data_subject_relations)
        and not route.body_relations - relations
        and not _has_mask(route.body)
        # elements whose retention counts from their own time are looked at one by one
        and not any(rule.by_element or rule.anonymise_after for _, rule in route.rules)
    )
    kind = catalog.roles.get(role)
    return RedactionPlan(route, role, relations, readable, passthrough,
                         tuple(sorted(route.data_sets & readable)),
                         kind is not None and kind.data_subject)


def redact(document: Any, plan: RedactionPlan, sub: str, catalog: Catalog, granted: Granted,
           now: datetime, blocked: Callable[[str], frozenset[str]] | None = None,
           params: Mapping[str, str] | None = None, cut: Cutoffs | None = None,
           withheld: frozenset[str] = frozenset()) -> tuple[Any, Outcome]:
    """Apply the plan to a parsed body; raise Unmappable when it does not fit the shape,
    SubjectMismatch when a bound identifier differs from the request's `params`.

    `blocked(user)` names the data sets of a user that may not reach this viewer (a
    restriction or objection); `withheld`, those of the user the path names. An object
    that names its own subject withholds that subject's restricted data sets. `cut` is the
    request's retention cut-offs (without it: those that need no contract)."""
    if cut is None:
        cut = cutoffs(plan.route.rules, "", now, lambda _euo: None)
    me = sub if plan.data_subject else None
    walker = _Walker(plan.role, me, catalog, granted, now, blocked, params or {}, cut)
    walker.withheld = withheld
    out = walker.value(document, plan.route.body, plan.relations, "")
    if out is _DROP:
        out = {}
    return out, walker.outcome


def check_shape(document: Any, node: Node | None, params: Mapping[str, str],
                identifier: re.Pattern, path: str = "") -> None:
    """Raise Unmappable (SubjectMismatch) unless the answer has the route's shape and is
    about the request's subject: the check the nothing-to-remove path still pays."""
    if isinstance(node, Leaf):
        if isinstance(document, (dict, list)):    # a scalar is always a good leaf
            _leaf(document, node, path)
    elif document is None:
        return
    elif isinstance(node, ListOf):
        if not isinstance(document, list):
            raise Unmappable(f"{path or 'body'} is not a list")
        for item in document:
            check_shape(item, node.item, params, identifier, path + "[]")
    elif isinstance(node, ObjectOf):
        if not isinstance(document, dict):
            raise Unmappable(f"{path or 'body'} is not an object")
        _check_binds(document, node, params, path)
        for _rel, fld in node.subject:
            _subject_of(document, fld, identifier, path, node.no_account)
        if node.checked:
            _check_grammars(document, node, path)
        for key, child in document.items():
            if not isinstance(child, (dict, list)) and (
                    key not in node.fields or node.dataset_by is not None
                    or isinstance(node.fields[key], Leaf)):
                continue         # a scalar where a scalar may be: nothing to check (most)
            spec = node.fields.get(key)
            sub_path = join_path(path, key)
            if spec is None:
                _flat(child, sub_path, UNDECLARED_DEPTH)
            elif node.dataset_by is not None:
                _flat(child, sub_path)
            else:
                check_shape(child, spec, params, identifier, sub_path)


def join_path(path: str, key: str) -> str:
    """The path of a field `key` of the value at `path` ("" is the document)."""
    return f"{path}.{key}" if path else key


def _leaf(value: Any, node: Leaf, path: str) -> None:
    """An identifier is a scalar; a data set's value is flat (see _flat)."""
    if node.data_set is None:
        if isinstance(value, (dict, list)):
            raise Unmappable(f"{path} is an identifier but holds a structure")
    else:
        _flat(value, path)


UNDECLARED_DEPTH = 1      # a field nobody declared: a scalar, or a list or object of scalars


def _flat(value: Any, path: str, depth: int = 2) -> None:
    """A value that belongs wholly to one data set is a scalar, or a list or object of at
    most two levels of them (entries: [{name, number}]); an undeclared field's, of one:
    nothing deeper, so no object with a subject of its own can hide inside it."""
    # JSON's scalar types by exact type, an allow-list; a directory of hundreds of entries
    # is the common large value, so the types of a level are gathered in one pass in C
    # (`map(type, …)`), and the loops below, which name what is wrong, run only when
    # something is
    scalars = _SCALARS
    if type(value) in scalars:
        return
    children = _children(value, path)
    if depth == 0:
        raise Unmappable(f"{path} nests deeper than the route table allows")
    kinds = set(map(type, children))
    if kinds <= scalars:
        return
    if depth >= 2 and len(kinds) == 1:
        kind, = kinds
        inner = (chain.from_iterable(map(dict.values, children)) if kind is dict
                 else chain.from_iterable(children) if kind is list else None)
        if inner is not None and set(map(type, inner)) <= scalars:
            return
    for child in children:
        t = type(child)
        if t in scalars:
            continue
        if t is dict:
            grandchildren = child.values()
        elif t is list:
            grandchildren = child
        else:
            raise Unmappable(f"{path} holds a value JSON does not have")
        if depth == 1:
            raise Unmappable(f"{path} nests deeper than the route table allows")
        for grandchild in grandchildren:
            if type(grandchild) not in scalars:
                if depth == 2:
                    raise Unmappable(f"{path} nests deeper than the route table allows")
                _flat(grandchild, path, depth - 2)      # never with today's depths (<= 2)


_SCALARS = frozenset((str, int, float, bool, type(None)))


def _children(value: Any, path: str):
    t = type(value)
    if t is dict:
        return value.values()
    if t is list:
        return value
    raise Unmappable(f"{path} holds a value JSON does not have")


def _subject_of(value: dict, fld: str, identifier: re.Pattern, path: str,
                no_account: frozenset[str] = frozenset()) -> str | None:
    """The identifier an object names as its subject, or None where the route table declares
    that the field's null means "no account here" (a guest) and it is null; Unmappable when
    it is missing or is not an identifier (a subject that cannot be read must not be taken
    as nobody's)."""
    raw = value.get(fld)
    if raw is None and fld in no_account and fld in value:
        return None
    named = _identifier(raw)
    if named is None or not identifier.fullmatch(named):
        raise Unmappable(f"{path or 'body'}.{fld} does not name a subject")
    return named


def _check_grammars(value: dict, node: ObjectOf, path: str) -> None:
    """The fields declared as a grammar's value (a page's `next_cursor`) hold null or a valid
    value, which is replaced by its normal form; Unmappable otherwise."""
    for fld, grammar in node.checked:
        raw = value.get(fld)
        if raw is None:
            continue
        text = _identifier(raw)
        normal = grammar.normal(text) if text is not None else None
        if normal is None:
            raise Unmappable(f"{join_path(path, fld)} is not a valid value of its grammar")
        value[fld] = normal


def _check_binds(value: dict, node: ObjectOf, params: Mapping[str, str], path: str) -> None:
    for fld, param in node.binds:
        expected = params.get(param)
        if expected is not None and _identifier(value.get(fld)) != expected:
            raise SubjectMismatch(f"{path}.{fld}" if path else fld)


def _identifier(value: Any) -> str | None:
    """An identifier as text: a backend may number its users; anything else is no identifier."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


class _Walker:
    def __init__(self, role: str, me: str | None, catalog: Catalog, granted: Granted,
                 now: datetime, blocked: Callable[[str], frozenset[str]] | None,
                 params: Mapping[str, str], cut: Cutoffs):
        self.cut = cut
        # the data sets already counted as withheld for retention in the current element
        # (a list item, or the document): a record counts once, not once per field
        self.element: set[str] = set()
        self.in_item = False              # inside a list item (not the document itself)
        self.retained = 0                 # elements withheld for retention so far
        self.role = role
        self.me = me                   # the viewer's sub when they are a data subject
        self.catalog = catalog
        self.granted = granted
        self.now = now
        self.blocked = blocked
        self.withheld: frozenset[str] = frozenset()   # restricted data sets of this subject
        self.params = params
        self.outcome = Outcome()
        self.subject_relations = catalog.data_subject_relations
        # the subjects of the nearest enclosing object that names one: whose data a guest's
        # element (a subject field declared null, `no_account:`) is
        self.enclosing: list[str] = []

    def value(self, value: Any, node: Node, relations: frozenset[str], path: str) -> Any:
        """The redacted value, or _DROP when none of it may be seen."""
        if isinstance(node, Leaf):
            # the shape of what is served is checked; what is withheld reaches nobody
            if node.data_set is None:
                if type(value) not in _SCALARS:
                    _leaf(value, node, path)
                return value
            if node.data_set in self.cut.expired:
                return self.past_retention(value, node.data_set, path)
            if self.withheld and node.data_set in self.withheld:
                self.outcome.removed.add(path)
                self.outcome.count(RESTRICTION, node.data_set)
                return _DROP
            if node.data_set in self.granted(self.role, relations, "read"):
                if type(value) not in _SCALARS:      # a scalar is always a good leaf
                    _leaf(value, node, path)
                self.outcome.served.add(node.data_set)
                return value
            self.outcome.removed.add(path)
            self.outcome.count(SCOPE, node.data_set)
            return _DROP
        if value is None:
            return None
        if isinstance(node, ListOf):
            if not isinstance(value, list):
                raise Unmappable(f"{path or 'body'} is not a list")
            kept = []
            retained = self.retained
            outer, in_item = self.element, self.in_item
            self.in_item = True
            for item in value:
                self.element = set()
                r = self.value(item, node.item, relations, path + "[]")
                if r is not _DROP:
                    kept.append(r)
            self.element, self.in_item = outer, in_item
            if value and not kept and not _decides_relations(node.item) \
                    and self.retained == retained:
                return _DROP    # filtered by permission, not by whose it is: the field goes
            return kept
        return self.object(value, node, relations, path)

    def object(self, value: Any, node: ObjectOf, relations: frozenset[str], path: str) -> Any:
        if self.blocked is None or not node.subject or not isinstance(value, dict):
            return self._object(value, node, relations, path)
        # an object naming its own subject withholds that subject's restricted data sets; a
        # guest's element (no subject named) keeps those of the enclosing object's subject
        saved, withheld, named_any = self.withheld, frozenset(), False
        for rel, fld in node.subject:
            if rel in self.subject_relations:
                named = _subject_of(value, fld, self.catalog.identifier, path, node.no_account)
                if named is None:
                    continue
                named_any = True
                theirs = self.blocked(named)
                if theirs:
                    withheld = withheld | theirs
        self.withheld = withheld if named_any else saved
        try:
            return self._object(value, node, relations, path)
        finally:
            self.withheld = saved

    def _object(self, value: Any, node: ObjectOf, relations: frozenset[str], path: str) -> Any:
        if not isinstance(value, dict):
            raise Unmappable(f"{path or 'body'} is not an object")
        if node.binds:
            _check_binds(value, node, self.params, path)
        if node.checked:
            _check_grammars(value, node, path)
        subjects = []
        own: set[str] = set()          # the relations this object's own subject fields grant
        # every subject field declared null (`no_account:`): a guest's element, which is the
        # enclosing object's subject's data and keeps that object's relations
        guest = bool(node.subject)
        unnamed: list[str] = []
        for rel, fld in node.subject:
            named = _subject_of(value, fld, self.catalog.identifier, path, node.no_account)
            if named is None:
                unnamed.append(rel)
                continue
            guest = False
            if rel in self.subject_relations:
                subjects.append(named)
            if named == self.me:
                relations = relations | {rel}
                own.add(rel)
            else:
                relations = relations - {rel}
        if unnamed and not guest:      # beside a subject named: nobody is the caller's
            relations = relations.difference(unnamed)
        dead = self.cut.expired
        if node.aged and self.cut.oldest:
            dead = self.past(value, node, dead)
        readable = self.granted(self.role, relations, "read")
        if self.withheld:
            readable = readable - self.withheld
        # an object with a subject of its own (a note's author, a CDR's owner) goes to
        # that subject, not to whoever is the subject of the enclosing document; a guest's
        # element is the enclosing object's subject's data as far as the route table
        # declares it, and what it does not declare reaches no one (no subject of ours)
        is_subject = not guest and bool((own if node.subject else relations)
                                        & self.subject_relations)
        if guest:
            subjects = self.enclosing

        if node.dataset_by is not None:
            fld, values = node.dataset_by
            for key, child in value.items():
                _flat(child, join_path(path, key))
            chosen = value.get(fld)
            ds = values.get(chosen) if isinstance(chosen, str) else None
            if ds is not None and ds in dead:
                return self.past_retention(value, ds, path or "body")
            if ds is not None and ds in readable:
                self.outcome.served.add(ds)
                self.outcome.subjects.update(subjects)
                return value
            if ds is None and is_subject:
                self.outcome.subjects.update(subjects)
                return value
            self.outcome.removed.add(path or "body")
            self.outcome.count(RESTRICTION if ds in self.withheld else SCOPE, ds)
            return _DROP

        result: dict[str, Any] = {}
        has_data = own_data = removed_any = False
        fields, outcome = node.fields, self.outcome
        enclosing = self.enclosing
        if subjects:
            self.enclosing = subjects
        for key, child in value.items():
            spec = fields.get(key)
            if type(spec) is Leaf:
                # a leaf is decided here, with the readable set decided once for the object
                # (as `value` decides it: retention, then restriction, then scope)
                ds = spec.data_set
                if ds is None:
                    if type(child) not in _SCALARS:
                        _leaf(child, spec, join_path(path, key))
                    result[key] = child
                elif ds in readable and ds not in dead:
                    if type(child) not in _SCALARS:      # a scalar is always a good leaf
                        _leaf(child, spec, join_path(path, key))
                    outcome.served.add(ds)
                    result[key] = child
                    has_data = True
                    own_data = True
                else:
                    sub_path = join_path(path, key)
                    if ds in dead:
                        self.past_retention(child, ds, sub_path)
                    else:
                        outcome.removed.add(sub_path)
                        outcome.count(RESTRICTION if ds in self.withheld else SCOPE, ds)
                    removed_any = True
                continue
            sub_path = join_path(path, key)
            if spec is None:
                if is_subject:
                    _flat(child, sub_path, UNDECLARED_DEPTH)
                    result[key] = child
                    has_data = own_data = True
                else:
                    outcome.removed.add(sub_path)
                    outcome.count(SCOPE, None)
                    removed_any = True
                continue
            r = self.value(child, spec, relations, sub_path)
            if r is _DROP:
                removed_any = True
                continue
            result[key] = r
            if not (isinstance(spec, Leaf) and spec.data_set is None):
                has_data = True
                # a child that names its own subject (a note, a CDR) says whose it is itself;
                # it does not make this object's subject (the organizer) a subject of the row
                own_data = own_data or not _decides_relations(_item_of(spec))
        self.enclosing = enclosing     # (an Unmappable above ends the whole walk)
        if removed_any and not has_data:
            return _DROP
        if own_data:
            self.outcome.subjects.update(subjects)   # only those whose data was served
        if node.mask is not None:
            self.mask(result, node)
        return result

    def past(self, value: dict, node: ObjectOf, dead: frozenset[str]) -> frozenset[str]:
        """The data sets of this element past retention: those past for the whole EUO, and
        those whose retention counts from the element's own time (`age:`) and is over. An
        element whose time is missing or cannot be read counts as old (fail closed)."""
        at = _instant(value.get(node.age))
        oldest = self.cut.oldest
        gone = [ds for ds in node.aged if ds in oldest and (at is None or at < oldest[ds])]
        return dead.union(gone) if gone else dead

    def past_retention(self, value: Any, data_set: str, path: str) -> Any:
        """Withhold a value past its data set's retention; count it once per element (a list
        item, or the document; a list value of the document itself counts its items)."""
        self.outcome.removed.add(path or "body")
        if isinstance(value, list) and not self.in_item:
            n = len(value)
        elif data_set in self.element:
            n = 0
        else:
            self.element.add(data_set)
            n = 1
        if n:
            self.outcome.count(RETENTION, data_set, n)
            self.retained += n
        return _DROP

    def mask(self, record: dict[str, Any], node: ObjectOf) -> None:
        """Anonymise old records; one whose age is missing or cannot be read counts as old,
        and a number that is not text is masked as text or refused (fail closed)."""
        mask = node.mask
        before = self.cut.anonymise_before.get(mask.data_set)
        if before is None:
            return
        at = _instant(record.get(node.age))
        if at is not None and at >= before:
            return
        masked = False
        for fld in mask.fields:
            value = record.get(fld)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise Unmappable(f"{fld} is neither text nor a number")
            record[fld] = mask_number(value if isinstance(value, str) else _digits(value))
            masked = True
        if masked:
            self.outcome.count(MASKING, mask.data_set)


def receipt(withheld: dict[str, dict[str, int]]) -> str | None:
    """The audit row's receipt: what was withheld and why, as canonical JSON (sorted keys,
    so its hash does not depend on the order things were found); None when nothing was."""
    return orjson.dumps(withheld, option=orjson.OPT_SORT_KEYS).decode() if withheld else None


def _digits(number: int | float) -> str:
    return str(int(number)) if isinstance(number, float) and number.is_integer() else str(number)


def _instant(value: Any) -> datetime | None:
    """An ISO 8601 string or epoch seconds as an aware time; None when neither."""
    if value is None or isinstance(value, bool):
        return None
    try:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return datetime.fromtimestamp(value, UTC)
        at = datetime.fromisoformat(str(value))
    except (ValueError, OverflowError, OSError):
        return None
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def mask_number(number: str) -> str:
    """Replace the last three digits of a phone number with X (the seed's anonymisation)."""
    chars = list(number)
    left = 3
    for i in range(len(chars) - 1, -1, -1):
        if left and chars[i].isdigit():
            chars[i] = "X"
            left -= 1
    return "".join(chars)


def now_utc() -> datetime:
    """The time retention is counted from: the database's (gateway/clock.py)."""
    return clock.now_utc()


def _item_of(node: Node) -> Node:
    return node.item if isinstance(node, ListOf) else node


def _decides_relations(node: Node) -> bool:
    return isinstance(node, ObjectOf) and bool(node.subject)


def _has_mask(node: Node | None) -> bool:
    if node is None or isinstance(node, Leaf):
        return False
    if isinstance(node, ListOf):
        return _has_mask(node.item)
    return node.mask is not None or any(_has_mask(c) for c in node.fields.values())
