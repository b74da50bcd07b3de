"""Benchmarks of the batch frame codec against the naive reference (tools/cores/naive_codec.py).

    python tools/bench_cores.py --only codec [--quick]
    python tools/cores/bench_codec.py [--quick]

Cases (ours and the reference timed in the same run, after checking they carry the same
bodies):

* append of the issue's message (a small Struct with a 64-byte payload), in batches of 100
  then flush, ns per frame (the flush included);
* append_raw of 64 bytes, same batches;
* flush of a 100-frame batch, ns per flush (ours: batch with flush minus batch with clear);
* decode of a stream of such frames fed in 1,200-byte chunks (a QUIC packet's worth), frames
  per second, feed calls and list/frame objects included; also with ``views=True``;
* decode at 64 KiB chunks;
* decode of large frames, MB/s: 256 KiB frames in 64 KiB chunks (assembled: one copy);
  64 KiB frames in 1 MiB chunks, as bytes (one copy) and as views (zero copy).
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from macula import BatchEncoder, FrameDecoder
from tools.benchlib import Row, format_table, median_ns
from tools.cores.naive_codec import NaiveDecoder, NaiveEncoder, make_messages

BATCH = 100


def _chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def _decode_all(dec: object, chunks: list[bytes]) -> list[bytes]:
    out: list[bytes] = []
    feed = dec.feed  # type: ignore[attr-defined]
    for c in chunks:
        out += [bytes(f) for f in feed(c)]
    return out


def rows(quick: bool) -> list[Row]:
    repeat = 5 if quick else 11
    rounds = 50 if quick else 1000  # batches per timing sample
    msgs = make_messages(BATCH)
    out: list[Row] = []

    # -- append of the message ------------------------------------------------------------
    enc, naive = BatchEncoder(), NaiveEncoder()
    for m in msgs:
        enc.append(m)
        naive.append(m)
    ours_stream, naive_stream = enc.flush(), naive.flush()
    bodies = _decode_all(FrameDecoder(), [ours_stream])
    assert bodies == _decode_all(NaiveDecoder(), [naive_stream]) and len(bodies) == BATCH

    def ours_append() -> None:
        append, flush = enc.append, enc.flush
        for _ in range(rounds):
            for m in msgs:
                append(m)
            flush()

    def naive_append() -> None:
        # the reference, inlined (no method call per message): encoder and packer
        # built once, encode + pack + list append, join at flush
        encode, pack = naive.encode, naive.pack
        for _ in range(rounds):
            parts: list[bytes] = []
            add = parts.append
            for m in msgs:
                body = encode(m)
                add(pack(len(body)))
                add(body)
            b"".join(parts)

    calls = rounds * BATCH
    t_ours = median_ns(ours_append, calls=calls, repeat=repeat)
    t_naive = median_ns(naive_append, calls=calls, repeat=repeat)
    out.append(
        Row(
            "codec",
            "append Struct+64 B payload (batch 100 + flush)",
            t_ours,
            t_naive,
            "ns/op",
            "<= 200 ns, >= 2x",
            t_ours <= 200 and t_naive / t_ours >= 2,
        )
    )

    # -- append_raw of 64 bytes -------------------------------------------------------------
    raws = [bytes([i]) * 64 for i in range(BATCH)]
    enc.append_raw(raws[0])
    naive.append_raw(raws[0])
    assert _decode_all(FrameDecoder(), [enc.flush()]) == _decode_all(
        NaiveDecoder(), [naive.flush()]
    )

    def ours_raw() -> None:
        append, flush = enc.append_raw, enc.flush
        for _ in range(rounds):
            for r in raws:
                append(r)
            flush()

    def naive_raw() -> None:
        pack = naive.pack
        for _ in range(rounds):
            parts: list[bytes] = []
            add = parts.append
            for r in raws:
                add(pack(len(r)))
                add(r)
            b"".join(parts)

    def ours_raw_clear() -> None:
        append, clear = enc.append_raw, enc.clear
        for _ in range(rounds):
            for r in raws:
                append(r)
            clear()

    t_ours = median_ns(ours_raw, calls=calls, repeat=repeat)
    t_naive = median_ns(naive_raw, calls=calls, repeat=repeat)
    out.append(
        Row("codec", "append_raw 64 B (batch 100 + flush)", t_ours, t_naive, "ns/op", "-", None)
    )

    # -- flush of a 100-frame batch ---------------------------------------------------------
    t_with_flush = median_ns(ours_raw, calls=rounds, repeat=repeat)
    t_with_clear = median_ns(ours_raw_clear, calls=rounds, repeat=repeat)
    parts = []
    for r in raws:
        parts += [len(r).to_bytes(4, "big"), r]

    def naive_join() -> None:
        for _ in range(rounds):
            b"".join(parts)

    t_join = median_ns(naive_join, calls=rounds, repeat=repeat)
    out.append(
        Row(
            "codec",
            "flush of 100 x 64 B frames (6.5 KB)",
            max(t_with_flush - t_with_clear, 0.0),
            t_join,
            "ns/op",
            "-",
            None,
        )
    )

    # -- decode ----------------------------------------------------------------------------
    nframes = 5_000 if quick else 100_000
    stream_msgs = make_messages(nframes, seed=3)
    for m in stream_msgs:
        enc.append(m)
        naive.append(m)
    ours_stream, naive_stream = enc.flush(), naive.flush()

    def decode_case(case: str, chunk: int, bar: str | None, views: bool = False) -> None:
        ours_chunks, naive_chunks = _chunks(ours_stream, chunk), _chunks(naive_stream, chunk)
        expect = _decode_all(NaiveDecoder(), naive_chunks)
        assert _decode_all(FrameDecoder(views=views), ours_chunks) == expect
        assert len(expect) == nframes

        def ours() -> None:
            feed = FrameDecoder(views=views).feed
            for c in ours_chunks:
                feed(c)

        def ref() -> None:
            feed = NaiveDecoder().feed
            for c in naive_chunks:
                feed(c)

        f_ours = 1e9 / median_ns(ours, calls=nframes, repeat=repeat)
        f_ref = 1e9 / median_ns(ref, calls=nframes, repeat=repeat)
        met = None if bar is None else f_ours >= 10_000_000
        out.append(Row("codec", case, f_ours, f_ref, "frames/s", bar or "-", met))

    decode_case("decode ~100 B frames, 1,200 B chunks", 1200, ">= 10M frames/s")
    decode_case("decode ~100 B frames, 1,200 B chunks, views", 1200, None, views=True)
    decode_case("decode ~100 B frames, 64 KiB chunks", 65536, None)

    # -- large frames: assembled across chunks (one copy), or inside a chunk (views: none) --
    def big_case(frame_size: int, chunk: int, views: bool) -> None:
        count = (2 if quick else 32) * max(1, (1 << 20) // frame_size)
        for i in range(count):
            enc.append_raw(bytes([i % 256]) * frame_size)
            naive.append_raw(bytes([i % 256]) * frame_size)
        ours_chunks, naive_chunks = _chunks(enc.flush(), chunk), _chunks(naive.flush(), chunk)
        expect = _decode_all(NaiveDecoder(), naive_chunks)
        assert _decode_all(FrameDecoder(views=views), ours_chunks) == expect
        megabytes = count * frame_size / 1e6

        def ours() -> None:
            feed = FrameDecoder(views=views).feed
            for c in ours_chunks:
                feed(c)

        def ref() -> None:
            feed = NaiveDecoder().feed
            for c in naive_chunks:
                feed(c)

        t_ours = median_ns(ours, calls=1, repeat=repeat)
        t_ref = median_ns(ref, calls=1, repeat=repeat)
        case = f"decode {frame_size // 1024} KiB frames, {chunk // 1024} KiB chunks" + (
            ", views" if views else ""
        )
        out.append(
            Row("codec", case, megabytes / t_ours * 1e9, megabytes / t_ref * 1e9, "MB/s", "-", None)
        )

    big_case(256 * 1024, 64 * 1024, False)
    big_case(64 * 1024, 1024 * 1024, False)
    big_case(64 * 1024, 1024 * 1024, True)
    return out


if __name__ == "__main__":
    print(format_table(rows(quick="--quick" in sys.argv)))
