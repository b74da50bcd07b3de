"""Topic edge-case tables of EMQX and Mosquitto, ported row by row.

Sources (each row's comment names the file and test function):
- EMQX ``apps/emqx/test/emqx_topic_SUITE.erl`` (``match(Topic, Filter)``, ``validate/1``,
  ``parse/1``, ``words/1``, ``levels/1``);
- Mosquitto ``test/unit/util_topic_test.c`` (``mosquitto_topic_matches_sub(sub, topic)``,
  ``mosquitto_pub_topic_check``, ``mosquitto_sub_topic_check``, ``mosquitto_sub_matches_acl``)
  and ``test/lib/c/09-util-topic-tokenise.c`` (``mosquitto_sub_topic_tokenise``).

Every row is checked against the compiled ``TopicTrie`` / ``validate_*`` / ``parse_shared``
*and* against the model (tests/models/trie_model.py), so the tables also pin the model down.
Where a reference deliberately differs from MQTT 5 we follow MQTT 5; such rows say so with
"DIFFERS:" in their comment.  Rows about features we do not have (filter-vs-filter ACL
matching, filter intersection/union, ``%c``/``%u`` patterns, ``$SYS`` topic builders) are not
ported; the comments at the end of each table say which.
"""

from __future__ import annotations

import re

import pytest

from macula import TopicTrie, parse_shared, validate_filter, validate_topic
from tests.models import trie_model as model
from tests.models.trie_model import RULE_PATTERNS

EMQX = "emqx_topic_SUITE.erl"
MOSQ = "util_topic_test.c"
MOSQ_TOK = "09-util-topic-tokenise.c"


def row(src: str, fn: str, *values: object) -> object:
    """A pytest.param with a readable id: ``<test function>:<values>``."""
    shown = ",".join(repr(v)[:40] for v in values)
    short = "emqx" if src == EMQX else "mosquitto"
    return pytest.param(*values, id=f"{short}:{fn}:{shown}")


# ---------------------------------------------------------------------------------------------
# Matching: (filter, topic, expected)

