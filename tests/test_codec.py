"""The batch frame codec (BatchEncoder, FrameDecoder, FrameError) against its model.

tests/models/codec_model.py is the obviously-correct version of the format; every test here
either checks an edge case by hand or drives the compiled codec and the model with the same
random operations and compares every answer.
"""

from __future__ import annotations

import array
import contextlib
import gc
import pickle
import sys
import tracemalloc
import weakref
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from macula import BatchEncoder, FrameDecoder, FrameError
from macula._ext import codec
from tests.gc_util import gc_disabled, gc_every_allocation, traced_growth
from tests.models.codec_model import (
    DEFAULT_MAX_FRAME,
    FRAME_LIMIT,
    ModelDecoder,
    ModelEncoder,
    ModelFrameError,
    encode_prefix,
    frame,
)

DOCS = Path(__file__).resolve().parent.parent / "docs" / "FRAMES.md"


class Msg(msgspec.Struct, array_like=True):
    topic: str
    qos: int
    mid: int
    payload: bytes


def feed_all(dec: Any, data: bytes, cuts: list[int]) -> list[bytes]:
    """Feed ``data`` cut at the given offsets (sorted, deduplicated); all frames as bytes."""
    out: list[bytes] = []
    prev = 0
    for cut in [*sorted(set(c for c in cuts if 0 < c < len(data))), len(data)]:
        out += [bytes(f) for f in dec.feed(data[prev:cut])]
        prev = cut
    return out


def same_error(exc: BaseException, model_exc: ModelFrameError) -> None:
    assert type(exc) is FrameError
    assert str(exc) == str(model_exc)
    assert exc.offset == model_exc.offset
    assert [bytes(f) for f in exc.frames] == model_exc.frames


# ---------------------------------------------------------------------------------------------
# The format: test vectors (the same hex strings are published in docs/FRAMES.md)

VECTORS: list[tuple[str, list[bytes], str]] = [
    ("one empty frame", [b""], "00"),
    ("one byte", [b"\x2a"], "01 2a"),
    ("msgpack 'hi', then msgpack 1", [b"\xa2hi", b"\x01"], "03 a2 68 69 01 01"),
    ("127-byte body: 1-byte prefix", [b"\xaa" * 127], "7f" + " aa" * 127),
    ("128-byte body: 2-byte prefix", [b"\xbb" * 128], "80 01" + " bb" * 128),
    ("300-byte body", [bytes(300)], "ac 02" + " 00" * 300),
]

PREFIX_VECTORS: list[tuple[int, str]] = [
    (0, "00"),
    (127, "7f"),
    (128, "80 01"),
    (300, "ac 02"),
    (16_383, "ff 7f"),
    (16_384, "80 80 01"),
    (2_097_151, "ff ff 7f"),
    (2_097_152, "80 80 80 01"),
    (16_777_216, "80 80 80 08"),
    (268_435_455, "ff ff ff 7f"),
]

MALFORMED: list[tuple[str, str]] = [
    ("80 80 80 80", "more than 4 bytes"),
    ("ff ff ff ff", "more than 4 bytes"),
    ("80 00", "not in shortest form"),
    ("ff 80 00", "not in shortest form"),
    ("80 80 80 00", "not in shortest form"),
]


@pytest.mark.parametrize(("what", "bodies", "hexed"), VECTORS)
def test_vectors_encode_decode_and_are_documented(
    what: str, bodies: list[bytes], hexed: str
) -> None:
    enc = BatchEncoder()
    for b in bodies:
        enc.append_raw(b)
    assert enc.flush() == bytes.fromhex(hexed), what
    assert FrameDecoder().feed(bytes.fromhex(hexed)) == bodies
    if len(hexed) < 200:
        assert f"`{hexed}`" in DOCS.read_text(), f"vector {what!r} missing from docs/FRAMES.md"


@pytest.mark.parametrize(("length", "hexed"), PREFIX_VECTORS)
def test_prefix_vectors(length: int, hexed: str) -> None:
    assert encode_prefix(length) == bytes.fromhex(hexed)
    assert f"`{hexed}`" in DOCS.read_text()
    # the decoder reads the prefix, split at every point, and waits for the body
    prefix = bytes.fromhex(hexed)
    for cut in range(len(prefix) + 1):
        dec = FrameDecoder(max_frame=FRAME_LIMIT)
        assert dec.feed(prefix[:cut]) + dec.feed(prefix[cut:]) == ([b""] if length == 0 else [])
        assert dec.pending == (len(prefix) if length else 0)


