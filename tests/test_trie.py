"""The topic trie (TopicTrie, validate_filter, validate_topic, parse_shared) against its model.

tests/models/trie_model.py is the obviously-correct version: a dict of filters and a matcher
written level by level from the MQTT 5 text.  The tests here check the API and its edges by
hand, drive the trie and the model with the same random operations (comparing every answer),
check the validators against the model's on random strings, and check that keys are released.
The EMQX / Mosquitto edge-case tables are in tests/test_topic_tables.py.
"""

from __future__ import annotations

import gc
import pickle
import random
import re
import weakref
from collections.abc import Callable, Hashable
from typing import Any

import pytest
from hypothesis import given, stateful
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant

from macula import TopicTrie, parse_shared, validate_filter, validate_topic
from macula._ext import trie as trie_module
from tests.gc_util import gc_disabled
from tests.models import trie_model as model
from tests.models.trie_model import RULE_PATTERNS, ModelError, ModelTrie

STACK_LEVELS = 64  # _ext/trie.pyx: levels kept on the C stack by a search before the heap
MAX = 65535


def assert_rule(exc: BaseException, rule: str) -> None:
    assert type(exc) is ValueError, exc
    assert re.search(RULE_PATTERNS[rule], str(exc)), (rule, str(exc))


PROBES = ["a", "a/b", "/", "//", "a//b", "$SYS", "$SYS/a", "$x/", "é/日本", "b/a/b"]


def snapshot(trie: TopicTrie) -> Any:
    """Everything the trie answers, for 'nothing changed' checks."""
    return (
        sorted(trie),
        {f: sorted(map(repr, trie.subscribers(f))) for f in trie},
        len(trie),
        {t: sorted(map(repr, trie.match(t))) for t in PROBES},
        {t: sorted(trie.match_filters(t)) for t in PROBES},
        trie.stats(),
    )


def populated() -> TopicTrie:
    trie = TopicTrie()
    for f, k in [("a/#", 1), ("+/b", 2), ("a/b", 1), ("#", "all"), ("$SYS/#", "sys"), ("/", 3)]:
        trie.add(f, k)
    return trie


# ---------------------------------------------------------------------------------------------
# The API, method by method


def test_add_remove_return_values_and_counts() -> None:
    trie = TopicTrie()
    assert len(trie) == 0 and list(trie) == [] and trie.node_count == 0
    assert trie.add("a/b", "k") is True
    assert trie.add("a/b", "k") is False  # the same pair again
    assert trie.add("a/b", "j") is True
    assert trie.add("a/+", "k") is True
    assert len(trie) == 3
    assert sorted(trie) == ["a/+", "a/b"]
    assert "a/b" in trie and "a/+" in trie
    assert "a" not in trie and "a/#" not in trie and "a/b/c" not in trie
    assert sorted(trie.subscribers("a/b")) == ["j", "k"]
    assert trie.subscribers("a/c") == [] and trie.subscribers("a") == []
    assert sorted(trie.filters_of("k")) == ["a/+", "a/b"]
    assert trie.filters_of("nobody") == []
    assert trie.remove("a/b", "nobody") is False  # unknown key
    assert trie.remove("x/y", "k") is False  # unknown filter
    assert trie.remove("a", "k") is False  # a prefix node of a filter, not a filter
    assert trie.remove("a/b", "k") is True
    assert trie.remove("a/b", "k") is False
    assert len(trie) == 2 and trie.subscribers("a/b") == ["j"]
    assert trie.remove_key("k") == 1
    assert trie.remove_key("k") == 0
    assert list(trie) == ["a/b"] and trie.match("a/b") == ["j"]
    assert trie.remove("a/b", "j") is True
    assert len(trie) == 0 and list(trie) == [] and trie.stats()["nodes"] == 0


def test_repr_pickle_and_exports() -> None:
    trie = populated()
    assert repr(trie) == f"<TopicTrie 6 subscriptions, 6 filters, {trie.node_count} nodes>"
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(trie)
    assert trie_module.MAX_TOPIC_BYTES == MAX


def test_stats_count_nodes_and_edges() -> None:
    trie = TopicTrie()
    for f in ["a/b/c", "a/b/d", "a/+", "#", "a/+/#"]:
        trie.add(f, f)
    trie.add("a/b/c", "again")
    s = trie.stats()
    # nodes: a, a/b, a/b/c, a/b/d, a/+, #, a/+/#; exact edges: a, b, c, d
    assert (s["subscriptions"], s["filters"], s["keys"], s["nodes"], s["edges"]) == (6, 5, 6, 7, 4)
    assert trie.node_count == 7
    assert s["node_capacity"] >= 8 and s["edge_capacity"] >= 2 * s["edges"]
    assert s["key_capacity"] >= s["keys"] and s["c_bytes"] > 0
    trie.remove("a/b/d", "a/b/d")  # frees the node a/b/d and its edge only
    assert (trie.stats()["nodes"], trie.stats()["edges"]) == (6, 3)
    trie.remove_key("a/+")  # a/+ still leads to a/+/#
    assert trie.stats()["nodes"] == 6
    trie.remove_key("a/+/#")  # now a/+ and a/+/# go
    assert trie.stats()["nodes"] == 4