MATCH_ROWS = [
    # EMQX emqx_topic_SUITE.erl t_match1 (match(Topic, Filter): arguments swapped here)
    row(EMQX, "t_match1", "a/b/+", "a/b/c", True),
    row(EMQX, "t_match1", "a/#", "a/b/c", True),
    row(EMQX, "t_match1", "#", "abcd/ef/g", True),
    row(EMQX, "t_match1", "abc/de/f", "abc/de/f", True),
    row(EMQX, "t_match1", "+", "abc", True),
    row(EMQX, "t_match1", "a/b/c", "a/b/c", True),
    row(EMQX, "t_match1", "a/c/d", "a/b/c", False),
    row(EMQX, "t_match1", "+", "$share/x/y", False),
    row(EMQX, "t_match1", "+/x/y", "$share/x/y", False),
    row(EMQX, "t_match1", "#", "$share/x/y", False),
    row(EMQX, "t_match1", "+/+/#", "$share/x/y", False),
    row(EMQX, "t_match1", "house/+", "house/1/sensor/0", False),
    row(EMQX, "t_match1", "house/+", "house", False),
    # EMQX emqx_topic_SUITE.erl t_match2
    row(EMQX, "t_match2", "sport/tennis/player1/#", "sport/tennis/player1", True),
    row(EMQX, "t_match2", "sport/tennis/player1/#", "sport/tennis/player1/ranking", True),
    row(EMQX, "t_match2", "sport/tennis/player1/#", "sport/tennis/player1/score/wimbledon", True),
    row(EMQX, "t_match2", "sport/#", "sport", True),
    row(EMQX, "t_match2", "#", "sport", True),
    row(EMQX, "t_match2", "#", "/sport/football/score/1", True),
    row(EMQX, "t_match2", "+/+", "Topic/C", True),
    row(EMQX, "t_match2", "+/+", "TopicA/B", True),
    row(EMQX, "t_match2", "+/+", "TopicA/C", True),
    row(EMQX, "t_match2", "+", "abc", True),
    row(EMQX, "t_match2", "a/b/c", "a/b/c", True),
    row(EMQX, "t_match2", "a/c/d", "a/b/c", False),
    row(EMQX, "t_match2", "+", "$share/x/y", False),
    row(EMQX, "t_match2", "+/x/y", "$share/x/y", False),
    row(EMQX, "t_match2", "#", "$share/x/y", False),
    row(EMQX, "t_match2", "+/+/#", "$share/x/y", False),
    row(EMQX, "t_match2", "house/+", "house/1/sensor/0", False),
    # EMQX emqx_topic_SUITE.erl t_match3 ('$' only matters in the first level)
    row(EMQX, "t_match3", "device/60019423a83c/#", "device/60019423a83c/fw", True),
    row(EMQX, "t_match3", "device/60019423a83c/#", "device/60019423a83c/$fw", True),
    row(EMQX, "t_match3", "device/60019423a83c/$fw/#", "device/60019423a83c/$fw/fw", True),
    row(EMQX, "t_match3", "device/60019423a83c/#", "device/60019423a83c/fw/checksum", True),
    row(EMQX, "t_match3", "device/60019423a83c/#", "device/60019423a83c/$fw/checksum", True),
    row(EMQX, "t_match3", "device/60019423a83c/#", "device/60019423a83c/dust/type", True),
    # EMQX emqx_topic_SUITE.erl t_sigle_level_match
    row(EMQX, "t_sigle_level_match", "sport/tennis/+", "sport/tennis/player1", True),
    row(EMQX, "t_sigle_level_match", "sport/tennis/+", "sport/tennis/player1/ranking", False),
    row(EMQX, "t_sigle_level_match", "sport/+", "sport", False),
    row(EMQX, "t_sigle_level_match", "sport/+", "sport/", True),
    row(EMQX, "t_sigle_level_match", "+/+", "/finance", True),
    row(EMQX, "t_sigle_level_match", "/+", "/finance", True),
    row(EMQX, "t_sigle_level_match", "+", "/finance", False),
    row(EMQX, "t_sigle_level_match", "/devices/+", "/devices/$dev1", True),
    row(EMQX, "t_sigle_level_match", "/devices/+/online", "/devices/$dev1/online", True),
    # EMQX emqx_topic_SUITE.erl t_sys_match
    row(EMQX, "t_sys_match", "$SYS/#", "$SYS/broker/clients/testclient", True),
    row(EMQX, "t_sys_match", "$SYS/+", "$SYS/broker", True),
    row(EMQX, "t_sys_match", "+/+", "$SYS/broker", False),
    row(EMQX, "t_sys_match", "#", "$SYS/broker", False),
    # EMQX emqx_topic_SUITE.erl 't_#_match'
    row(EMQX, "t_#_match", "#", "a/b/c", True),
    row(EMQX, "t_#_match", "+/#", "a/b/c", True),
    row(EMQX, "t_#_match", "#", "$SYS/brokers", False),
    row(EMQX, "t_#_match", "a/b/#", "a/b/$c", True),
    row(EMQX, "t_#_match", "a/#", "a/b/$c", True),
    # EMQX emqx_topic_SUITE.erl t_match_tokens (tokens(Topic) vs words(Filter))
    row(EMQX, "t_match_tokens", "a/+/c", "a/b/c", True),
    row(EMQX, "t_match_tokens", "a/+/c", "a//c", True),
    row(EMQX, "t_match_tokens", "a/+/c", "a//c/", False),
    row(EMQX, "t_match_tokens", "a/+/c/#", "a//c/", True),
    # EMQX emqx_topic_SUITE.erl t_match_perf (the two match rows; the timing is not ported)
    row(EMQX, "t_match_perf", "a/#", "a/b/ccc", True),
    row(
        EMQX,
        "t_match_perf",
        "/abkc/19383/+/akakdkkdkak/#",
        "/abkc/19383/192939/akakdkkdkak/xxxyyuya/akakak",
        True,
    ),
    # Not ported from EMQX: t_intersect*, t_sys_intersect, t_union* (filter algebra),
    # t_prepend, t_join, t_systop, t_feed_var (topic builders) - no such API here.
    #
    # Mosquitto util_topic_test.c TEST_valid_matching (match_helper(sub, topic))
    row(MOSQ, "TEST_valid_matching", "foo/#", "foo/", True),
    row(MOSQ, "TEST_valid_matching", "foo/#", "foo", True),
    row(MOSQ, "TEST_valid_matching", "foo//bar", "foo//bar", True),
    row(MOSQ, "TEST_valid_matching", "foo//+", "foo//bar", True),
    row(MOSQ, "TEST_valid_matching", "foo/+/+/baz", "foo///baz", True),
    row(MOSQ, "TEST_valid_matching", "foo/bar/+", "foo/bar/", True),
    row(MOSQ, "TEST_valid_matching", "foo/bar", "foo/bar", True),
    row(MOSQ, "TEST_valid_matching", "foo/+", "foo/bar", True),
    row(MOSQ, "TEST_valid_matching", "foo/+/baz", "foo/bar/baz", True),
    row(MOSQ, "TEST_valid_matching", "A/B/+/#", "A/B/B/C", True),
    row(MOSQ, "TEST_valid_matching", "foo/+/#", "foo/bar/baz", True),
    row(MOSQ, "TEST_valid_matching", "foo/+/#", "foo/bar", True),
    row(MOSQ, "TEST_valid_matching", "#", "foo/bar/baz", True),
    row(MOSQ, "TEST_valid_matching", "#", "foo/bar/baz", True),  # (repeated in the source)
    row(MOSQ, "TEST_valid_matching", "#", "/foo/bar", True),
    row(MOSQ, "TEST_valid_matching", "/#", "/foo/bar", True),
    # Mosquitto util_topic_test.c TEST_valid_no_matching (no_match_helper(SUCCESS, ...))
    row(MOSQ, "TEST_valid_no_matching", "test/6/#", "test/3", False),
    row(MOSQ, "TEST_valid_no_matching", "foo/bar", "foo", False),
    row(MOSQ, "TEST_valid_no_matching", "foo/+", "foo/bar/baz", False),
    row(MOSQ, "TEST_valid_no_matching", "foo/+/baz", "foo/bar/bar", False),
    row(MOSQ, "TEST_valid_no_matching", "foo/+/#", "fo2/bar/baz", False),
    row(MOSQ, "TEST_valid_no_matching", "/#", "foo/bar", False),
    row(MOSQ, "TEST_valid_no_matching", "#", "$SYS/bar", False),
    row(MOSQ, "TEST_valid_no_matching", "$BOB/bar", "$SYS/bar", False),
    # Mosquitto util_topic_test.c TEST_sub_match_acl (sub_match_test(acl, sub, expected)): the
    # rows whose `sub` is a plain topic name.  The other rows ("foo/+/bar" vs "foo/#",
    # "foo/+/ba℞/#" vs "foo/baz/ba℞/+", ".../#", "foo/baz/+/#", "/+//#" vs "/foo///#",
    # "#" vs "#" / "+", "/#" vs "+" / "/+", "/+" vs "#" / "+", "+" vs "#" / "+",
    # "a/b/c/d/e" vs "a/b/c/d/+", "a/b/c/d/" vs "a/b/c/d/+") compare a filter with a filter,
    # which a TopicTrie does not do.
    row(MOSQ, "TEST_sub_match_acl", "foo/+/ba℞/#", "foo/baz/ba℞", True),
    row(MOSQ, "TEST_sub_match_acl", "#", "$SYS/uptime", False),
    row(MOSQ, "TEST_sub_match_acl", "$SYS/#", "$SYS/uptime", True),
    row(MOSQ, "TEST_sub_match_acl", "$SYS/+/#", "$SYS/uptime", True),
    row(MOSQ, "TEST_sub_match_acl", "$SYS/+/#", "$SYS/broker/uptime", True),
    row(MOSQ, "TEST_sub_match_acl", "+/+", "topic/topic", True),
    row(MOSQ, "TEST_sub_match_acl", "+/+", "topic/topic/", False),
    row(MOSQ, "TEST_sub_match_acl", "a/b/c/d/e", "a/b/c/d/e", True),
    row(MOSQ, "TEST_sub_match_acl", "a/b/ /d/e", "a/b/c/d/e", False),
    row(MOSQ, "TEST_sub_match_acl", "a/b/c/d/+", "a/b/c/d/e", True),
    row(MOSQ, "TEST_sub_match_acl", "a/b/c/d/+", "a/b/c/d/", True),
    # Mosquitto util_topic_test.c TEST_acl_pattern_wildcard_wildcard: the one row with a plain
    # topic (the others compare filters with filters).
    row(MOSQ, "TEST_acl_pattern_wildcard_wildcard", "$SYS/#", "$SYS", True),
    # Not ported from Mosquitto: TEST_topic_pattern_*, TEST_acl_pattern_* (%c / %u
    # substitution), the NULL-pointer rows of TEST_*empty_input (see test_null_input).
]