def test_documented_messages_round_trip_through_msgpack() -> None:
    enc = BatchEncoder()
    enc.append("hi")
    enc.append(1)
    assert enc.flush() == bytes.fromhex("03 a2 68 69 01 01")


@pytest.mark.parametrize(("hexed", "what"), MALFORMED)
def test_malformed_prefixes(hexed: str, what: str) -> None:
    bad = bytes.fromhex(hexed)
    good = frame(b"ok") + frame(b"")
    for cut in range(len(good) + len(bad) + 1):
        dec = FrameDecoder()
        data = good + bad + b"more"
        out: list[bytes] = []
        with pytest.raises(FrameError) as info:
            out += dec.feed(data[:cut])
            out += dec.feed(data[cut:])
        msg = f"malformed length prefix at stream offset {len(good)}: {what} ({hexed})"
        assert str(info.value) == msg
        assert info.value.offset == len(good)
        assert out + info.value.frames == [b"ok", b""]
        assert dec.broken and dec.pending == 0
        assert dec.frames == 2
        for later in (b"", frame(b"fine"), bytearray(b"x")):
            with pytest.raises(FrameError) as again:
                dec.feed(later)
            assert str(again.value) == (
                f"decoder is broken since stream offset {len(good)} ({msg}); "
                "call reset() or use a new FrameDecoder"
            )
            assert again.value.offset == len(good) and again.value.frames == []
        dec.reset()
        assert not dec.broken and dec.frames == 0 and dec.bytes == 0
        assert dec.feed(frame(b"again")) == [b"again"]


@pytest.mark.parametrize(
    ("hexed", "max_frame", "message", "offset"),
    [
        (
            "02 6f 6b 80 00",
            DEFAULT_MAX_FRAME,
            "malformed length prefix at stream offset 3: not in shortest form (80 00)",
            3,
        ),
        ("11", 16, "frame of 17 bytes at stream offset 0 exceeds max_frame (16)", 0),
        (
            "81 80 80 08",
            DEFAULT_MAX_FRAME,
            "frame of 16,777,217 bytes at stream offset 0 exceeds max_frame (16,777,216)",
            0,
        ),
    ],
)
def test_documented_error_vectors(hexed: str, max_frame: int, message: str, offset: int) -> None:
    assert f"`{hexed}`" in DOCS.read_text()
    with pytest.raises(FrameError) as info:
        FrameDecoder(max_frame=max_frame).feed(bytes.fromhex(hexed))
    assert str(info.value) == message and info.value.offset == offset
    # exactly the default max_frame is accepted
    dec = FrameDecoder()
    assert dec.feed(bytes.fromhex("80 80 80 08") + b"x") == []
    assert dec.pending == 5


def test_max_frame_boundaries_on_decode() -> None:
    for limit in (0, 1, 127, 128, 16_384):
        ok = frame(b"x" * limit)
        over = frame(b"y" * (limit + 1))
        dec = FrameDecoder(max_frame=limit)
        assert dec.feed(ok) == [b"x" * limit]
        # the error comes as soon as the prefix is complete, before the body
        prefix = encode_prefix(limit + 1)
        with pytest.raises(FrameError) as info:
            dec.feed(prefix)
        assert str(info.value) == (
            f"frame of {limit + 1:,} bytes at stream offset {len(ok)} exceeds max_frame ({limit:,})"
        )
        assert info.value.offset == len(ok)
        with pytest.raises(FrameError, match="broken since stream offset"):
            dec.feed(over[len(prefix) :])


def test_max_frame_boundaries_on_encode() -> None:
    for limit in (0, 1, 127, 128, 16_384):
        enc = BatchEncoder(max_frame=limit)
        enc.append_raw(b"a" * limit)
        before = (len(enc), enc.nbytes)
        with pytest.raises(FrameError) as info:
            enc.append_raw(b"b" * (limit + 1))
        assert str(info.value) == f"frame of {limit + 1:,} bytes exceeds max_frame ({limit:,})"
        assert info.value.offset is None and info.value.frames == []
        with pytest.raises(FrameError):
            enc.append(b"c" * limit)  # msgpack adds a header: over the limit
        assert (len(enc), enc.nbytes) == before
        assert enc.flush() == frame(b"a" * limit)


