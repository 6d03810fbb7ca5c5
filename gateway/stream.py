"""A large JSON list answer, parsed as it arrives: `{"<list>": [element, ...], <scalars>}`
taken apart into its elements one at a time, with ijson's C parser (yajl2), so that the
gateway holds one element at a time, never the answer.

Only a route whose body is an object with exactly one list field, every other field a
plain value, no subject and no binds of its own can be streamed (`list_field`): each
element is then redacted alone, exactly as it would be inside the whole document.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import ijson
from ijson.common import ObjectBuilder

from .policy.catalog import Leaf, ListOf, ObjectOf, Route
from .redact import Unmappable

MAX_ELEMENT_EVENTS = 100_000     # an element this large is no list element: refused


def list_field(route: Route) -> str | None:
    """The one list field of a route whose answers can be streamed; None otherwise."""
    body = route.body
    if not isinstance(body, ObjectOf) or body.subject or body.binds or body.dataset_by \
            or body.mask or body.age:
        return None
    lists = [name for name, node in body.fields.items() if isinstance(node, ListOf)]
    others = [node for node in body.fields.values() if not isinstance(node, ListOf)]
    if len(lists) != 1 or not all(isinstance(node, Leaf) for node in others):
        return None
    return lists[0]


class Elements:
    """Feed it the answer's bytes; take the list's finished elements after each feed, and
    the top-level plain values once it is all in. Unmappable when the answer is not the
    declared shape (another structure at the top, a second list, bad JSON)."""

    def __init__(self, field: str):
        self.field = field
        self.scalars: dict[str, Any] = {}
        self._item = f"{field}.item"
        self._events = ijson.sendable_list()
        self._parser = ijson.parse_coro(self._events, use_float=True)
        self._builder: ObjectBuilder | None = None
        self._depth = 0
        self._size = 0
        self._seen_list = False

    def feed(self, chunk: bytes) -> Iterator[Any]:
        """The elements completed by `chunk`."""
        try:
            self._parser.send(chunk)
        except ijson.JSONError as e:
            raise Unmappable(f"the answer is not JSON: {e}") from None
        return self._take()

    def close(self) -> Iterator[Any]:
        """The last elements; Unmappable when the answer ended early."""
        try:
            self._parser.close()
        except ijson.IncompleteJSONError:
            raise Unmappable("the answer ended before its JSON did") from None
        except ijson.JSONError as e:
            raise Unmappable(f"the answer is not JSON: {e}") from None
        yield from self._take()
        if self._builder is not None or not self._seen_list:
            raise Unmappable(f"the answer holds no {self.field} list")

    def _take(self) -> Iterator[Any]:
        events, self._events[:] = list(self._events), []
        for prefix, event, value in events:
            builder = self._builder
            if builder is not None:
                builder.event(event, value)
                self._size += 1
                if event in ("start_map", "start_array"):
                    self._depth += 1
                elif event in ("end_map", "end_array"):
                    self._depth -= 1
                if self._depth == 0:
                    self._builder = None
                    yield builder.value
                elif self._size > MAX_ELEMENT_EVENTS:
                    raise Unmappable(f"an element of {self.field} is too large")
            elif prefix == self._item:
                if event in ("start_map", "start_array"):
                    self._builder = ObjectBuilder()
                    self._builder.event(event, value)
                    self._depth, self._size = 1, 1
                else:
                    yield value                        # a plain element
            elif prefix == self.field:
                if event == "start_array":
                    if self._seen_list:
                        raise Unmappable(f"{self.field} is given twice")
                    self._seen_list = True
                elif event != "end_array":
                    raise Unmappable(f"{self.field} is not a list")
            elif prefix == "":
                if event not in ("start_map", "end_map", "map_key"):
                    raise Unmappable("the answer is not a JSON object")
                if event == "map_key" and value in self.scalars:
                    raise Unmappable(f"{value[:64]!r} is given twice")
            elif "." not in prefix and event not in ("start_map", "start_array"):
                self.scalars[prefix] = value
            else:
                raise Unmappable(f"{prefix[:64]} is not a plain value")