def test_clear() -> None:
    trie = TopicTrie()
    for i in range(300):
        trie.add(f"c/{i}/+", i)
    big = trie.stats()
    trie.clear()
    s = trie.stats()
    assert len(trie) == 0 and list(trie) == [] and trie.match("c/1/x") == []
    assert (s["subscriptions"], s["filters"], s["keys"], s["nodes"], s["edges"]) == (0,) * 5
    assert s["c_bytes"] < big["c_bytes"]  # the memory is given back
    assert trie.add("c/1/+", 1) and trie.match("c/1/x") == [1]
    trie.clear()
    trie.clear()
    assert len(trie) == 0


def test_emptied_trie_gives_memory_back() -> None:
    trie = TopicTrie()
    empty = trie.stats()
    for i in range(500):
        trie.add(f"m/{i}", i)
    for i in range(500):
        assert trie.remove(f"m/{i}", i)
    assert trie.stats() == empty


# ---------------------------------------------------------------------------------------------
# Semantics at the edges


@pytest.mark.parametrize(
    ("filt", "topic", "expected"),
    [
        pytest.param("a//b", "a//b", True, id="empty-level-exact"),
        pytest.param("a/+/b", "a//b", True, id="plus-matches-empty-level"),
        pytest.param("a/b", "a//b", False, id="empty-level-counts"),
        pytest.param("a//b", "a/b", False, id="empty-level-in-filter-counts"),
        pytest.param("/", "/", True, id="slash-exact"),
        pytest.param("+/+", "/", True, id="slash-is-two-empty-levels"),
        pytest.param("+", "/", False, id="plus-is-one-level-only"),
        pytest.param("/+", "/", True, id="slash-plus"),
        pytest.param("/#", "/", True, id="slash-pound"),
        pytest.param("#", "/", True, id="pound-matches-slash"),
        pytest.param("+/#", "/", True, id="plus-pound-matches-slash"),
        pytest.param("a/+", "a/", True, id="plus-matches-trailing-empty"),
        pytest.param("a/+", "a", False, id="plus-needs-a-level"),
        pytest.param("+/a", "/a", True, id="plus-matches-leading-empty"),
        pytest.param("a/#", "a", True, id="pound-matches-parent"),
        pytest.param("a/#", "a/", True, id="pound-matches-empty-child"),
        pytest.param("a/#", "a/b/c/d", True, id="pound-matches-deep"),
        pytest.param("a/#", "ab", False, id="pound-level-boundary"),
        pytest.param("a/b/#", "a", False, id="pound-parent-only-one-up"),
        pytest.param("+/#", "a", True, id="plus-pound-one-level"),
        pytest.param("+/#", "a/b/c", True, id="plus-pound-deep"),
        pytest.param("+/+/#", "a", False, id="plus-plus-pound-needs-two"),
        pytest.param("#", "$SYS", False, id="sys-pound"),
        pytest.param("+", "$SYS", False, id="sys-plus"),
        pytest.param("+/#", "$SYS/a", False, id="sys-plus-pound"),
        pytest.param("+/a", "$x/a", False, id="dollar-plus"),
        pytest.param("#", "$", False, id="lone-dollar"),
        pytest.param("$SYS/#", "$SYS", True, id="sys-explicit-parent"),
        pytest.param("$SYS/#", "$SYS/a/b", True, id="sys-explicit-deep"),
        pytest.param("$SYS/+", "$SYS/", True, id="sys-explicit-plus-empty"),
        pytest.param("$SYS", "$SYS", True, id="sys-exact"),
        pytest.param("$sys/#", "$SYS/a", False, id="case-sensitive-sys"),
        pytest.param("#", "/$SYS", True, id="dollar-not-first-level"),
        pytest.param("#", "x$", True, id="dollar-not-first-char"),
        pytest.param("+/$x", "a/$x", True, id="dollar-deeper-level"),
        pytest.param("A/b", "a/b", False, id="case-sensitive"),
        pytest.param("é/+/日本", "é/x/日本", True, id="utf8-levels"),
        pytest.param("caf\u00e9", "cafe\u0301", False, id="no-unicode-normalisation"),
        pytest.param("a b/ /c", "a b/ /c", True, id="spaces-are-characters"),
        pytest.param("$share/g/a", "$share/g/a", None, id="share-filter-not-added"),
    ],
)
def test_edge_semantics(filt: str, topic: str, expected: bool | None) -> None:
    trie = TopicTrie()
    if expected is None:
        with pytest.raises(ValueError) as info:
            trie.add(filt, "k")
        assert_rule(info.value, "share_not_added")
        assert model.add_error(filt) == "share_not_added"
        return
    assert model.matches(filt, topic) is expected
    trie.add(filt, "k")
    assert trie.match(topic) == (["k"] if expected else [])
    assert trie.match_filters(topic) == ([filt] if expected else [])