def test_frame_error_pickles_with_its_details() -> None:
    exc = FrameError("bad", offset=7, frames=[b"a"])
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is FrameError and isinstance(back, ValueError)
    assert (str(back), back.offset, back.frames) == ("bad", 7, [b"a"])


def test_int_like_options() -> None:
    assert FrameDecoder(max_frame=array.array("i", [300])[0]).max_frame == 300

    class Index:
        def __index__(self) -> int:
            return 42

    assert BatchEncoder(max_frame=Index()).max_frame == 42  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="max_frame must be an int, not float"):
        FrameDecoder(max_frame=1.0)  # type: ignore[arg-type]


def test_limits_are_exported() -> None:
    assert codec.MAX_PREFIX_BYTES == 4
    assert codec.FRAME_LIMIT_BYTES == FRAME_LIMIT == 268_435_455
    assert codec.DEFAULT_MAX_FRAME_BYTES == DEFAULT_MAX_FRAME
    assert BatchEncoder().max_frame == FrameDecoder().max_frame == DEFAULT_MAX_FRAME
    assert FrameDecoder(max_frame=FRAME_LIMIT).max_frame == FRAME_LIMIT


def test_zero_length_frames() -> None:
    enc = BatchEncoder()
    for _ in range(3):
        enc.append_raw(b"")
    assert len(enc) == 3 and enc.nbytes == 3
    data = enc.flush()
    assert data == b"\x00\x00\x00"
    assert FrameDecoder().feed(data) == [b"", b"", b""]
    assert FrameDecoder(views=True).feed(data) == [b"", b"", b""]


# ---------------------------------------------------------------------------------------------
# Bad input


def test_wrong_types_and_values_of_options() -> None:
    for cls in (BatchEncoder, FrameDecoder):
        with pytest.raises(TypeError, match="max_frame must be an int, not str"):
            cls(max_frame="10")
        with pytest.raises(TypeError, match="max_frame must be an int, not bool"):
            cls(max_frame=True)
        with pytest.raises(ValueError, match=r"max_frame must be in \[0, 268,435,455\], not -1"):
            cls(max_frame=-1)
        with pytest.raises(ValueError, match="not 268,435,456"):
            cls(max_frame=FRAME_LIMIT + 1)
        with pytest.raises(TypeError):
            cls(16)  # keyword-only
    with pytest.raises(TypeError, match=r"must be a msgspec\.msgpack\.Encoder, not Encoder"):
        BatchEncoder(encoder=msgspec.json.Encoder())
    with pytest.raises(ValueError, match="capacity must be in"):
        BatchEncoder(capacity=-5)
    with pytest.raises(TypeError, match="views must be a bool, not int"):
        FrameDecoder(views=1)


def test_wrong_types_of_data() -> None:
    enc = BatchEncoder()
    enc.append_raw(b"keep")
    dec = FrameDecoder()
    assert dec.feed(b"\x05ab") == []
    strided = memoryview(b"abcdef")[::2]
    for bad in ("text", 12, None, [1, 2], strided):
        with pytest.raises(TypeError, match="needs a contiguous bytes-like object, not"):
            enc.append_raw(bad)
        with pytest.raises(TypeError, match="needs a contiguous bytes-like object, not"):
            dec.feed(bad)
    # both are still consistent
    assert enc.flush() == frame(b"keep")
    assert dec.pending == 3 and dec.feed(b"cde") == [b"abcde"]


def test_every_bytes_like_input() -> None:
    body = bytes(range(200))
    data = frame(body) + frame(b"z")
    for wrap in (bytes, bytearray, memoryview, lambda b: array.array("B", b)):
        enc = BatchEncoder()
        enc.append_raw(wrap(body))
        enc.append_raw(wrap(b"z"))
        assert enc.flush() == data
        assert FrameDecoder().feed(wrap(data)) == [body, b"z"]
    # a multi-byte item format is still read as its bytes
    ints = array.array("i", [1, 2])
    assert FrameDecoder().feed(frame(ints.tobytes())) == [ints.tobytes()]


