# Declarations of the TTL cache (code and the design: cache.pyx; user guide: docs/cores/cache.md).

cimport cython
from cpython.object cimport PyObject
from libc.stdint cimport uint64_t


cdef enum:
    # Entries expire() removes at most when no budget is given.
    DEFAULT_EXPIRE_BUDGET = 1000


# One cached key. The TTLCache's dict owns every live entry (key -> _Entry); the links below
# are borrowed pointers (no reference counts, no cycles between entries), valid exactly while
# the entry is in the dict, so every removal unlinks before the dict lets go.
@cython.final
cdef class _Entry:
    cdef object key
    cdef object value
    cdef double deadline        # put time + ttl; expired once now >= deadline
    cdef uint64_t seq           # put counter at the last put: the tie-break between deadlines
    cdef PyObject* prev         # LRU ring: towards the least recently used
    cdef PyObject* next         # LRU ring: towards the most recently used
    cdef PyObject* eprev        # its lane's ring: towards earlier deadlines
    cdef PyObject* enext        # its lane's ring: towards later deadlines
    cdef PyObject* lane         # the _Lane it is in (owned by TTLCache._lanes)


# The entries put with one TTL value, in (deadline, seq) order: a ring through _Entry.eprev /
# enext around the sentinel `head`. Puts with one TTL and a non-decreasing clock append.
@cython.final
cdef class _Lane:
    cdef object ttl_key         # the TTL (a float): this lane's key in TTLCache._lanes
    cdef _Entry head            # sentinel: head.enext is the earliest deadline


@cython.final
cdef class TTLCache:
    cdef dict _map              # key -> _Entry (owns the entries)
    cdef _Entry _root           # sentinel of the LRU ring: _root.next is the LRU entry
    cdef dict _lanes            # float ttl -> _Lane, one per TTL value held (+ the default)
    cdef _Lane _default_lane    # the lane of default_ttl (never removed)
    cdef _Entry _spare          # a blank entry kept from the last eviction, or None
    cdef object _clock          # None (C monotonic clock) or a zero-argument callable
    cdef Py_ssize_t _max_size
    cdef double _default_ttl
    cdef uint64_t _seq
    cdef uint64_t _hits
    cdef uint64_t _misses
    cdef uint64_t _evictions
    cdef uint64_t _expirations
    cdef bint _busy             # a dict operation on a user key is running (re-entry guard)
    cdef object __weakref__

    cdef double _time(self, object now) except? -1.0
    cdef double _call_clock(self) except? -1.0
    cdef _Lane _lane_for(self, double ttl)
    cdef void _drop_lane_if_empty(self, _Lane lane) noexcept
    cdef int _remove(self, _Entry e) except -1
    cdef _Entry _live(self, object key, double t)
    cdef int _evict_lru(self) except -1
    cdef _Entry _earliest(self)