@pytest.mark.parametrize(("filt", "topic", "expected"), MATCH_ROWS)
def test_match_rows(filt: str, topic: str, expected: bool) -> None:
    assert model.matches(filt, topic) is expected
    trie = TopicTrie()
    assert trie.add(filt, "k") is True
    trie.add("never/matches/this", "other")
    assert trie.match(topic) == (["k"] if expected else [])
    assert trie.match_filters(topic) == ([filt] if expected else [])


def test_match_rows_all_in_one_trie() -> None:
    """Every table filter in one trie, each with its own key: each topic's answer is the set
    of the rows' filters that match it (and the model agrees)."""
    rows = [p.values for p in MATCH_ROWS]  # type: ignore[attr-defined]
    trie = TopicTrie()
    ref = model.ModelTrie()
    for filt, _topic, _exp in rows:
        trie.add(filt, filt)
        ref.add(filt, filt)
    for filt, topic, expected in rows:
        got = trie.match(topic)
        assert len(got) == len(set(got))
        assert set(got) == set(ref.match(topic))
        assert (filt in got) is expected
        assert sorted(trie.match_filters(topic)) == sorted(ref.match_filters(topic))


# ---------------------------------------------------------------------------------------------
# Matching with invalid input: (filter, topic, rule the filter breaks, rule the topic breaks)