def test_unencodable_message_leaves_the_batch_unchanged() -> None:
    enc = BatchEncoder()
    enc.append(Msg("a/b", 1, 2, b"p"))
    before = (len(enc), enc.nbytes)
    # fails at once, and fails after msgspec has written part of the message
    for bad, exc_type in (
        (object(), TypeError),
        ([1, 2, "x" * 5000, object()], TypeError),
        ("\ud800", UnicodeEncodeError),
        (2**64, OverflowError),
    ):
        with pytest.raises(exc_type):
            enc.append(bad)
        assert (len(enc), enc.nbytes) == before
    enc.append([1, 2])
    assert enc.flush() == frame(msgspec.msgpack.encode(Msg("a/b", 1, 2, b"p"))) + frame(
        b"\x92\x01\x02"
    )


def test_custom_encoder_with_enc_hook() -> None:
    class Point:
        def __init__(self, x: int) -> None:
            self.x = x

    def hook(obj: Any) -> Any:
        if isinstance(obj, Point):
            return {"x": obj.x}
        raise NotImplementedError

    custom = msgspec.msgpack.Encoder(enc_hook=hook)
    enc = BatchEncoder(encoder=custom)
    assert enc.encoder is custom
    enc.append([Point(1), Point(2)])
    with pytest.raises(NotImplementedError):
        enc.append(object())
    assert enc.flush() == frame(custom.encode([Point(1), Point(2)]))


def test_reentry_from_enc_hook_is_refused() -> None:
    enc: BatchEncoder
    seen: list[BaseException] = []

    def hook(obj: Any) -> Any:
        for call in (lambda: enc.append(1), lambda: enc.append_raw(b"x"), enc.flush, enc.clear):
            try:
                call()
            except RuntimeError as exc:
                seen.append(exc)
        return 0

    enc = BatchEncoder(encoder=msgspec.msgpack.Encoder(enc_hook=hook))
    enc.append_raw(b"first")
    enc.append([object()])
    assert len(seen) == 4
    assert "BatchEncoder used while one of its calls is running" in str(seen[0])
    assert enc.flush() == frame(b"first") + frame(b"\x91\x00")


def test_reentry_into_feed_from_a_finaliser_is_refused() -> None:
    # views=True allocates memoryviews (no free list) inside feed: with the collector's
    # threshold at 1 that allocation runs a collection, and the finaliser of cyclic garbage
    # tries to feed the same decoder.
    dec = FrameDecoder(views=True)
    seen: list[BaseException] = []

    class Trap:
        def __init__(self) -> None:
            self.me = self

        def __del__(self) -> None:
            try:
                dec.feed(b"\x01q")
            except BaseException as exc:
                seen.append(exc)

    data = frame(b"ab") + frame(b"cd") + frame(b"ef")
    got = [bytes(f) for f in dec.feed(data[:4])]
    feed, rest = dec.feed, data[4:]  # nothing left to allocate before feed() runs
    Trap()
    with gc_every_allocation():
        out = feed(rest)
    got += [bytes(f) for f in out]
    gc.collect()
    assert len(seen) == 1 and isinstance(seen[0], RuntimeError)
    assert "feed() called while feed() is running" in str(seen[0])
    assert got == [b"ab", b"cd", b"ef"]
    assert dec.frames == 3 and dec.pending == 0


# ---------------------------------------------------------------------------------------------
# flush, ownership, views


def test_flush_hands_over_bytes() -> None:
    enc = BatchEncoder(capacity=0)
    assert enc.flush() == b"" and type(enc.flush()) is bytes
    for size in (10, 5000, 200_000, 10, 3_000_000, 50):
        for _ in range(3):
            enc.append_raw(b"s" * size)
        assert len(enc) == 3 and enc.nbytes == 3 * len(frame(b"s" * size))
        out = enc.flush()
        assert type(out) is bytes
        assert sys.getrefcount(out) == 2  # the caller's reference only
        assert out == frame(b"s" * size) * 3
        assert len(enc) == 0 and enc.nbytes == 0
        assert hash(out) == hash(bytes(out))
    enc.append_raw(b"x")
    enc.clear()
    assert len(enc) == 0 and enc.flush() == b""
    assert repr(BatchEncoder()) == "<BatchEncoder frames=0 nbytes=0>"


