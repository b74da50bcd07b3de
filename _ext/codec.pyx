"""Batch frame codec: length-prefixed msgpack frames on a byte stream.

The format (docs/FRAMES.md has it for implementers in other languages)
======================================================================

A stream is a sequence of frames; a frame is a length prefix followed by that many bytes of
body (a msgpack document when written by ``BatchEncoder.append``, anything when written by
``append_raw``).  The prefix is the *Variable Byte Integer* of MQTT 5 [MQTT-1.5.5]:
little-endian groups of 7 bits, the high bit of each byte saying "another byte follows",
1 to 4 bytes, shortest form only, so a body is 0 .. 268,435,455 bytes.  A body under 128
bytes, the common case on a pub/sub mesh, costs one byte of prefix instead of the four of a
fixed 32-bit length.

Worked example.  The messages ``"hi"`` (msgpack ``a2 68 69``), a raw frame of 300 bytes of
``0x00`` and an empty raw frame are framed as::

    03 a2 68 69          prefix 3 (one byte, < 128), then the body
    ac 02 00 00 ... 00   prefix 300 = 0b10_0101100: low 7 bits 0x2c | 0x80 = 0xac, then
                         300 >> 7 = 2 = 0x02 (high bit clear: last byte); 300 bytes follow
    00                   prefix 0: an empty frame (legal)

A decoder that meets ``80 80 80 80`` (a fourth byte that still says "more"), or ``80 00``
(a multi-byte prefix whose last byte is 0: not the shortest form), or a length over its
``max_frame``, raises FrameError and is broken from then on: a byte stream has no way to
find the next frame boundary after a bad prefix.

BatchEncoder
============

``append(msg)`` encodes the message with msgspec's ``Encoder.encode_into`` into a scratch
``bytearray`` owned by the encoder (its whole allocated capacity offered to msgspec, so the
scratch never shrinks and regrows between messages), then writes the prefix and copies the
body into the batch, which is a ``bytes`` object that nobody else sees until ``flush()``
hands it over: ``flush()`` returns that object (trimmed to the frames it holds) without
copying it, and the next append starts a fresh one, sized from the last batch.

So every body byte is copied exactly once, as when encoding in place into a ``bytearray``
(the design the issue sketched: reserve the prefix, ``encode_into(msg, buf, offset)``,
write the length afterwards) and copying the bytearray into ``bytes`` at flush.  The
measured difference is in the per-message overhead: encoding in place needs a Python int for
the offset (allocated once the batch passes 256 bytes), a guess of the prefix size (1 to 4
bytes, unknown until the body is encoded) with a memmove when the guess is wrong, and a
rollback of the bytearray when msgspec fails mid-message; the scratch buffer needs none of
these: a failed or refused message never touched the batch.  The bound ``encode_into`` is
looked up once and called through vectorcall.

FrameDecoder
============

``feed(data)`` reads the data in place (bytes directly, anything else through the buffer
protocol) in three steps:

1. finish what the previous feed left: the rest of a split prefix (kept in a 4-byte array),
   then the rest of a partial body, which is copied straight into the ``bytes`` object that
   will be returned as that frame;
2. a first pass hops from prefix to prefix to count the frames that are complete in this
   chunk (and to find a bad prefix), so the result list is allocated once at its final size;
   a second pass creates one object per frame;
3. what is left (a piece of a prefix, or a prefix and part of a body) is carried over.

Frame objects: by default every frame is ``bytes``, one copy out of the fed data (for frames
of ~100 bytes a copy costs less than the ``memoryview`` that would avoid it).  With
``views=True`` every frame is a read-only ``memoryview``: a slice of the fed object, zero
copy, when the object is an exact ``bytes`` (immutable, so the view stays valid; it keeps
the whole chunk alive) and the frame lies wholly inside it; otherwise a view of a ``bytes``
copy.  Mutable input (``bytearray``, a memoryview of one) is never sliced: the caller may
reuse that buffer.

Memory: a partial frame is allocated whole when its prefix says <= 64 KiB; a longer one
grows with the bytes that actually arrive (at most twice what arrived, never past the
declared length, itself <= max_frame), so a 4-byte prefix cannot make the decoder allocate
max_frame.  Nothing else is buffered: at most 3 bytes of a split prefix.

Errors: ``FrameError`` (a ValueError) carries ``offset``, the stream offset of the bad prefix
(None for the encoder's), and ``frames``, the complete frames that preceded the bad prefix
in the failing ``feed`` call, which returns nothing.  Frames returned earlier stay valid.

Re-entry (an ``enc_hook`` that appends to the encoder it is encoding for, a finaliser run by
the collector during ``feed`` that feeds the same decoder) raises RuntimeError instead of
corrupting the buffers.
"""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_GET_SIZE
from cpython.object cimport PyObject
from cpython.ref cimport Py_DECREF, Py_INCREF, Py_XDECREF
from libc.stdint cimport uint8_t, uint64_t
from libc.string cimport memcpy