def test_long_labels_inline_and_on_the_heap() -> None:
    # INLINE_LABEL (trie.pxd) is 20 bytes; longer labels live on the heap.
    trie = TopicTrie()
    labels = ["a" * 19, "b" * 20, "c" * 21, "ü" * 10, "ö" * 11, "y" * 1000, "z" * 20 + "a"]
    for lab in labels:
        trie.add(f"{lab}/+", lab)
        trie.add(f"p/{lab}", lab)
    for lab in labels:
        assert trie.match(f"{lab}/q") == [lab]
        assert trie.match(f"p/{lab}") == [lab]
        assert trie.match(f"{lab}!/q") == [] and trie.match(f"p/{lab[:-1]}") == []
    for lab in labels:
        assert trie.remove(f"{lab}/+", lab) and trie.remove(f"p/{lab}", lab)
    assert trie.stats()["nodes"] == 0


def test_keys_of_any_hashable_type() -> None:
    class Custom:
        pass

    def fn() -> None:
        pass

    keys: list[Hashable] = [
        None, 0, -1, 2**100, 1.5, "s", b"b", (1, "x"), frozenset({1, 2}), Custom(), Custom,
        fn, ("nested", (1, 2)), "",
    ]  # fmt: skip
    trie = TopicTrie()
    for k in keys:
        assert trie.add("k/+", k)
        assert trie.add(f"k/{len(trie)}", k)
    got = trie.match("k/1")
    assert len(got) == len(keys)
    for k in keys:
        assert any(g is k for g in got)
    assert trie.remove("k/+", keys[9])
    assert not any(g is keys[9] for g in trie.match("k/zz"))


def test_keys_are_compared_by_equality() -> None:
    trie = TopicTrie()
    assert trie.add("a", 1)
    assert trie.add("a", 1.0) is False and trie.add("a", True) is False  # 1 == 1.0 == True
    assert len(trie) == 1 and trie.match("a") == [1]
    assert trie.remove("a", True) is True and len(trie) == 0


def test_match_returns_distinct_keys_and_each_filter_once() -> None:
    trie = TopicTrie()
    filters = ["#", "a/#", "+/#", "a/+", "+/b", "a/b", "+/+", "a/b/#", "+/b/#", "a/+/#"]
    for f in filters:
        trie.add(f, "same")
        trie.add(f, ("own", f))
    got = trie.match("a/b")
    assert len(got) == len(set(got)) == len(filters) + 1
    assert got.count("same") == 1
    assert sorted(trie.match_filters("a/b")) == sorted(filters)
    assert trie.match("a/b") == got or set(trie.match("a/b")) == set(got)  # again: fresh stamps


def test_more_results_than_the_stack_buffer() -> None:
    # STACK_RESULTS (trie.pyx) is 64: the result buffer moves to the heap after that.
    trie = TopicTrie()
    for i in range(300):
        trie.add("r/+", i)
    assert sorted(trie.match("r/x")) == list(range(300))
    for i in range(300):
        trie.add("/".join(["r"] * (i % 150 + 1)) + "/#", ("deep", i))
    got = trie.match("/".join(["r"] * 160))
    assert len(got) == len(set(got)) == 300
    assert len(trie.match_filters("/".join(["r"] * 160))) == 150


@pytest.mark.parametrize(
    "depth",
    [STACK_LEVELS - 1, STACK_LEVELS, STACK_LEVELS + 1, STACK_LEVELS + 2, 2 * STACK_LEVELS + 1, 600],
)
def test_deep_topics_beyond_the_stack_buffer(depth: int) -> None:
    """Filters a/../a/+/../+ at every split point (so every node on the path has a '+' and an
    exact child, the deepest the search stack gets) and a/../a/# at every depth."""
    trie = TopicTrie()
    ref = ModelTrie()
    for k in range(depth + 1):
        for f, key in [
            ("/".join(["a"] * k + ["+"] * (depth - k)), ("plus", k)),
            ("/".join(["a"] * k + ["#"]), ("pound", k)),
        ]:
            trie.add(f, key)
            if depth <= 2 * STACK_LEVELS + 1:
                ref.add(f, key)
    for n in (depth - 1, depth, depth + 1):
        topic = "/".join(["a"] * n)
        expected = {("pound", k) for k in range(min(n, depth) + 1)}
        if n == depth:
            expected |= {("plus", k) for k in range(depth + 1)}
        got = trie.match(topic)
        assert len(got) == len(set(got))
        assert set(got) == expected
        if ref.subs:
            assert set(got) == set(ref.match(topic))
            assert sorted(trie.match_filters(topic)) == sorted(ref.match_filters(topic))
    trie.add("/".join(["b"] * depth), "b")  # an exact deep filter, then removed whole
    assert set(trie.match("/".join(["b"] * depth))) == {"b", ("plus", 0), ("pound", 0)}
    before = trie.node_count
    assert trie.remove("/".join(["b"] * depth), "b")
    assert trie.node_count == before - depth


