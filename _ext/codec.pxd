# Declarations of the batch frame codec (code and the design: codec.pyx; the wire format, for
# implementers in other languages: docs/FRAMES.md).

from cpython.object cimport PyObject
from libc.stdint cimport uint8_t, uint64_t


cdef enum:
    # Bytes in the longest length prefix (an MQTT Variable Byte Integer).
    MAX_PREFIX = 4
    # The largest frame length a prefix can say: 2**28 - 1, the highest allowed max_frame.
    FRAME_LIMIT = 268435455
    # max_frame when none is given: 16 MiB.
    DEFAULT_MAX_FRAME = 16777216
    # Capacity of the first batch buffer of a BatchEncoder when none is given.
    DEFAULT_CAPACITY = 4096
    # A flushed batch of this size or more does not set the next batch's capacity (so one
    # burst does not pin a large buffer); neither does an encoded message this large keep
    # the scratch buffer that large.
    LARGE_BUFFER = 1048576
    # Scratch bytearray the messages are encoded into, before growth.
    SCRATCH_SIZE = 1024
    # A partial frame up to this length is allocated whole as soon as its prefix is read;
    # a longer one grows with the bytes that arrive (at most twice what has arrived).
    PARTIAL_WHOLE = 65536


cdef class BatchEncoder:
    # the batch: a bytes object that nobody else sees until flush() hands it over
    cdef PyObject* _batch       # owned; NULL until the first append after a flush
    cdef char* _data            # PyBytes_AS_STRING(_batch)
    cdef Py_ssize_t _cap        # bytes in _batch (its ob_size while we fill it)
    cdef Py_ssize_t _used       # bytes of complete frames at the front of _batch
    cdef Py_ssize_t _nframes    # frames in _used
    cdef Py_ssize_t _next_cap   # capacity of the next batch buffer (from the last flush)
    cdef Py_ssize_t _capacity   # the capacity option: smallest batch buffer allocated
    cdef Py_ssize_t _max_frame  # longest frame body accepted (bytes)
    # message encoding
    cdef object _encoder        # the msgspec.msgpack.Encoder
    cdef object _encode_into    # its bound encode_into, looked up once
    cdef bytearray _scratch     # where a message is encoded before it is copied in
    cdef bint _busy             # inside append/append_raw/flush/clear (re-entry guard)

    cdef int _enter(self) except -1
    cdef int _reserve(self, Py_ssize_t extra) except -1
    cdef int _put(self, const char* body, Py_ssize_t n) except -1
    cdef int _check_length(self, Py_ssize_t n) except -1
    cdef void _drop_batch(self) noexcept


cdef class FrameDecoder:
    # options
    cdef Py_ssize_t _max_frame  # longest frame body accepted (bytes)
    cdef bint _views            # frames are memoryviews (True) or bytes (False)
    # carried over between feed() calls
    cdef uint8_t _head[4]       # bytes of a length prefix that is not complete yet
    cdef int _head_len          # bytes in _head (0 when no prefix is pending)
    cdef PyObject* _partial     # owned bytes being filled with a frame's body, or NULL
    cdef Py_ssize_t _plen       # the partial frame's length (from its prefix)
    cdef Py_ssize_t _pfill      # bytes of its body received so far
    cdef Py_ssize_t _pcap       # bytes allocated in _partial (_pfill <= _pcap <= _plen)
    cdef int _pprefix           # bytes in the partial frame's prefix (for `pending`)
    # counters
    cdef uint64_t _frames       # frames returned
    cdef uint64_t _bytes        # stream bytes accepted by feed()
    # the broken state: None, or the reason (str) the stream failed at _error_offset
    cdef object _error
    cdef uint64_t _error_offset
    cdef bint _busy             # inside feed() (re-entry guard)

    cdef list _feed(self, object data, const uint8_t* p, Py_ssize_t n, bint zero_copy)
    cdef object _frame_from(self, object data, const uint8_t* p, Py_ssize_t start,
                            Py_ssize_t length, object base)
    cdef int _start_partial(self, const uint8_t* p, Py_ssize_t avail, Py_ssize_t length,
                            int prefix) except -1
    cdef int _grow_partial(self, Py_ssize_t need) except -1
    cdef void _drop_partial(self) noexcept
    cdef object _fail(self, uint64_t offset, str reason, list frames)
    cdef str _too_big(self, Py_ssize_t length, uint64_t offset)