import operator as _operator
from types import GenericAlias as _GenericAlias

import msgspec as _msgspec


cdef extern from "Python.h":
    ctypedef struct PyByteArrayObject:
        Py_ssize_t ob_alloc     # bytes allocated, the trailing NUL included
        char* ob_bytes          # start of the allocation
        char* ob_start          # start of the data (ob_bytes unless bytes were deleted)
    Py_ssize_t Py_SIZE(object o)
    void Py_SET_SIZE(object o, Py_ssize_t size)
    void Py_SET_SIZE_RAW "Py_SET_SIZE"(PyObject* o, Py_ssize_t size)
    int PyByteArray_Resize(object ba, Py_ssize_t size) except -1
    # Raw variants: a NULL result is checked by hand (MemoryError), no reference juggling.
    PyObject* _new_bytes "PyBytes_FromStringAndSize"(const char* s, Py_ssize_t n)
    char* _bytes_data "PyBytes_AS_STRING"(PyObject* b)
    int _PyBytes_Resize(PyObject** b, Py_ssize_t size)
    list PyList_New(Py_ssize_t size)
    void PyList_SET_ITEM(object lst, Py_ssize_t i, PyObject* item)   # steals the reference
    object PyMemoryView_FromObject(object o)


# ---------------------------------------------------------------------------------------------
# Limits (see docs/FRAMES.md)

MAX_PREFIX_BYTES = MAX_PREFIX
FRAME_LIMIT_BYTES = FRAME_LIMIT
DEFAULT_MAX_FRAME_BYTES = DEFAULT_MAX_FRAME


class FrameError(ValueError):
    """A frame over ``max_frame`` or a malformed length prefix.

    ``offset`` is the stream offset of the offending prefix (``None`` when raised by
    ``BatchEncoder``); ``frames`` holds the complete frames that came before it in the same
    ``FrameDecoder.feed`` call (empty otherwise).
    """

    def __init__(self, message, *, offset=None, frames=None):
        ValueError.__init__(self, message)
        self.offset = offset
        self.frames = [] if frames is None else frames

    def __reduce__(self):
        return (FrameError, self.args, {"offset": self.offset, "frames": self.frames})


# ---------------------------------------------------------------------------------------------
# The length prefix: MQTT Variable Byte Integer

cdef enum:
    PREFIX_OK = 0
    PREFIX_MORE = 1          # every byte so far says "another byte follows": need more input
    PREFIX_TOO_LONG = 2      # a fourth byte that still says "another byte follows"
    PREFIX_NOT_SHORTEST = 3  # a multi-byte prefix whose last byte is 0


cdef inline int _read_prefix(const uint8_t* p, Py_ssize_t n, Py_ssize_t* length,
                             int* size) noexcept nogil:
    """Parse the prefix at p[:n]: PREFIX_OK with *length and *size (bytes), or an error with
    *size = bytes examined."""
    cdef Py_ssize_t v = 0
    cdef int i
    cdef uint8_t b
    for i in range(MAX_PREFIX):
        if i == n:
            return PREFIX_MORE
        b = p[i]
        v |= <Py_ssize_t>(b & 0x7F) << (7 * i)
        if b < 0x80:
            size[0] = i + 1
            if b == 0 and i > 0:
                return PREFIX_NOT_SHORTEST
            length[0] = v
            return PREFIX_OK
    size[0] = MAX_PREFIX
    return PREFIX_TOO_LONG


cdef inline int _prefix_size(Py_ssize_t n) noexcept nogil:
    if n < 0x80:
        return 1
    if n < 0x4000:
        return 2
    if n < 0x200000:
        return 3
    return 4


cdef inline void _write_prefix(char* p, Py_ssize_t n, int size) noexcept nogil:
    cdef int i
    for i in range(size - 1):
        p[i] = <char>((n & 0x7F) | 0x80)
        n >>= 7
    p[size - 1] = <char>n