INVALID_MATCH_ROWS = [
    # Mosquitto util_topic_test.c TEST_invalid_but_matching (no_match_helper(INVAL, sub, topic))
    row(MOSQ, "TEST_invalid_but_matching", "+foo", "+foo", "plus_not_whole", "wildcard_in_topic"),
    row(MOSQ, "TEST_invalid_but_matching", "fo+o", "fo+o", "plus_not_whole", "wildcard_in_topic"),
    row(MOSQ, "TEST_invalid_but_matching", "foo+", "foo+", "plus_not_whole", "wildcard_in_topic"),
    row(
        MOSQ,
        "TEST_invalid_but_matching",
        "+foo/bar",
        "+foo/bar",
        "plus_not_whole",
        "wildcard_in_topic",
    ),
    row(
        MOSQ,
        "TEST_invalid_but_matching",
        "foo+/bar",
        "foo+/bar",
        "plus_not_whole",
        "wildcard_in_topic",
    ),
    row(
        MOSQ,
        "TEST_invalid_but_matching",
        "foo/+bar",
        "foo/+bar",
        "plus_not_whole",
        "wildcard_in_topic",
    ),
    row(
        MOSQ,
        "TEST_invalid_but_matching",
        "foo/bar+",
        "foo/bar+",
        "plus_not_whole",
        "wildcard_in_topic",
    ),
    row(MOSQ, "TEST_invalid_but_matching", "+foo", "afoo", "plus_not_whole", None),
    row(MOSQ, "TEST_invalid_but_matching", "fo+o", "foao", "plus_not_whole", None),
    row(MOSQ, "TEST_invalid_but_matching", "foo+", "fooa", "plus_not_whole", None),
    row(MOSQ, "TEST_invalid_but_matching", "+foo/bar", "afoo/bar", "plus_not_whole", None),
    row(MOSQ, "TEST_invalid_but_matching", "foo+/bar", "fooa/bar", "plus_not_whole", None),
    row(MOSQ, "TEST_invalid_but_matching", "foo/+bar", "foo/abar", "plus_not_whole", None),
    row(MOSQ, "TEST_invalid_but_matching", "foo/bar+", "foo/bara", "plus_not_whole", None),
    row(MOSQ, "TEST_invalid_but_matching", "#foo", "#foo", "pound_not_whole", "wildcard_in_topic"),
    row(MOSQ, "TEST_invalid_but_matching", "fo#o", "fo#o", "pound_not_whole", "wildcard_in_topic"),
    row(MOSQ, "TEST_invalid_but_matching", "foo#", "foo#", "pound_not_whole", "wildcard_in_topic"),
    row(
        MOSQ,
        "TEST_invalid_but_matching",
        "#foo/bar",
        "#foo/bar",
        "pound_not_whole",
        "wildcard_in_topic",
    ),
    row(
        MOSQ,
        "TEST_invalid_but_matching",
        "foo#/bar",
        "foo#/bar",
        "pound_not_whole",
        "wildcard_in_topic",
    ),
    row(
        MOSQ,
        "TEST_invalid_but_matching",
        "foo/#bar",
        "foo/#bar",
        "pound_not_whole",
        "wildcard_in_topic",
    ),
    row(
        MOSQ,
        "TEST_invalid_but_matching",
        "foo/bar#",
        "foo/bar#",
        "pound_not_whole",
        "wildcard_in_topic",
    ),
    row(MOSQ, "TEST_invalid_but_matching", "foo+", "fooa", "plus_not_whole", None),  # (repeated)
    row(MOSQ, "TEST_invalid_but_matching", "foo/+", "foo/+", None, "wildcard_in_topic"),
    row(MOSQ, "TEST_invalid_but_matching", "foo/#", "foo/+", None, "wildcard_in_topic"),
    row(MOSQ, "TEST_invalid_but_matching", "foo/+", "foo/bar/+", None, "wildcard_in_topic"),
    row(MOSQ, "TEST_invalid_but_matching", "foo/#", "foo/bar/+", None, "wildcard_in_topic"),
    row(MOSQ, "TEST_invalid_but_matching", "foo/+", "foo/#", None, "wildcard_in_topic"),
    row(MOSQ, "TEST_invalid_but_matching", "foo/#", "foo/#", None, "wildcard_in_topic"),
    row(MOSQ, "TEST_invalid_but_matching", "foo/+", "foo/bar/#", None, "wildcard_in_topic"),
    row(MOSQ, "TEST_invalid_but_matching", "foo/#", "foo/bar/#", None, "wildcard_in_topic"),
    # Mosquitto util_topic_test.c TEST_invalid
    row(MOSQ, "TEST_invalid", "foo#", "foo", "pound_not_whole", None),
    row(MOSQ, "TEST_invalid", "fo#o/", "foo", "pound_not_whole", None),
    row(MOSQ, "TEST_invalid", "foo#", "fooa", "pound_not_whole", None),
    row(MOSQ, "TEST_invalid", "foo+", "foo", "plus_not_whole", None),
    row(MOSQ, "TEST_invalid", "foo/#a", "foo", "pound_not_whole", None),
    row(MOSQ, "TEST_invalid", "#a", "foo", "pound_not_whole", None),
    row(MOSQ, "TEST_invalid", "foo/#abc", "foo", "pound_not_whole", None),
    row(MOSQ, "TEST_invalid", "#abc", "foo", "pound_not_whole", None),
    row(MOSQ, "TEST_invalid", "/#a", "foo/bar", "pound_not_whole", None),
    # Mosquitto util_topic_test.c TEST_empty_input / TEST_sub_match_empty_input: the rows with
    # empty strings (the NULL rows are in test_null_input).
    row(MOSQ, "TEST_empty_input", "sub", "", None, "empty"),
    row(MOSQ, "TEST_empty_input", "", "topic", "empty", None),
    row(MOSQ, "TEST_empty_input", "", "", "empty", "empty"),
]