def test_most_levels_a_topic_can_have() -> None:
    topic = "/" * MAX  # 65,536 empty levels in 65,535 bytes
    validate_topic(topic)
    trie = TopicTrie()
    trie.add("#", "pound")
    trie.add("/#", "slash-pound")
    trie.add("+/+", "two")
    trie.add(topic, "exact")
    trie.add("+" + "/" * (MAX - 1), "first-plus")  # 65,535 levels
    trie.add("/" * (MAX - 1) + "#", "last-pound")  # 65,534 empty levels and '#'
    assert set(trie.match(topic)) == {"pound", "slash-pound", "exact", "last-pound"}
    assert set(trie.match("/" * (MAX - 1))) == {"pound", "slash-pound", "last-pound", "first-plus"}
    assert trie.remove(topic, "exact") and trie.remove("+" + "/" * (MAX - 1), "first-plus")
    assert trie.remove("/" * (MAX - 1) + "#", "last-pound")
    assert trie.node_count == 5  # #, '', ''/#, +, +/+


@pytest.mark.parametrize(
    ("ok", "too_long"),
    [
        pytest.param("a" * MAX, "a" * (MAX + 1), id="ascii"),
        pytest.param("é" * (MAX // 2) + "a", "é" * (MAX // 2 + 1), id="2-byte-utf8"),
        pytest.param("😀" * (MAX // 4) + "abc", "😀" * (MAX // 4 + 1), id="4-byte-utf8"),
        pytest.param("a/" * (MAX // 2) + "b", "a/" * (MAX // 2 + 1), id="many-levels"),
    ],
)
def test_65535_byte_limit(ok: str, too_long: str) -> None:
    assert len(ok.encode()) == MAX and len(too_long.encode()) == MAX + 1
    assert len(too_long) <= MAX + 1  # the limit counts bytes, not characters
    trie = TopicTrie()
    validate_topic(ok)
    validate_filter(ok)
    assert trie.add(ok, "k") and trie.match(ok) == ["k"] and ok in trie
    before = snapshot(trie)
    for call in (validate_topic, validate_filter, trie.match, trie.match_filters,
                 lambda s: trie.add(s, "k"), lambda s: trie.remove(s, "k"),
                 trie.subscribers, trie.__contains__):  # fmt: skip
        with pytest.raises(ValueError) as info:
            call(too_long)
        assert_rule(info.value, "too_long")
    assert snapshot(trie) == before


def test_shared_filter_length_limit() -> None:
    head = "$share/g/"
    ok = head + "a" * (MAX - len(head))
    assert parse_shared(ok) == ("g", "a" * (MAX - len(head)))
    with pytest.raises(ValueError) as info:
        parse_shared(ok + "a")
    assert_rule(info.value, "too_long")


def test_parse_shared_examples() -> None:
    assert parse_shared("$share/g/a/+/#") == ("g", "a/+/#")
    assert parse_shared("$share/g/#") == ("g", "#")
    assert parse_shared("$share/é 1/$SYS/x") == ("é 1", "$SYS/x")
    assert parse_shared("$share/g/$share") == ("g", "$share")
    assert parse_shared("$share") is None and parse_shared("$sharex/a") is None
    assert parse_shared("$SHARE/g/a") is None  # case-sensitive: a plain filter
    assert parse_shared("a/$share/g/b") is None
    for bad, rule in [
        ("$share/g", "share_form"),
        ("$share//a", "share_empty_group"),
        ("$share/g#/a", "share_group_wildcard"),
        ("$share/g\x00/a", "share_group_nul"),
        ("$share/g/$share/h/a", "share_recursive"),
        ("$share/g/a+", "plus_not_whole"),
        ("$share/g/#/a", "pound_not_last"),
        ("$share/g/a\x00", "nul"),
    ]:
        with pytest.raises(ValueError) as info:
            parse_shared(bad)
        assert_rule(info.value, rule)
        assert model.parse_shared(bad) == rule


# ---------------------------------------------------------------------------------------------
# Bad input: TypeError / ValueError, and nothing changes


def calls_taking_a_string(trie: TopicTrie) -> list[Callable[[Any], Any]]:
    return [
        validate_filter,
        validate_topic,
        parse_shared,
        trie.match,
        trie.match_filters,
        trie.subscribers,
        trie.__contains__,
        lambda s: trie.add(s, "k"),
        lambda s: trie.remove(s, "k"),
    ]


@pytest.mark.parametrize("bad", [None, b"a/b", bytearray(b"a"), 1, ["a"], memoryview(b"a")])
def test_non_str_is_a_type_error(bad: Any) -> None:
    trie = populated()
    before = snapshot(trie)
    for call in calls_taking_a_string(trie):
        with pytest.raises(TypeError, match="must be str"):
            call(bad)
    assert snapshot(trie) == before


def test_str_subclasses_are_accepted_and_stored_as_str() -> None:
    class S(str):
        pass

    trie = TopicTrie()
    assert trie.add(S("a/+"), 1)
    validate_filter(S("a/#"))
    validate_topic(S("a"))
    assert trie.match(S("a/b")) == [1] and S("a/+") in trie
    (stored,) = list(trie)
    assert type(stored) is str and stored == "a/+"
    assert type(trie.match_filters("a/b")[0]) is str
    assert type(trie.filters_of(1)[0]) is str
    assert trie.remove(S("a/+"), 1)


@pytest.mark.parametrize("bad", [[], {}, {1}, bytearray(b"k")])
def test_unhashable_key_is_a_type_error(bad: Any) -> None:
    trie = populated()
    before = snapshot(trie)
    for call in (
        lambda: trie.add("a/b", bad),
        lambda: trie.add("new/filter", bad),
        lambda: trie.remove("a/b", bad),
        lambda: trie.remove("no/such", bad),
        lambda: trie.remove_key(bad),
        lambda: trie.filters_of(bad),
    ):
        with pytest.raises(TypeError, match="hashable"):
            call()
        assert snapshot(trie) == before


INVALID_FILTERS = [
    ("", "empty"),
    ("a+", "plus_not_whole"),
    ("+a/b", "plus_not_whole"),
    ("a/#/b", "pound_not_last"),
    ("#/", "pound_not_last"),
    ("a#", "pound_not_whole"),
    ("a/\x00", "nul"),
    ("\ud800/a", "surrogate"),
    ("a/\udfff", "surrogate"),
    ("$share/g/a", "share_not_added"),
    ("$share/g+/a", "plus_not_whole"),  # add() checks the whole string as a filter first
    ("$share//a", "share_empty_group"),
    ("$share/g", "share_form"),
    ("$share/g/$share/h/a", "share_recursive"),
]
INVALID_TOPICS = [
    ("", "empty"),
    ("a/+", "wildcard_in_topic"),
    ("#", "wildcard_in_topic"),
    ("a+b", "wildcard_in_topic"),
    ("a\x00", "nul"),
    ("\ud83d", "surrogate"),
]


def test_invalid_input_is_a_value_error_naming_the_rule_and_changes_nothing() -> None:
    trie = populated()
    before = snapshot(trie)
    for filt, rule in INVALID_FILTERS:
        assert model.add_error(filt) == rule
        for call in (
            lambda f: trie.add(f, "k"),
            lambda f: trie.add(f, 1),  # a key that is already in the trie
            lambda f: trie.remove(f, 1),
            trie.subscribers,
            trie.__contains__,
        ):
            with pytest.raises(ValueError) as info:
                call(filt)
            assert_rule(info.value, rule)
            assert snapshot(trie) == before
    for topic, rule in INVALID_TOPICS:
        assert model.topic_error(topic) == rule
        for call in (trie.match, trie.match_filters, validate_topic):
            with pytest.raises(ValueError) as info:
                call(topic)
            assert_rule(info.value, rule)
            assert snapshot(trie) == before


class FlakyHash:
    """Hashes once, then raises: add() fails after the key got an id."""

    def __init__(self) -> None:
        self.calls = 0

    def __hash__(self) -> int:
        self.calls += 1
        if self.calls > 1:
            raise RuntimeError("hash failed")
        return 12345


class BadEq:
    """Collides with every other BadEq and cannot be compared."""

    def __hash__(self) -> int:
        return 777

    def __eq__(self, other: object) -> bool:
        if other is self:
            return True
        raise RuntimeError("eq failed")


def test_failing_hash_or_eq_changes_nothing() -> None:
    trie = populated()
    first = BadEq()
    trie.add("e/q", first)
    before = snapshot(trie)
    with pytest.raises(RuntimeError, match="hash failed"):
        trie.add("new/filter/+", FlakyHash())
    assert snapshot(trie) == before
    for call in (
        lambda k: trie.add("a/b", k),
        lambda k: trie.add("fresh", k),
        lambda k: trie.remove("e/q", k),
        trie.remove_key,
        trie.filters_of,
    ):
        with pytest.raises(RuntimeError, match="eq failed"):
            call(BadEq())
        assert snapshot(trie) == before
    # the trie still works, and the id the failed key got is reused cleanly
    for i in range(5):
        assert trie.add(f"after/{i}", ("after", i))
    assert set(trie.match("after/3")) == {("after", 3), "all"}
    assert trie.remove_key(first) == 1


class ReentrantKey:
    """A key whose __hash__ calls back into the trie (once armed)."""

    def __init__(self, action: Callable[[], Any]) -> None:
        self.action = action
        self.armed = False
        self.seen: list[Any] = []

    def __hash__(self) -> int:
        if self.armed:
            try:
                self.seen.append(self.action())
            except RuntimeError as exc:
                self.seen.append(exc)
                raise
        return 4242

    def __eq__(self, other: object) -> bool:
        return other is self


@pytest.mark.parametrize("method", ["add", "remove", "remove_key", "filters_of"])
@pytest.mark.parametrize("action", ["clear", "add", "remove", "remove_key"])
def test_reentry_from_a_key_hash_is_refused(method: str, action: str) -> None:
    # Before the re-entry guard, a key's __hash__ calling trie.clear() during add() crashed the
    # interpreter (stale key ids indexed the new containers without bounds checks).
    trie = TopicTrie()
    for i in range(100):
        trie.add(f"p/{i}", i)
    actions: dict[str, Callable[[], Any]] = {
        "clear": trie.clear,
        "add": lambda: trie.add("other", "x"),
        "remove": lambda: trie.remove("p/1", 1),
        "remove_key": lambda: trie.remove_key(2),
    }
    key = ReentrantKey(actions[action])
    trie.add("k/+", key)
    before = snapshot(trie)
    key.armed = True
    calls: dict[str, Callable[[], Any]] = {
        "add": lambda: trie.add("k/new", key),
        "remove": lambda: trie.remove("k/+", key),
        "remove_key": lambda: trie.remove_key(key),
        "filters_of": lambda: trie.filters_of(key),
    }
    with pytest.raises(RuntimeError, match="while one of its calls is running"):
        calls[method]()
    assert isinstance(key.seen[0], RuntimeError)
    key.armed = False
    assert snapshot(trie) == before
    # read-only calls from a __hash__ are fine
    key.action = lambda: (trie.match("p/5"), len(trie), list(trie)[:1], "k/+" in trie)
    key.armed = True
    assert trie.filters_of(key) == ["k/+"]
    assert key.seen[-1] == ([5], 101, ["p/0"], True)


def test_a_released_key_may_call_the_trie_from_its_finaliser() -> None:
    trie = TopicTrie()
    log: list[Any] = []

    class Finalised:
        def __del__(self) -> None:
            log.append(trie.match("a"))
            trie.add("late", "from __del__")

    trie.add("a", Finalised())  # the trie holds the only reference
    trie.add("a", "other")
    assert trie.remove("a", next(k for k in trie.match("a") if k != "other"))
    assert log == [["other"]]
    assert trie.match("late") == ["from __del__"] and len(trie) == 2
    trie.add("b", Finalised())
    assert trie.remove_key(next(k for k in trie.match("b"))) == 1
    assert len(log) == 2 and len(trie) == 2
    trie.add("c", Finalised())
    trie.clear()  # the finaliser runs on the new, empty trie
    assert len(log) == 3 and list(trie) == ["late"]


# ---------------------------------------------------------------------------------------------
# Random operations against the model

LEVELS = ["", "$SYS", "$x", "a", "b", "é", "日本", "x" * 25]
FILTER_LEVELS = [*LEVELS, "+"]
filters = st.one_of(
    st.builds(
        lambda lv, pound: "/".join([*lv, "#"] if pound else lv),
        st.lists(st.sampled_from(FILTER_LEVELS), min_size=1, max_size=4),
        st.booleans(),
    ).filter(bool),
    st.sampled_from(["#", "+", "/", "+/#", "$SYS/#"]),
)
topics = st.lists(st.sampled_from(LEVELS), min_size=1, max_size=5).map("/".join)
keys = st.sampled_from([0, 1, 2, "k", ("t", 1), frozenset({1}), None, 2.5])
bad_strings = st.sampled_from(
    ["", "a+", "a/#/b", "#a", "a\x00", "\ud800", "$share/g/a", "$share/", "a/+", "#"]
)
non_str = st.sampled_from([None, b"a", 3, ["a"]])


def prefixes(filters_: list[str]) -> set[tuple[str, ...]]:
    """The trie nodes the model's filters need: every non-empty level prefix."""
    out: set[tuple[str, ...]] = set()
    for f in filters_:
        lv = f.split("/")
        out |= {tuple(lv[:i]) for i in range(1, len(lv) + 1)}
    return out


class TrieMachine(RuleBasedStateMachine):
    """add / remove / remove_key / clear / queries on the trie and the model, including
    invalid input; every answer, error and count compared after every step."""

    @initialize()
    def start(self) -> None:
        self.trie = TopicTrie()
        self.model = ModelTrie()

    def both(self, method: str, *args: Any) -> Any:
        try:
            expected = getattr(self.model, method)(*args)
        except ModelError as exc:
            with pytest.raises(ValueError) as info:
                getattr(self.trie, method)(*args)
            assert_rule(info.value, exc.rule)
            return None
        except TypeError:
            with pytest.raises(TypeError):
                getattr(self.trie, method)(*args)
            return None
        got = getattr(self.trie, method)(*args)
        return got, expected

    @stateful.rule(filt=filters, key=keys)
    def add(self, filt: str, key: Hashable) -> None:
        got, expected = self.both("add", filt, key)
        assert got is expected

    @stateful.rule(filt=filters, key=keys)
    def remove(self, filt: str, key: Hashable) -> None:
        got, expected = self.both("remove", filt, key)
        assert got is expected

    @stateful.rule(key=keys)
    def remove_key(self, key: Hashable) -> None:
        got, expected = self.both("remove_key", key)
        assert got == expected

    @stateful.rule(bad=bad_strings, key=keys | st.just([]))
    def add_or_remove_bad(self, bad: str, key: Any) -> None:
        for method in ("add", "remove"):  # some of these strings are valid filters after all
            result = self.both(method, bad, key)
            if result is not None:
                assert result[0] is result[1]

    @stateful.rule(filt=filters, key=st.sampled_from([[], {}]))
    def unhashable(self, filt: str, key: Any) -> None:
        assert self.both("add", filt, key) is None
        assert self.both("remove", filt, key) is None

    @stateful.rule(bad=non_str)
    def wrong_type(self, bad: Any) -> None:
        for call in (self.trie.match, self.trie.__contains__, lambda s: self.trie.add(s, 1)):
            with pytest.raises(TypeError):
                call(bad)

    @stateful.rule(topic=topics | bad_strings)
    def match(self, topic: str) -> None:
        result = self.both("match", topic)
        if result is not None:
            got, expected = result
            assert len(got) == len(set(got))
            assert set(got) == set(expected)
        result = self.both("match_filters", topic)
        if result is not None:
            got, expected = result
            assert sorted(got) == sorted(expected)

    @stateful.rule(filt=filters | bad_strings)
    def subscribers(self, filt: str) -> None:
        result = self.both("subscribers", filt)
        if result is not None:
            got, expected = result
            assert len(got) == len(set(got)) and set(got) == set(expected)

    @stateful.rule(key=keys)
    def filters_of(self, key: Hashable) -> None:
        got, expected = self.both("filters_of", key)
        assert sorted(got) == sorted(expected)

    @stateful.rule()
    def clear(self) -> None:
        self.trie.clear()
        self.model.clear()

    @invariant()
    def same_contents(self) -> None:
        listed = list(self.trie)
        assert len(listed) == len(set(listed))
        assert sorted(listed) == sorted(self.model)
        assert len(self.trie) == len(self.model)
        for f in listed:
            assert f in self.trie
            assert set(self.trie.subscribers(f)) == set(self.model.subs[f])
        s = self.trie.stats()
        assert s["subscriptions"] == len(self.model)
        assert s["filters"] == len(self.model.subs)
        assert s["keys"] == len(self.model.keys())
        nodes = prefixes(listed)
        assert s["nodes"] == self.trie.node_count == len(nodes)
        assert s["edges"] == sum(1 for p in nodes if p[-1] not in ("+", "#"))
        for topic in PROBES:
            got = self.trie.match(topic)
            assert len(got) == len(set(got)) and set(got) == set(self.model.match(topic))


TestTrieMachine = TrieMachine.TestCase


# The validators against the model's, on random strings that break every rule
TOKENS = ["/", "+", "#", "\x00", "$", "a", "é", "\ud800", "$share/", "b/", "日"]
strings = st.lists(st.sampled_from(TOKENS), max_size=12).map("".join)


@given(s=strings)
def test_validators_agree_with_the_model(s: str) -> None:
    cases: list[tuple[Callable[[str], Any], str | None]] = [
        (validate_topic, model.topic_error(s)),
        (validate_filter, model.filter_error(s)),
    ]
    for check, rule in cases:
        if rule is None:
            assert check(s) is None
        else:
            with pytest.raises(ValueError) as info:
                check(s)
            assert_rule(info.value, rule)
    expected = model.parse_shared(s)
    if isinstance(expected, str):
        with pytest.raises(ValueError):
            parse_shared(s)
    else:
        assert parse_shared(s) == expected
    trie = TopicTrie()
    rule = model.add_error(s)
    if rule is None:
        assert trie.add(s, 1) and s in trie
    else:
        with pytest.raises(ValueError) as info:
            trie.add(s, 1)
        assert_rule(info.value, rule)
        assert len(trie) == 0 and trie.stats()["nodes"] == 0


@given(
    subs=st.lists(st.tuples(filters, st.integers(0, 3)), max_size=25),
    topic=topics.filter(bool),
)
def test_match_agrees_with_the_model(subs: list[tuple[str, int]], topic: str) -> None:
    trie, ref = TopicTrie(), ModelTrie()
    for f, k in subs:
        assert trie.add(f, k) is ref.add(f, k)
    got = trie.match(topic)
    assert len(got) == len(set(got)) and set(got) == set(ref.match(topic))
    assert sorted(trie.match_filters(topic)) == sorted(ref.match_filters(topic))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_many_filters_added_and_removed_in_random_order(seed: int) -> None:
    """Hundreds of exact edges under few parents: the edge table grows and has entries
    deleted (backward shift) in random order; every remaining filter must stay findable."""
    rng = random.Random(seed)
    words = [f"w{rng.randrange(10**6)}" for _ in range(40)] + ["", "é"]
    trie, live = TopicTrie(), {}
    for i in range(1500):
        f = "/".join(rng.choice(words) for _ in range(rng.randint(1, 3))) or "e"
        if rng.random() < 0.3:
            f += "/#"
        trie.add(f, i % 7)
        live.setdefault(f, set()).add(i % 7)
    order = [(f, k) for f, ks in live.items() for k in ks]
    rng.shuffle(order)
    for n, (f, k) in enumerate(order):
        assert trie.remove(f, k)
        live[f].discard(k)
        if not live[f]:
            del live[f]
        if n % 150 == 0:
            assert sorted(trie) == sorted(live)
            assert all(f in trie for f in live)
            assert trie.node_count == len(prefixes(list(live)))
            t = "/".join(rng.choice(words) for _ in range(2))
            exp = {k for f, ks in live.items() if model.matches(f, t) for k in ks}
            assert set(trie.match(t)) == exp
    assert len(trie) == 0 and trie.node_count == 0


# ---------------------------------------------------------------------------------------------
# Garbage collection and leaks


class Key:
    pass


def test_keys_are_released_after_remove_remove_key_clear_and_del() -> None:
    trie = TopicTrie()
    k1, k2, k3, k4 = Key(), Key(), Key(), Key()
    refs = [weakref.ref(k) for k in (k1, k2, k3, k4)]
    for f in ("a", "a/+", "#"):
        trie.add(f, k1)
        trie.add(f, k2)
    trie.add("c", k3)
    holder = TopicTrie()
    holder.add("d", k4)
    del k1, k2, k3, k4
    gc.collect()
    assert all(r() is not None for r in refs)  # the tries keep them alive
    for f in ("a", "a/+", "#"):
        assert trie.remove(f, refs[0]())
    gc.collect()
    assert refs[0]() is None  # released by remove
    assert trie.remove_key(refs[1]()) == 3
    gc.collect()
    assert refs[1]() is None  # released by remove_key
    trie.clear()
    gc.collect()
    assert refs[2]() is None  # released by clear
    del holder
    gc.collect()
    assert refs[3]() is None  # released with the trie


def test_a_cycle_through_a_key_is_collectable() -> None:
    def make() -> weakref.ref[Key]:
        trie = TopicTrie()
        key = Key()
        key.trie = trie  # type: ignore[attr-defined]  # key -> trie -> key
        trie.add("a/#", key)
        trie.add("b", (key, "tuple"))
        return weakref.ref(key)

    with gc_disabled():
        ref = make()
        assert ref() is not None  # kept alive by the cycle alone
        gc.collect()
        assert ref() is None


def test_add_remove_loop_leaves_the_trie_as_it_was() -> None:
    trie = TopicTrie()
    for i in range(50):
        trie.add(f"base/{i}/+", i)

    def cycle(i: int) -> None:
        f = f"x/{i % 97}/+/{'é' * (i % 30)}/#"
        assert trie.add(f, ("key", i))
        assert trie.add(f"base/{i % 50}/+", ("key", i))
        assert len(trie.match(f"x/{i % 97}/q/{'é' * (i % 30)}")) == 1
        assert trie.remove(f, ("key", i))
        assert trie.remove_key(("key", i)) == 1

    cycle(0)
    start = trie.stats()
    for i in range(10_000):
        cycle(i)
    assert trie.stats() == start  # nodes, edges, keys and every capacity back where they were
    assert trie.node_count == start["nodes"]