cdef str _hex(const uint8_t* p, int n):
    return " ".join([f"{p[i]:02x}" for i in range(n)])


cdef str _prefix_error(int err, const uint8_t* p, int n, uint64_t offset):
    if err == PREFIX_TOO_LONG:
        what = "more than 4 bytes"
    else:
        what = "not in shortest form"
    return f"malformed length prefix at stream offset {offset}: {what} ({_hex(p, n)})"


cdef Py_ssize_t _limit(object value, str name, Py_ssize_t low, Py_ssize_t high) except -1:
    """An int option (anything with __index__ but a bool) checked against [low, high]."""
    if isinstance(value, bool) or not hasattr(type(value), "__index__"):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    value = _operator.index(value)
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low:,}, {high:,}], not {value:,}")
    return value


cdef object _default_encoder = _msgspec.msgpack.Encoder()


# ---------------------------------------------------------------------------------------------
# Encoder

# no_gc_clear: the collector must not set _scratch / _encode_into to None under a live
# object (a cycle through an enc_hook is broken at the msgspec Encoder instead).
@cython.final
@cython.no_gc_clear
cdef class BatchEncoder:
    """Frames messages into one buffer for one write.

    ``BatchEncoder(*, encoder=None, max_frame=16_777_216, capacity=4096)``: ``encoder`` is
    the ``msgspec.msgpack.Encoder`` that encodes ``append``'s messages (one shared default
    when None); ``max_frame`` is the longest body accepted (0 .. 268,435,455 bytes);
    ``capacity`` is the smallest batch buffer allocated (bytes).
    """

    def __cinit__(self, *, encoder=None, max_frame=DEFAULT_MAX_FRAME,
                  capacity=DEFAULT_CAPACITY):
        self._max_frame = _limit(max_frame, "max_frame", 0, FRAME_LIMIT)
        self._capacity = max(_limit(capacity, "capacity", 0, LARGE_BUFFER), 64)
        self._next_cap = self._capacity
        if encoder is None:
            encoder = _default_encoder
        elif not isinstance(encoder, _msgspec.msgpack.Encoder):
            raise TypeError(
                f"encoder must be a msgspec.msgpack.Encoder, not {type(encoder).__name__}"
            )
        self._encoder = encoder
        self._encode_into = encoder.encode_into
        self._scratch = bytearray(SCRATCH_SIZE)
        self._batch = NULL

    def __dealloc__(self):
        self._drop_batch()

    cdef void _drop_batch(self) noexcept:
        Py_XDECREF(self._batch)
        self._batch = NULL
        self._data = NULL
        self._cap = self._used = self._nframes = 0

    cdef int _enter(self) except -1:
        if self._busy:
            raise RuntimeError(
                "BatchEncoder used while one of its calls is running (from an enc_hook?)"
            )
        self._busy = True
        return 0

    cdef int _reserve(self, Py_ssize_t extra) except -1:
        """Make room for ``extra`` more bytes after the frames in the batch."""
        cdef Py_ssize_t need = self._used + extra
        cdef Py_ssize_t cap = max(need, self._next_cap if self._batch == NULL else 2 * self._cap)
        cdef PyObject* fresh = _new_bytes(NULL, cap)
        if fresh == NULL:
            raise MemoryError()
        if self._batch != NULL:
            # A new object rather than _PyBytes_Resize, which frees the batch when it fails.
            memcpy(_bytes_data(fresh), self._data, self._used)
            Py_DECREF(<object>self._batch)
        self._batch = fresh
        self._data = _bytes_data(fresh)
        self._cap = cap
        return 0

    cdef int _check_length(self, Py_ssize_t n) except -1:
        if n > self._max_frame:
            raise FrameError(f"frame of {n:,} bytes exceeds max_frame ({self._max_frame:,})")
        return 0

    cdef int _put(self, const char* body, Py_ssize_t n) except -1:
        """Append one frame: prefix, then a copy of body[:n] (the caller checked max_frame)."""
        cdef int size = _prefix_size(n)
        cdef char* out
        if self._used + size + n > self._cap:
            self._reserve(size + n)
        out = self._data + self._used
        _write_prefix(out, n, size)
        memcpy(out + size, body, n)
        self._used += size + n
        self._nframes += 1
        return 0

    @cython.always_allow_keywords(False)
    def append(self, msg):
        """Encode ``msg`` with the msgpack encoder and add it as one frame.

        Raises what msgspec raises for a value it cannot encode (TypeError, or
        msgspec.EncodeError), FrameError for a body longer than ``max_frame``; in both
        cases the batch is unchanged.
        """
        cdef bytearray scratch = self._scratch
        cdef PyByteArrayObject* s = <PyByteArrayObject*>scratch
        cdef Py_ssize_t n
        self._enter()
        try:
            # Offer msgspec the whole allocation (it writes at most up to the bytearray's
            # size before growing it, and leaves the size at the end of the message).
            Py_SET_SIZE(scratch, s.ob_alloc - (s.ob_start - s.ob_bytes) - 1)
            self._encode_into(msg, scratch)
            n = Py_SIZE(scratch)
            if n > self._max_frame:
                self._check_length(n)
            self._put(s.ob_start, n)
        finally:
            if s.ob_alloc > LARGE_BUFFER:
                PyByteArray_Resize(scratch, SCRATCH_SIZE)
            self._busy = False

    @cython.always_allow_keywords(False)
    def append_raw(self, data):
        """Add ``data`` (bytes or any bytes-like object) as one frame, as is.

        FrameError (batch unchanged) when it is longer than ``max_frame``.
        """
        cdef Py_buffer view
        self._enter()
        try:
            if PyBytes_CheckExact(data):
                n = PyBytes_GET_SIZE(data)
                if n > self._max_frame:
                    self._check_length(n)
                self._put(PyBytes_AS_STRING(data), n)
                return
            try:
                PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
            except (TypeError, BufferError):
                raise TypeError(
                    f"append_raw() needs a contiguous bytes-like object, "
                    f"not {type(data).__name__}"
                ) from None
            try:
                if view.len > self._max_frame:
                    self._check_length(view.len)
                self._put(<const char*>view.buf, view.len)
            finally:
                PyBuffer_Release(&view)
        finally:
            self._busy = False

    def flush(self):
        """The pending frames as one ``bytes`` (yours: the encoder keeps no reference), and
        an empty encoder; ``b""`` when nothing is pending."""
        cdef PyObject* batch
        cdef Py_ssize_t used = self._used
        self._enter()
        try:
            if used == 0:
                return b""
            batch = self._batch
            self._batch = NULL
            self._data = NULL
            self._cap = self._used = self._nframes = 0
            self._next_cap = max(self._capacity, min(used + (used >> 3) + 64, LARGE_BUFFER))
            if Py_SIZE(<object>batch) - used > max(1024, used >> 3):
                # Give the slack back (realloc; in place for large blocks).  On failure
                # _PyBytes_Resize has freed the batch: the frames are lost with MemoryError.
                if _PyBytes_Resize(&batch, used) < 0:
                    raise MemoryError()
            else:
                Py_SET_SIZE_RAW(batch, used)
                _bytes_data(batch)[used] = 0
            result = <object>batch
            Py_DECREF(result)   # the reference the encoder held is now the caller's
            return result
        finally:
            self._busy = False

    def clear(self):
        """Drop the pending frames (the buffer is kept for the next ones)."""
        self._enter()
        self._used = self._nframes = 0
        self._busy = False

    def __len__(self):
        """Frames pending."""
        return self._nframes

    @property
    def nbytes(self):
        """Bytes pending (prefixes included): the length ``flush()`` would return."""
        return self._used

    @property
    def max_frame(self):
        """The longest frame body accepted (bytes)."""
        return self._max_frame

    @property
    def encoder(self):
        """The ``msgspec.msgpack.Encoder`` used by ``append``."""
        return self._encoder

    def __repr__(self):
        return f"<BatchEncoder frames={self._nframes} nbytes={self._used}>"


