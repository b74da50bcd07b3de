# Declarations of the Kademlia routing table (code and the design: routing.pyx; the guide:
# docs/cores/routing.md).

from libc.stdint cimport int32_t, uint64_t


cdef enum:
    # Bytes in a node id (256 bits), and the number of buckets (one per shared-prefix length).
    ID_BYTES = 32
    ID_BITS = 256
    # Contacts per bucket when no k is given.
    DEFAULT_K = 20
    # Largest k and replacement-list bound (slots and counts are int32).
    MAX_K = 2147483647
    # At or below this many results closest() sorts by insertion sort, above by qsort.
    SMALL_SORT = 32


ctypedef struct Entry:
    uint64_t w[4]     # the id as 4 big-endian words: w[0] is bytes 0..7
    double seen       # last_seen (the `now` of the last add/touch, or when it was queued)
    int32_t prev      # bucket list neighbour towards the LRS end (-1: the head)
    int32_t next      # towards the MRS end (-1: the tail); in a free slot: the next free one
    int32_t bucket    # 0..255; -1 in a free slot


ctypedef struct Cand:
    uint64_t d[4]     # XOR distance to the target, big-endian words
    int32_t slot


cdef class RoutingTable:
    cdef uint64_t _self[4]          # the table's own id, as words
    cdef bytes _self_id
    cdef int32_t _k                 # contacts per bucket
    cdef int32_t _rmax              # bound of each replacement list
    # contact slots: C fields in _ent, the Python objects in two lists of the same length
    cdef Entry* _ent
    cdef Py_ssize_t _ecap           # slots allocated in _ent (<= len(_ids) == len(_contacts))
    cdef Py_ssize_t _used           # slots ever handed out (the rest of _ent is untouched)
    cdef int32_t _free              # head of the free-slot list (-1: none)
    cdef list _ids                  # slot -> node id (bytes), None when free
    cdef list _contacts             # slot -> contact, None when free
    # every stored contact's slot, sorted by id (what closest() and the look-ups search)
    cdef int32_t* _order
    cdef Py_ssize_t _n              # contacts stored
    cdef Py_ssize_t _ocap
    # buckets: a doubly linked list of slots each, LRS at the head, MRS at the tail
    cdef int32_t _head[256]
    cdef int32_t _tail[256]
    cdef int32_t _count[256]
    # replacement lists: None, or a list of (node_id, contact, seen) tuples, oldest first
    cdef list _repl
    cdef Py_ssize_t _dropped        # replacements dropped (the oldest, when a list was full)
    # closest(): candidates, reused between calls
    cdef Cand* _scratch
    cdef Py_ssize_t _scap
    cdef bint _busy                 # inside a call that allocates (re-entry guard)

    cdef int _enter(self) except -1
    cdef Py_ssize_t _find(self, const uint64_t* key, bint* found) noexcept
    cdef int32_t _slot_of(self, object node_id) except -2
    cdef void _unlink(self, int32_t s) noexcept
    cdef void _link_tail(self, int32_t s, int b) noexcept
    cdef int _grow_slots(self) except -1
    cdef int _grow_order(self) except -1
    cdef int32_t _store(self, Py_ssize_t pos, const uint64_t* key, int b, double seen,
                        object node_id, object contact) except -1
    cdef int _queue(self, int b, object node_id, object contact, double seen) except -1
    cdef object _unqueue(self, int b, const char* raw)
    cdef Py_ssize_t _select(self, const uint64_t* t, Py_ssize_t need) noexcept