def test_views_are_slices_of_fed_bytes_only() -> None:
    data = frame(b"alpha") + frame(b"beta") + frame(b"x" * 300)
    dec = FrameDecoder(views=True)
    assert dec.views
    chunk = data[:-10]  # the last frame stays partial
    frames = dec.feed(chunk)
    assert [bytes(f) for f in frames] == [b"alpha", b"beta"]
    for f in frames:
        assert type(f) is memoryview and f.readonly and f.obj is chunk
    tail = dec.feed(data[-10:])
    assert type(tail[0]) is memoryview and bytes(tail[0]) == b"x" * 300
    assert type(tail[0].obj) is bytes  # the assembled copy
    # mutable input is copied: the caller's bytearray is free again after feed
    buf = bytearray(data)
    frames = FrameDecoder(views=True).feed(buf)
    buf[:] = b"\xff" * len(buf)
    buf.extend(b"more")  # no export is left on it
    assert [bytes(f) for f in frames] == [b"alpha", b"beta", b"x" * 300]
    assert all(f.obj is not buf for f in frames)
    # the views (and the decoder's view of the chunk) let go of it when dropped
    chunk = bytes(data)
    refs = sys.getrefcount(chunk)
    frames = FrameDecoder(views=True).feed(chunk)
    assert sys.getrefcount(chunk) > refs
    del frames
    assert sys.getrefcount(chunk) == refs
    # bytes mode: plain bytes, no reference to the chunk kept
    chunk = bytes(data)
    refs = sys.getrefcount(chunk)
    frames = FrameDecoder().feed(chunk)
    assert all(type(f) is bytes for f in frames)
    assert sys.getrefcount(chunk) == refs


def test_frames_returned_before_an_error_stay_valid() -> None:
    chunk = frame(b"one") + frame(b"two")
    dec = FrameDecoder(views=True)
    first = dec.feed(chunk)
    with pytest.raises(FrameError):
        dec.feed(b"\x80\x80\x80\x80")
    dec.reset()
    dec.feed(frame(b"three"))
    assert [bytes(f) for f in first] == [b"one", b"two"]


def test_counters_and_repr() -> None:
    dec = FrameDecoder()
    data = frame(b"abc") + frame(b"de")
    assert dec.feed(data[:5]) == [b"abc"]
    assert (dec.frames, dec.bytes, dec.pending) == (1, 5, 1)
    assert repr(dec) == "<FrameDecoder frames=1 bytes=5 pending=1>"
    assert dec.feed(data[5:]) == [b"de"]
    assert (dec.frames, dec.bytes, dec.pending) == (2, 7, 0)
    with pytest.raises(FrameError):
        dec.feed(b"\x80\x00")
    assert repr(dec).startswith("<FrameDecoder broken")


# ---------------------------------------------------------------------------------------------
# Memory


def test_partial_frame_memory_grows_with_the_data_not_the_prefix() -> None:
    dec = FrameDecoder(max_frame=FRAME_LIMIT)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        dec.feed(encode_prefix(100_000_000) + b"x" * 10)
        held = tracemalloc.get_traced_memory()[0] - base
        assert held < 70_000, held  # 64 KiB, not 100 MB
        received = 10
        for _ in range(40):
            dec.feed(b"y" * 50_000)
            received += 50_000
            held = tracemalloc.get_traced_memory()[0] - base
            assert held <= 2 * received + 70_000, (held, received)
        assert dec.pending == received + 4
    finally:
        tracemalloc.stop()
    dec.reset()
    assert dec.pending == 0


def test_small_partial_frame_is_allocated_whole() -> None:
    dec = FrameDecoder()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        dec.feed(encode_prefix(60_000) + b"x")
        held = tracemalloc.get_traced_memory()[0] - base
        assert 60_000 <= held < 62_000
    finally:
        tracemalloc.stop()