# ---------------------------------------------------------------------------------------------
# Decoder

@cython.final
cdef class FrameDecoder:
    """Splits a byte stream, fed in chunks of any size, into frames.

    ``FrameDecoder(*, max_frame=16_777_216, views=False)``: ``max_frame`` is the longest
    body accepted (0 .. 268,435,455 bytes); with ``views=False`` every frame is ``bytes``,
    with ``views=True`` a read-only ``memoryview`` (zero copy where the frame lies inside a
    fed ``bytes`` object).
    """

    # FrameDecoder[bytes] / FrameDecoder[memoryview] in annotations (see codec.pyi)
    __class_getitem__ = classmethod(_GenericAlias)

    def __cinit__(self, *, max_frame=DEFAULT_MAX_FRAME, views=False):
        self._max_frame = _limit(max_frame, "max_frame", 0, FRAME_LIMIT)
        if not isinstance(views, bool):
            raise TypeError(f"views must be a bool, not {type(views).__name__}")
        self._views = views
        self._partial = NULL
        self._error = None

    def __dealloc__(self):
        self._drop_partial()

    cdef void _drop_partial(self) noexcept:
        Py_XDECREF(self._partial)
        self._partial = NULL
        self._plen = self._pfill = self._pcap = 0
        self._pprefix = 0

    cdef object _fail(self, uint64_t offset, str reason, list frames):
        """Break the decoder at ``offset`` and raise FrameError(reason)."""
        self._drop_partial()
        self._head_len = 0
        self._error = reason
        self._error_offset = offset
        raise FrameError(reason, offset=offset, frames=frames)

    cdef int _start_partial(self, const uint8_t* p, Py_ssize_t avail, Py_ssize_t length,
                            int prefix) except -1:
        """Carry over a frame of ``length`` bytes whose prefix has been read, with ``avail``
        of its body bytes at ``p`` (possibly all of them: then the frame is returned)."""
        cdef Py_ssize_t cap = length
        cdef Py_ssize_t take = min(avail, length)
        if length > PARTIAL_WHOLE:
            cap = min(length, max(<Py_ssize_t>PARTIAL_WHOLE, 2 * take))
        self._partial = _new_bytes(NULL, cap)
        if self._partial == NULL:
            raise MemoryError()
        self._plen = length
        self._pcap = cap
        self._pprefix = prefix
        memcpy(_bytes_data(self._partial), p, take)
        self._pfill = take
        return 0

    cdef int _grow_partial(self, Py_ssize_t need) except -1:
        cdef Py_ssize_t cap = min(self._plen, max(need, 2 * self._pcap))
        cdef PyObject* fresh = _new_bytes(NULL, cap)
        if fresh == NULL:
            raise MemoryError()
        memcpy(_bytes_data(fresh), _bytes_data(self._partial), self._pfill)
        Py_DECREF(<object>self._partial)
        self._partial = fresh
        self._pcap = cap
        return 0

    cdef object _frame_from(self, object data, const uint8_t* p, Py_ssize_t start,
                            Py_ssize_t length, object base):
        """The frame p[start:start + length] of the fed object ``data``."""
        cdef PyObject* b
        if base is not None:
            return base[start:start + length]
        b = _new_bytes(<const char*>p + start, length)
        if b == NULL:
            raise MemoryError()
        obj = <object>b
        Py_DECREF(obj)
        if self._views:
            return PyMemoryView_FromObject(obj)
        return obj

    cdef list _feed(self, object data, const uint8_t* p, Py_ssize_t n, bint zero_copy):
        cdef uint64_t offset = self._bytes       # stream offset of p[0]
        cdef Py_ssize_t pos = 0, scan, length = 0, take, i, count, total, flen = 0
        cdef int size = 0, err = PREFIX_OK, h, fsize = 0
        cdef bint too_big = False
        cdef object first = None, base = None
        cdef list frames
        self._bytes += n

        # 1. the rest of a prefix split across feeds
        if self._head_len:
            h = self._head_len
            while True:
                if pos == n:
                    return []
                self._head[self._head_len] = p[pos]
                self._head_len += 1
                pos += 1
                err = _read_prefix(self._head, self._head_len, &length, &size)
                if err != PREFIX_MORE:
                    break
            if err != PREFIX_OK:
                self._fail(offset - h, _prefix_error(err, self._head, size, offset - h), [])
            if length > self._max_frame:
                self._fail(offset - h, self._too_big(length, offset - h), [])
            self._head_len = 0
            self._start_partial(p + pos, 0, length, size)
        # 2. the rest of a partial body
        if self._partial != NULL:
            take = min(self._plen - self._pfill, n - pos)
            if self._pfill + take > self._pcap:
                self._grow_partial(self._pfill + take)
            memcpy(_bytes_data(self._partial) + self._pfill, p + pos, take)
            self._pfill += take
            pos += take
            if self._pfill < self._plen:
                return []
            first = <object>self._partial
            self._drop_partial()
            if self._views:
                first = PyMemoryView_FromObject(first)

        # 3. count the frames complete in this chunk (and find a bad prefix)
        scan = pos
        count = 0
        while scan < n:
            if p[scan] < 0x80:
                length = p[scan]
                size = 1
            else:
                err = _read_prefix(p + scan, n - scan, &length, &size)
                if err != PREFIX_OK:
                    break
            if length > self._max_frame:
                too_big = True
                break
            if length > n - scan - size:
                break
            scan += size + length
            count += 1

        # 4. one object per frame, in a list allocated at its final size
        total = count + (first is not None)
        frames = PyList_New(total)
        i = 0
        if first is not None:
            Py_INCREF(first)
            PyList_SET_ITEM(frames, 0, <PyObject*>first)
            i = 1
        if count:
            if zero_copy:
                base = PyMemoryView_FromObject(data)
            for i in range(i, total):
                if p[pos] < 0x80:
                    flen = p[pos]
                    fsize = 1
                else:
                    _read_prefix(p + pos, n - pos, &flen, &fsize)
                pos += fsize
                item = self._frame_from(data, p, pos, flen, base)
                Py_INCREF(item)
                PyList_SET_ITEM(frames, i, <PyObject*>item)
                pos += flen
        self._frames += total

        # 5. a bad prefix: the frames before it travel with the error
        if too_big:
            self._fail(offset + scan, self._too_big(length, offset + scan), frames)
        if err != PREFIX_OK and err != PREFIX_MORE:
            self._fail(offset + scan, _prefix_error(err, p + scan, size, offset + scan), frames)

        # 6. carry over the tail: part of a prefix, or a prefix and part of a body
        if scan < n:
            if err == PREFIX_MORE:
                memcpy(self._head, p + scan, n - scan)
                self._head_len = <int>(n - scan)
            else:
                self._start_partial(p + scan + size, n - scan - size, length, size)
        return frames

    cdef str _too_big(self, Py_ssize_t length, uint64_t offset):
        return (
            f"frame of {length:,} bytes at stream offset {offset} exceeds max_frame "
            f"({self._max_frame:,})"
        )

    @cython.always_allow_keywords(False)
    def feed(self, data):
        """Take the next chunk of the stream (bytes, bytearray, memoryview or any contiguous
        bytes-like object) and return the frames it completes, in order.

        Raises FrameError for a frame longer than ``max_frame`` or a malformed prefix; the
        decoder is then broken and every later call raises FrameError too.
        """
        cdef Py_buffer view
        if self._error is not None:
            raise FrameError(
                f"decoder is broken since stream offset {self._error_offset} "
                f"({self._error}); call reset() or use a new FrameDecoder",
                offset=self._error_offset,
            )
        if self._busy:
            raise RuntimeError("FrameDecoder.feed() called while feed() is running")
        if PyBytes_CheckExact(data):
            self._busy = True
            try:
                return self._feed(data, <const uint8_t*>PyBytes_AS_STRING(data),
                                  PyBytes_GET_SIZE(data), self._views)
            finally:
                self._busy = False
        try:
            PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        except (TypeError, BufferError):
            raise TypeError(
                f"feed() needs a contiguous bytes-like object, not {type(data).__name__}"
            ) from None
        self._busy = True
        try:
            return self._feed(data, <const uint8_t*>view.buf, view.len, False)
        finally:
            self._busy = False
            PyBuffer_Release(&view)

    def reset(self):
        """Forget any partial frame, the broken state and the counters: a fresh decoder
        with the same options."""
        if self._busy:
            raise RuntimeError("FrameDecoder.reset() called while feed() is running")
        self._drop_partial()
        self._head_len = 0
        self._error = None
        self._error_offset = 0
        self._frames = self._bytes = 0

    @property
    def pending(self):
        """Bytes received but not yet returned in a frame (prefixes included)."""
        if self._partial != NULL:
            return self._pprefix + self._pfill
        return self._head_len

    @property
    def max_frame(self):
        """The longest frame body accepted (bytes)."""
        return self._max_frame

    @property
    def views(self):
        """True when frames are memoryviews, False when they are bytes."""
        return self._views

    @property
    def frames(self):
        """Frames returned so far (including those carried by a FrameError)."""
        return self._frames

    @property
    def bytes(self):
        """Stream bytes accepted by feed() so far."""
        return self._bytes

    @property
    def broken(self):
        """True after a FrameError, until reset()."""
        return self._error is not None

    def __repr__(self):
        state = " broken" if self._error is not None else ""
        return (
            f"<FrameDecoder{state} frames={self._frames} bytes={self._bytes} "
            f"pending={self.pending}>"
        )
