"""A YAML document as a stream of parser events, with PyYAML's node tree
composed only where the reader asks for it.

yaml.compose of a config with 100,000 routes takes ~7 s and 324 MB (a node
with its marks for each of 600k scalars and mappings); the events alone,
from libyaml, take ~1.1 s with flat memory. The config reads its routes
list from the events and composes the rest (see config.py).
"""
from __future__ import annotations

from collections.abc import Callable

import yaml
from yaml.composer import ComposerError
from yaml.resolver import Resolver

Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_COLLECTIONS = ((yaml.SequenceStartEvent, yaml.SequenceEndEvent, yaml.SequenceNode),
                (yaml.MappingStartEvent, yaml.MappingEndEvent, yaml.MappingNode))


class Events:
    """The events of one document, for reading in order: next() for the
    next event, compose(event) for the node tree that starts with it
    (anchors and aliases resolved across the whole document, as
    yaml.compose does)."""

    def __init__(self, text: str) -> None:
        # The loader's get_event() itself: yaml.parse() wraps it in a
        # generator and a check_event() per event, 30% of the time here.
        self._loader = Loader(text)
        self._get: Callable[[], yaml.Event] = self._loader.get_event
        self._pushed: list[yaml.Event] = []
        self._resolver = Resolver()
        self.anchors: dict[str, yaml.Node] = {}

    def next(self) -> yaml.Event:
        return self._pushed.pop() if self._pushed else self._get()

    def _tag(self, event: yaml.Event, kind: type, value: str | None) -> str:
        tag = event.tag
        if tag is None or tag == "!":
            tag = self._resolver.resolve(kind, value, event.implicit)
        return tag

    def reader(self) -> Callable[[], yaml.Event]:
        """next, or while nothing is pushed back the loader's own get_event
        (for a loop that reads many events and pushes none back)."""
        return self.next if self._pushed else self._get

    def close(self) -> None:
        self._loader.dispose()

    def push(self, events: list[yaml.Event]) -> None:
        """Puts events back, to be read again in their order."""
        self._pushed.extend(reversed(events))

    def root(self) -> yaml.Event | None:
        """The first event of the document's root node; None for an empty stream."""
        self.next()  # StreamStart
        event = self.next()
        if isinstance(event, yaml.StreamEndEvent):
            return None
        return self.next()  # after DocumentStart

    def end(self) -> None:
        """Reads the document's end; a second document is an error, as for yaml.compose."""
        self.next()  # DocumentEnd
        event = self.next()
        if not isinstance(event, yaml.StreamEndEvent):
            raise ComposerError("expected a single document in the stream", None,
                                "but found another document", event.start_mark)

    def compose(self, event: yaml.Event) -> yaml.Node:
        if isinstance(event, yaml.AliasEvent):
            if event.anchor not in self.anchors:
                raise ComposerError(None, None, f"found undefined alias {event.anchor!r}", event.start_mark)
            return self.anchors[event.anchor]
        anchor = event.anchor
        if anchor is not None and anchor in self.anchors:
            raise ComposerError(f"found duplicate anchor {anchor!r}; first occurrence",
                                self.anchors[anchor].start_mark, "second occurrence", event.start_mark)
        if isinstance(event, yaml.ScalarEvent):
            node: yaml.Node = yaml.ScalarNode(self._tag(event, yaml.ScalarNode, event.value), event.value,
                                              event.start_mark, event.end_mark, style=event.style)
            if anchor is not None:
                self.anchors[anchor] = node
            return node
        for start, end, kind in _COLLECTIONS:
            if isinstance(event, start):
                node = kind(self._tag(event, kind, None), [], event.start_mark, None, flow_style=event.flow_style)
                if anchor is not None:
                    self.anchors[anchor] = node  # before the children, which may refer to it
                while not isinstance(item := self.next(), end):
                    child = self.compose(item)
                    node.value.append((child, self.compose(self.next())) if kind is yaml.MappingNode else child)
                node.end_mark = item.end_mark
                return node
        raise ComposerError(None, None, f"unexpected {type(event).__name__}", event.start_mark)