def test_no_leak_over_many_cycles() -> None:
    msgs = [Msg(f"t/{i}", 1, i, bytes(i % 90)) for i in range(50)]
    enc = BatchEncoder()
    dec = FrameDecoder()
    vdec = FrameDecoder(views=True)

    def cycle() -> None:
        for m in msgs:
            enc.append(m)
        enc.append_raw(b"r" * 70_000)
        data = enc.flush()
        for i in range(0, len(data), 777):
            dec.feed(data[i : i + 777])
            vdec.feed(data[i : i + 777])
        with contextlib.suppress(TypeError):
            enc.append(object())
        with contextlib.suppress(FrameError):
            FrameDecoder().feed(data[:500] + b"\x80\x80\x80\x80")

    grown = traced_growth(cycle, warmup=20, settle=5, rounds=100)
    assert grown < 20_000, grown


def test_cycles_through_the_enc_hook_are_collected() -> None:
    class Sentinel:
        pass

    def make() -> weakref.ref[Sentinel]:
        sentinel = Sentinel()
        holder: dict[str, Any] = {}

        def hook(obj: Any) -> Any:
            assert holder and sentinel  # the closure holds both
            return 0

        enc = BatchEncoder(encoder=msgspec.msgpack.Encoder(enc_hook=hook))
        holder["enc"] = enc  # enc -> encoder -> hook -> holder -> enc
        enc.append(object())
        return weakref.ref(sentinel)

    with gc_disabled():
        ref = make()
        assert ref() is not None  # kept alive by the cycle alone
        gc.collect()
        assert ref() is None


# ---------------------------------------------------------------------------------------------
# Random round trips against the model

leaves = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=40)
    | st.binary(max_size=300)
)
values = st.recursive(
    leaves,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=12,
)
items = st.lists(st.tuples(st.booleans(), values | st.binary(max_size=20_000)), max_size=30)


@given(items=items, cuts=st.lists(st.integers(0, 60_000), max_size=40), views=st.booleans())
def test_round_trip_against_the_model(
    items: list[tuple[bool, Any]], cuts: list[int], views: bool
) -> None:
    enc, model = BatchEncoder(), ModelEncoder()
    for raw, value in items:
        if raw and isinstance(value, bytes):
            enc.append_raw(value)
            model.append_raw(value)
        else:
            enc.append(value)
            model.append(value)
    assert (len(enc), enc.nbytes) == (len(model), model.nbytes)
    data = enc.flush()
    assert data == model.flush()
    dec = FrameDecoder(views=views)
    mdec = ModelDecoder()
    got = feed_all(dec, data, cuts)
    assert got == feed_all(mdec, data, cuts)
    assert (
        (dec.frames, dec.bytes, dec.pending)
        == (mdec.frames, mdec.bytes, 0)
        == (
            len(items),
            len(data),
            0,
        )
    )


@given(
    data=st.binary(max_size=200),
    cuts=st.lists(st.integers(0, 200), max_size=10),
    max_frame=st.sampled_from([0, 3, 50, 127, 128, DEFAULT_MAX_FRAME]),
)
def test_garbage_against_the_model(data: bytes, cuts: list[int], max_frame: int) -> None:
    dec, mdec = FrameDecoder(max_frame=max_frame), ModelDecoder(max_frame=max_frame)
    try:
        expected: list[bytes] | ModelFrameError = feed_all(mdec, data, cuts)
    except ModelFrameError as exc:
        expected = exc
    if isinstance(expected, ModelFrameError):
        with pytest.raises(FrameError) as info:
            feed_all(dec, data, cuts)
        same_error(info.value, expected)
    else:
        assert feed_all(dec, data, cuts) == expected
    assert (dec.frames, dec.bytes, dec.pending, dec.broken) == (
        mdec.frames,
        mdec.bytes,
        mdec.pending,
        mdec.broken,
    )