def assert_rule(exc: BaseException, rule: str) -> None:
    assert type(exc) is ValueError
    assert re.search(RULE_PATTERNS[rule], str(exc)), (rule, str(exc))


@pytest.mark.parametrize(("filt", "topic", "filter_rule", "topic_rule"), INVALID_MATCH_ROWS)
def test_invalid_match_rows(
    filt: str, topic: str, filter_rule: str | None, topic_rule: str | None
) -> None:
    # Mosquitto answers MOSQ_ERR_INVAL and "no match": here the invalid side raises.
    assert filter_rule is not None or topic_rule is not None
    assert model.filter_error(filt) == filter_rule
    assert model.topic_error(topic) == topic_rule
    trie = TopicTrie()
    trie.add("#", "all")
    if filter_rule is None:
        validate_filter(filt)
        assert trie.add(filt, "k") is True
    else:
        with pytest.raises(ValueError) as info:
            validate_filter(filt)
        assert_rule(info.value, filter_rule)
        with pytest.raises(ValueError) as info:
            trie.add(filt, "k")
        assert_rule(info.value, filter_rule)
        assert list(trie) == ["#"] and len(trie) == 1
    if topic_rule is None:
        validate_topic(topic)
        assert "k" not in trie.match(topic)
    else:
        for call in (validate_topic, trie.match, trie.match_filters):
            with pytest.raises(ValueError) as info:
                call(topic)
            assert_rule(info.value, topic_rule)


@pytest.mark.parametrize("call", ["validate_filter", "validate_topic", "match", "add"])
def test_null_input(call: str) -> None:
    # Mosquitto util_topic_test.c TEST_empty_input: the NULL rows (MOSQ_ERR_INVAL); None is
    # the Python NULL, a wrong type: TypeError.
    trie = TopicTrie()
    fns = {
        "validate_filter": validate_filter,
        "validate_topic": validate_topic,
        "match": trie.match,
        "add": lambda s: trie.add(s, "k"),
    }
    with pytest.raises(TypeError):
        fns[call](None)
    assert len(trie) == 0


# ---------------------------------------------------------------------------------------------
# Validation: (kind, string, rule broken or None)


def long_topic() -> str:
    # EMQX emqx_topic_SUITE.erl long_topic(): "0/1/.../66666/", 454,450 bytes
    return "".join(f"{i}/" for i in range(66667))


