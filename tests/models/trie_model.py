"""The obviously-correct model of the topic trie (``macula.TopicTrie``) and its validators.

MQTT 5 topic semantics, written level by level straight from the specification (section
4.7), with no trie at all: ``ModelTrie`` keeps a dict ``filter -> {key: None}`` and answers
``match(topic)`` by testing every stored filter against the topic with ``matches``.

The validators return the *name* of the first rule a string breaks (scanning left to right),
or None; ``RULE_PATTERNS`` gives, for each name, a regular expression the compiled core's
ValueError message must contain (it names the rule and its MQTT section number).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator

MAX_BYTES = 65535  # [MQTT-4.7.3-3]: a topic name or filter is a UTF-8 string of <= 65,535 bytes
SHARE_PREFIX = "$share/"

# Rule name -> a regex the compiled core's ValueError message must match.
RULE_PATTERNS: dict[str, str] = {
    "surrogate": r"not valid UTF-8: it contains a lone surrogate \[MQTT-1\.5\.4-1\]",
    "empty": r"must not be empty \[MQTT-4\.7\.3-1\]",
    "too_long": r"longer than 65,535 UTF-8 bytes \[MQTT-4\.7\.3-3\]",
    "nul": r"must not contain U\+0000 \[MQTT-4\.7\.3-2\]",
    "wildcard_in_topic": r"must not contain the wildcards '\+' or '#' \[MQTT-3\.3\.2-2\]",
    "plus_not_whole": r"'\+' must occupy a whole level of a topic filter \[MQTT-4\.7\.1-2\]",
    "pound_not_whole": r"'#' must occupy a whole level of a topic filter \[MQTT-4\.7\.1-1\]",
    "pound_not_last": r"'#' must be the last level of a topic filter \[MQTT-4\.7\.1-1\]",
    "share_form": r"needs a share name and a filter: \$share/<group>/<filter> \[MQTT-4\.8\.2-1\]",
    "share_empty_group": r"share name must not be empty \[MQTT-4\.8\.2-1\]",
    "share_group_wildcard": r"share name must not contain '\+' or '#' \[MQTT-4\.8\.2-2\]",
    "share_group_nul": r"share name must not contain U\+0000 \[MQTT-4\.7\.3-2\]",
    "share_recursive": r"must not itself be a \$share/ filter",
    "share_not_added": r"shared subscription filters are not added to a TopicTrie",
}


class ModelError(ValueError):
    """A ValueError that carries the name of the rule broken."""

    def __init__(self, rule: str) -> None:
        super().__init__(rule)
        self.rule = rule


# ---------------------------------------------------------------------------------------------
# Validation


def _plain_error(s: str, is_filter: bool) -> str | None:
    """First rule a topic name (is_filter False) or plain filter (True) breaks, or None."""
    try:
        size = len(s.encode("utf-8"))
    except UnicodeEncodeError:
        return "surrogate"  # [MQTT-1.5.4-1]: well-formed UTF-8 only
    if size == 0:
        return "empty"  # [MQTT-4.7.3-1]
    if size > MAX_BYTES:
        return "too_long"  # [MQTT-4.7.3-3]
    for i, c in enumerate(s):
        if c == "\x00":
            return "nul"  # [MQTT-4.7.3-2]
        if c in "+#":
            if not is_filter:
                return "wildcard_in_topic"  # [MQTT-3.3.2-2]
            starts_level = i == 0 or s[i - 1] == "/"
            ends_level = i + 1 == len(s) or s[i + 1] == "/"
            if not (starts_level and ends_level):  # [MQTT-4.7.1-2] / [MQTT-4.7.1-1]
                return "plus_not_whole" if c == "+" else "pound_not_whole"
            if c == "#" and i + 1 != len(s):
                return "pound_not_last"  # [MQTT-4.7.1-1]: '#' is the last character
    return None


def topic_error(s: str) -> str | None:
    """First rule the topic name ``s`` breaks, or None if it is valid."""
    return _plain_error(s, is_filter=False)


def parse_shared(s: str) -> tuple[str, str] | str | None:
    """``(group, inner)`` for a valid ``$share/<group>/<filter>``, None for a valid plain
    filter, or the name of the first rule broken (a str)."""
    try:
        size = len(s.encode("utf-8"))
    except UnicodeEncodeError:
        return "surrogate"
    if not s.startswith(SHARE_PREFIX):
        return _plain_error(s, is_filter=True)
    if size > MAX_BYTES:
        return "too_long"
    parts = s.split("/", 2)  # "$share", group, the rest (the inner filter)
    if len(parts) < 3:
        return "share_form"  # [MQTT-4.8.2-1]
    group, inner = parts[1], parts[2]
    if not group:
        return "share_empty_group"  # [MQTT-4.8.2-1]: at least one character
    if "+" in group or "#" in group:
        return "share_group_wildcard"  # [MQTT-4.8.2-2]
    if "\x00" in group:
        return "share_group_nul"
    if inner.startswith(SHARE_PREFIX):
        return "share_recursive"
    error = _plain_error(inner, is_filter=True)
    return error if error is not None else (group, inner)


def filter_error(s: str) -> str | None:
    """First rule the filter ``s`` (plain or shared) breaks, or None if it is valid."""
    result = parse_shared(s)
    return result if isinstance(result, str) else None


def add_error(s: str) -> str | None:
    """Why ``TopicTrie.add``/``remove`` refuse the filter ``s``: the whole string is checked
    as a plain filter first, and a well-formed ``$share/`` filter is still refused."""
    error = _plain_error(s, is_filter=True)
    if error is not None:
        return error
    if s.startswith(SHARE_PREFIX):
        return filter_error(s) or "share_not_added"
    return None


# ---------------------------------------------------------------------------------------------
# Matching, straight from MQTT 5 section 4.7


def matches(filt: str, topic: str) -> bool:
    """Does the (valid) filter match the (valid) topic name?"""
    f = filt.split("/")  # levels; empty levels are levels too [MQTT-4.7.1-3 note]
    t = topic.split("/")
    # [MQTT-4.7.2-1]: a filter starting with a wildcard does not match a topic name starting
    # with '$'.
    if topic.startswith("$") and f[0] in ("+", "#"):
        return False
    for i, level in enumerate(f):
        if level == "#":
            return True  # the rest of the topic, any number of levels, zero included
        if i == len(t):
            return False  # the topic ran out of levels first
        if level != "+" and level != t[i]:  # '+' is exactly one level (maybe an empty one)
            return False
    return len(f) == len(t)


class ModelTrie:
    """Subscriptions as a dict ``filter -> {key: None}``; every answer by brute force."""

    def __init__(self) -> None:
        self.subs: dict[str, dict[Hashable, None]] = {}

    def _check_filter(self, filt: str) -> None:
        error = add_error(filt)
        if error is not None:
            raise ModelError(error)

    def _check_topic(self, topic: str) -> None:
        error = topic_error(topic)
        if error is not None:
            raise ModelError(error)

    def add(self, filt: str, key: Hashable) -> bool:
        self._check_filter(filt)
        hash(key)
        keys = self.subs.get(filt, {})
        if key in keys:
            return False
        keys[key] = None
        self.subs[filt] = keys
        return True

    def remove(self, filt: str, key: Hashable) -> bool:
        self._check_filter(filt)
        hash(key)
        keys = self.subs.get(filt)
        if keys is None or key not in keys:
            return False
        del keys[key]
        if not keys:
            del self.subs[filt]
        return True

    def remove_key(self, key: Hashable) -> int:
        hash(key)
        count = 0
        for filt in list(self.subs):
            if key in self.subs[filt]:
                count += 1
                self.remove(filt, key)
        return count

    def match(self, topic: str) -> list[Hashable]:
        self._check_topic(topic)
        found: dict[Hashable, None] = {}
        for filt, keys in self.subs.items():
            if matches(filt, topic):
                for key in keys:
                    found.setdefault(key)
        return list(found)

    def match_filters(self, topic: str) -> list[str]:
        self._check_topic(topic)
        return [filt for filt in self.subs if matches(filt, topic)]

    def subscribers(self, filt: str) -> list[Hashable]:
        self._check_filter(filt)
        return list(self.subs.get(filt, {}))

    def filters_of(self, key: Hashable) -> list[str]:
        hash(key)
        return [filt for filt, keys in self.subs.items() if key in keys]

    def clear(self) -> None:
        self.subs.clear()

    def keys(self) -> set[Hashable]:
        return {key for keys in self.subs.values() for key in keys}

    def __len__(self) -> int:
        return sum(len(keys) for keys in self.subs.values())

    def __contains__(self, filt: str) -> bool:
        self._check_filter(filt)
        return filt in self.subs

    def __iter__(self) -> Iterator[str]:
        return iter(list(self.subs))