class EncoderMachine(RuleBasedStateMachine):
    """Random appends, bad appends, flushes and clears on the encoder and the model; every
    flushed batch also goes through a decoder and the model's decoder, cut at random."""

    @initialize(max_frame=st.sampled_from([0, 50, 200, 20_000, DEFAULT_MAX_FRAME]))
    def start(self, max_frame: int) -> None:
        self.enc = BatchEncoder(max_frame=max_frame, capacity=64)
        self.model = ModelEncoder(max_frame=max_frame)
        self.dec = FrameDecoder(max_frame=max_frame)
        self.mdec = ModelDecoder(max_frame=max_frame)

    def both(self, method: str, arg: Any) -> None:
        try:
            getattr(self.model, method)(arg)
        except ModelFrameError as exc:
            with pytest.raises(FrameError) as info:
                getattr(self.enc, method)(arg)
            same_error(info.value, exc)
        else:
            getattr(self.enc, method)(arg)

    @rule(value=values)
    def append(self, value: Any) -> None:
        self.both("append", value)

    @rule(data=st.binary(max_size=25_000), kind=st.sampled_from([bytes, bytearray, memoryview]))
    def append_raw(self, data: bytes, kind: type) -> None:
        self.both("append_raw", kind(data))

    @rule(bad=st.sampled_from([object(), "\ud800", [1, {2: object()}], -(2**64)]))
    def append_unencodable(self, bad: Any) -> None:
        with pytest.raises((TypeError, ValueError, OverflowError)):
            self.model.append(bad)
        with pytest.raises((TypeError, ValueError, OverflowError)):
            self.enc.append(bad)

    @rule(bad=st.sampled_from(["text", 3, None]))
    def append_raw_wrong_type(self, bad: Any) -> None:
        with pytest.raises(TypeError):
            self.enc.append_raw(bad)

    @rule(cuts=st.lists(st.integers(0, 100_000), max_size=20))
    def flush(self, cuts: list[int]) -> None:
        data = self.enc.flush()
        assert data == self.model.flush()
        assert feed_all(self.dec, data, cuts) == feed_all(self.mdec, data, cuts)

    @rule()
    def clear(self) -> None:
        self.enc.clear()
        self.model.clear()

    @invariant()
    def same_pending(self) -> None:
        assert len(self.enc) == len(self.model)
        assert self.enc.nbytes == self.model.nbytes
        assert self.dec.pending == self.mdec.pending == 0
        assert self.dec.frames == self.mdec.frames


class DecoderMachine(RuleBasedStateMachine):
    """A stream of frames, bare prefixes and garbage, fed in random pieces of random types to
    the decoder and the model; every answer, error and counter compared."""

    @initialize(
        max_frame=st.sampled_from([0, 1, 127, 128, 300, 16_384, DEFAULT_MAX_FRAME]),
        views=st.booleans(),
    )
    def start(self, max_frame: int, views: bool) -> None:
        self.dec = FrameDecoder(max_frame=max_frame, views=views)
        self.model = ModelDecoder(max_frame=max_frame)
        self.todo = b""

    @rule(bodies=st.lists(st.binary(max_size=400), max_size=8))
    def add_frames(self, bodies: list[bytes]) -> None:
        self.todo += b"".join(frame(b) for b in bodies)

    @rule(length=st.sampled_from([0, 1, 127, 128, 129, 300, 16_383, 16_384, 16_385, FRAME_LIMIT]))
    def add_prefix(self, length: int) -> None:
        self.todo += encode_prefix(length)

    @rule(junk=st.binary(min_size=1, max_size=6))
    def add_garbage(self, junk: bytes) -> None:
        self.todo += junk

    @precondition(lambda self: bool(self.todo))
    @rule(
        size=st.integers(0, 1500),
        kind=st.sampled_from([bytes, bytearray, memoryview]),
    )
    def feed(self, size: int, kind: type) -> None:
        piece, self.todo = self.todo[:size], self.todo[size:]
        try:
            expected = self.model.feed(piece)
        except ModelFrameError as exc:
            with pytest.raises(FrameError) as info:
                self.dec.feed(kind(piece))
            same_error(info.value, exc)
        else:
            assert [bytes(f) for f in self.dec.feed(kind(piece))] == expected

    @rule()
    def reset(self) -> None:
        self.dec.reset()
        self.model.reset()
        self.todo = b""

    @invariant()
    def same_state(self) -> None:
        assert self.dec.frames == self.model.frames
        assert self.dec.bytes == self.model.bytes
        assert self.dec.pending == self.model.pending
        assert self.dec.broken == self.model.broken


TestEncoderMachine = EncoderMachine.TestCase
TestDecoderMachine = DecoderMachine.TestCase