VALIDATE_ROWS = [
    # Mosquitto util_topic_test.c TEST_pub_topic_valid (mosquitto_pub_topic_check)
    row(MOSQ, "TEST_pub_topic_valid", "name", "pub/topic", None),
    row(MOSQ, "TEST_pub_topic_valid", "name", "pub//topic", None),
    row(MOSQ, "TEST_pub_topic_valid", "name", "pub/ /topic", None),
    # Mosquitto util_topic_test.c TEST_pub_topic_invalid
    row(MOSQ, "TEST_pub_topic_invalid", "name", "+pub/topic", "wildcard_in_topic"),
    row(MOSQ, "TEST_pub_topic_invalid", "name", "pub+/topic", "wildcard_in_topic"),
    row(MOSQ, "TEST_pub_topic_invalid", "name", "pub/+topic", "wildcard_in_topic"),
    row(MOSQ, "TEST_pub_topic_invalid", "name", "pub/topic+", "wildcard_in_topic"),
    row(MOSQ, "TEST_pub_topic_invalid", "name", "pub/topic/+", "wildcard_in_topic"),
    row(MOSQ, "TEST_pub_topic_invalid", "name", "#pub/topic", "wildcard_in_topic"),
    row(MOSQ, "TEST_pub_topic_invalid", "name", "pub#/topic", "wildcard_in_topic"),
    row(MOSQ, "TEST_pub_topic_invalid", "name", "pub/#topic", "wildcard_in_topic"),
    row(MOSQ, "TEST_pub_topic_invalid", "name", "pub/topic#", "wildcard_in_topic"),
    row(MOSQ, "TEST_pub_topic_invalid", "name", "pub/topic/#", "wildcard_in_topic"),
    row(MOSQ, "TEST_pub_topic_invalid", "name", "+/pub/topic", "wildcard_in_topic"),
    # Mosquitto util_topic_test.c TEST_sub_topic_valid (mosquitto_sub_topic_check)
    row(MOSQ, "TEST_sub_topic_valid", "filter", "sub/topic", None),
    row(MOSQ, "TEST_sub_topic_valid", "filter", "sub//topic", None),
    row(MOSQ, "TEST_sub_topic_valid", "filter", "sub/ /topic", None),
    row(MOSQ, "TEST_sub_topic_valid", "filter", "sub/+/topic", None),
    row(MOSQ, "TEST_sub_topic_valid", "filter", "+/+/+", None),
    row(MOSQ, "TEST_sub_topic_valid", "filter", "+", None),
    row(MOSQ, "TEST_sub_topic_valid", "filter", "sub/topic/#", None),
    row(MOSQ, "TEST_sub_topic_valid", "filter", "sub//topic/#", None),
    row(MOSQ, "TEST_sub_topic_valid", "filter", "sub/ /topic/#", None),
    row(MOSQ, "TEST_sub_topic_valid", "filter", "sub/+/topic/#", None),
    row(MOSQ, "TEST_sub_topic_valid", "filter", "+/+/+/#", None),
    row(MOSQ, "TEST_sub_topic_valid", "filter", "#", None),
    # Mosquitto util_topic_test.c TEST_sub_topic_invalid
    row(MOSQ, "TEST_sub_topic_invalid", "filter", "+sub/topic", "plus_not_whole"),
    row(MOSQ, "TEST_sub_topic_invalid", "filter", "sub+/topic", "plus_not_whole"),
    row(MOSQ, "TEST_sub_topic_invalid", "filter", "sub/+topic", "plus_not_whole"),
    row(MOSQ, "TEST_sub_topic_invalid", "filter", "sub/topic+", "plus_not_whole"),
    row(MOSQ, "TEST_sub_topic_invalid", "filter", "#sub/topic", "pound_not_whole"),
    row(MOSQ, "TEST_sub_topic_invalid", "filter", "sub#/topic", "pound_not_whole"),
    row(MOSQ, "TEST_sub_topic_invalid", "filter", "sub/#topic", "pound_not_whole"),
    row(MOSQ, "TEST_sub_topic_invalid", "filter", "sub/topic#", "pound_not_whole"),
    row(MOSQ, "TEST_sub_topic_invalid", "filter", "#/sub/topic", "pound_not_last"),
    # EMQX emqx_topic_SUITE.erl t_validate (validate(Bin) means {filter, Bin})
    row(EMQX, "t_validate", "filter", "a/+/#", None),
    row(EMQX, "t_validate", "filter", "a/b/c/d", None),
    row(EMQX, "t_validate", "name", "abc/de/f", None),
    row(EMQX, "t_validate", "filter", "abc/+/f", None),
    row(EMQX, "t_validate", "filter", "abc/#", None),
    row(EMQX, "t_validate", "filter", "x", None),
    row(EMQX, "t_validate", "name", "x//y", None),
    row(EMQX, "t_validate", "filter", "sport/tennis/#", None),
    row(EMQX, "t_validate", "name", "", "empty"),  # empty_topic [MQTT-4.7.3-1]
    row(EMQX, "t_validate", "filter", "", "empty"),
    row(EMQX, "t_validate", "name", "abc/#", "wildcard_in_topic"),  # topic_name_error
    row(EMQX, "t_validate", "name", long_topic(), "too_long"),  # topic_too_long
    row(EMQX, "t_validate", "filter", "abc/#xzy/+", "pound_not_whole"),  # topic_invalid_char
    row(EMQX, "t_validate", "filter", "abc/xzy/+9827", "plus_not_whole"),  # topic_invalid_char
    row(EMQX, "t_validate", "filter", "sport/tennis#", "pound_not_whole"),  # topic_invalid_char
    row(EMQX, "t_validate", "filter", "abc/#/1", "pound_not_last"),  # 'topic_invalid_#'
    row(EMQX, "t_validate", "filter", "sport/tennis/#/ranking", "pound_not_last"),
    # [MQTT-4.8.2-1].  DIFFERS (wording only): EMQX reports SHARE_EMPTY_FILTER for "$share/"
    # and "$share//"; we say "needs a share name and a filter" for "$share/" and report the
    # empty share name of "$share//" first (it is checked before the filter).  Both invalid.
    row(EMQX, "t_validate", "filter", "$share/", "share_form"),
    row(EMQX, "t_validate", "filter", "$share//", "share_empty_group"),
    row(EMQX, "t_validate", "filter", "$share//t", "share_empty_group"),
    row(EMQX, "t_validate", "filter", "$share//test", "share_empty_group"),
    # [MQTT-4.7.3-1] for the filter of a shared subscription
    row(EMQX, "t_validate", "filter", "$share/g/", "empty"),
    row(EMQX, "t_validate", "filter", "$share/g2/", "empty"),
    # [MQTT-4.8.2-2]
    row(EMQX, "t_validate", "filter", "$share/p+q/1", "share_group_wildcard"),
    row(EMQX, "t_validate", "filter", "$share/m+/1", "share_group_wildcard"),
    row(EMQX, "t_validate", "filter", "$share/+n/1", "share_group_wildcard"),
    row(EMQX, "t_validate", "filter", "$share/x#y/1", "share_group_wildcard"),
    row(EMQX, "t_validate", "filter", "$share/x#/1", "share_group_wildcard"),
    row(EMQX, "t_validate", "filter", "$share/#y/1", "share_group_wildcard"),
    # share recursively
    row(EMQX, "t_validate", "filter", "$share/g1/$share/t", "share_recursive"),
    row(EMQX, "t_validate", "filter", "$share/g1/topic/$share", None),
    # EMQX emqx_topic_SUITE.erl t_sigle_level_validate
    row(EMQX, "t_sigle_level_validate", "filter", "+", None),
    row(EMQX, "t_sigle_level_validate", "filter", "+/tennis/#", None),
    row(EMQX, "t_sigle_level_validate", "filter", "sport/+/player1", None),
    row(EMQX, "t_sigle_level_validate", "filter", "sport+", "plus_not_whole"),
]


@pytest.mark.parametrize(("kind", "text", "rule"), VALIDATE_ROWS)
def test_validate_rows(kind: str, text: str, rule: str | None) -> None:
    check = validate_topic if kind == "name" else validate_filter
    model_check = model.topic_error if kind == "name" else model.filter_error
    assert model_check(text) == rule
    if rule is None:
        assert check(text) is None
    else:
        with pytest.raises(ValueError) as info:
            check(text)
        assert_rule(info.value, rule)
    if kind == "filter" and rule is None and not text.startswith("$share/"):
        trie = TopicTrie()
        assert trie.add(text, 1) and text in trie and trie.subscribers(text) == [1]


# ---------------------------------------------------------------------------------------------
# Shared subscriptions: parse_shared(string) -> (group, filter) | None | rule broken

PARSE_ROWS = [
    # EMQX emqx_topic_SUITE.erl t_parse.  DIFFERS: EMQX parses "$queue/<filter>" as a shared
    # subscription of group "$queue" (an EMQX extension); MQTT 5 knows only "$share/", so
    # "$queue/t" is a plain filter here (and #share{group = <<"$queue">>, topic = <<"$queue/t">>}
    # has no MQTT 5 spelling).
    row(EMQX, "t_parse", "$queue/t", None),
    # #share{group = <<"g">>, topic = <<"$share/g/t">>} spelled as one filter
    row(EMQX, "t_parse", "$share/g/$share/g/t", "share_recursive"),
    row(EMQX, "t_parse", "$share/t", "share_form"),
    row(EMQX, "t_parse", "$share/+/t", "share_group_wildcard"),
    row(EMQX, "t_parse", "a/b/+/#", None),
    row(EMQX, "t_parse", "$queue/topic", None),  # DIFFERS: see "$queue/t" above
    row(EMQX, "t_parse", "$share/group/topic", ("group", "topic")),
    # '$local' and '$fastlane' (deprecated in EMQX) are plain filters, as in EMQX
    row(EMQX, "t_parse", "$local/topic", None),
    row(EMQX, "t_parse", "$local/$queue/topic", None),
    row(EMQX, "t_parse", "$local/$share/group/a/b/c", None),
    row(EMQX, "t_parse", "$fastlane/topic", None),
]


@pytest.mark.parametrize(("text", "expected"), PARSE_ROWS)
def test_parse_rows(text: str, expected: object) -> None:
    assert model.parse_shared(text) == expected
    if isinstance(expected, str):
        with pytest.raises(ValueError) as info:
            parse_shared(text)
        assert_rule(info.value, expected)
    else:
        assert parse_shared(text) == expected
    trie = TopicTrie()
    if expected is None:  # a plain filter: it can be subscribed and it matches itself
        assert trie.add(text, "k")
        assert trie.match(text.replace("+", "x").replace("#", "y")) == ["k"]
    else:  # the trie takes the inner filter only (the control plane keeps the groups)
        with pytest.raises(ValueError):
            trie.add(text, "k")
        assert len(trie) == 0 and trie.stats()["nodes"] == 0


# ---------------------------------------------------------------------------------------------
# Tokenisation: (string, its levels)

TOKENISE_ROWS = [
    # Mosquitto 09-util-topic-tokenise.c (mosquitto_sub_topic_tokenise).  Mosquitto returns
    # NULL for an empty level; here an empty level is the empty string "".
    row(MOSQ_TOK, "main", "topic", ["topic"]),
    row(MOSQ_TOK, "main", "a/deep/topic/hierarchy", ["a", "deep", "topic", "hierarchy"]),
    row(MOSQ_TOK, "main", "/a/deep/topic/hierarchy", ["", "a", "deep", "topic", "hierarchy"]),
    row(MOSQ_TOK, "main", "a/b/c", ["a", "b", "c"]),
    row(MOSQ_TOK, "main", "/a/b/c", ["", "a", "b", "c"]),
    row(MOSQ_TOK, "main", "a///hierarchy", ["a", "", "", "hierarchy"]),
    row(MOSQ_TOK, "main", "/a///hierarchy", ["", "a", "", "", "hierarchy"]),
    row(MOSQ_TOK, "main", "/a///hierarchy/", ["", "a", "", "", "hierarchy", ""]),
    # EMQX emqx_topic_SUITE.erl t_words / t_tokens / t_levels / t_join
    row(EMQX, "t_words", "/a/+/#", ["", "a", "+", "#"]),
    row(
        EMQX,
        "t_words",
        "/abkc/19383/+/akakdkkdkak/#",
        ["", "abkc", "19383", "+", "akakdkkdkak", "#"],
    ),
    row(EMQX, "t_tokens", "a/b/+/#", ["a", "b", "+", "#"]),
    row(EMQX, "t_levels", "a/+/#", ["a", "+", "#"]),
    row(EMQX, "t_levels", "a/b/c/d", ["a", "b", "c", "d"]),
    row(EMQX, "t_join", "/ab/cd/ef/", ["", "ab", "cd", "ef", ""]),
    row(EMQX, "t_join", "ab/+/#", ["ab", "+", "#"]),
]


@pytest.mark.parametrize(("text", "levels"), TOKENISE_ROWS)
def test_tokenise_rows(text: str, levels: list[str]) -> None:
    """The trie splits ``text`` into exactly these levels: a topic of the same levels (the
    wildcards replaced) matches the filter, and so does '+/+/...' of that many levels only."""
    assert text.split("/") == levels
    validate_filter(text)
    trie = TopicTrie()
    trie.add(text, "exact")
    for n in range(1, len(levels) + 3):
        trie.add("/".join(["+"] * n), n)
    topic = "/".join("x" if lv in ("+", "#") else lv for lv in levels)
    got = set(trie.match(topic))
    assert got == {"exact", len(levels)}
    if levels[-1] == "#":  # '#' also matches the parent: one level fewer
        parent = "/".join("x" if lv == "+" else lv for lv in levels[:-1])
        assert set(trie.match(parent)) == {"exact", len(levels) - 1}
