# Declarations of the TopicTrie core (code and the algorithm's description: trie.pyx).

from libc.stdint cimport int32_t, uint8_t, uint16_t, uint64_t
from cpython.object cimport PyObject


cdef enum:
    # Labels up to this many UTF-8 bytes live inside the node; longer ones on the heap.
    INLINE_LABEL = 20
    # Subscriber key ids kept inside the node before an array is allocated.
    INLINE_SUBS = 2

# TrieNode.kind: the edge that leads to the node from its parent.
cdef enum:
    KIND_FREE = 0     # slot on the free list
    KIND_ROOT = 1     # node 0, the empty filter prefix
    KIND_EXACT = 2    # a literal level, found through the edge table
    KIND_PLUS = 3     # '+', parent.plus points here
    KIND_POUND = 4    # '#', parent.pound points here (never has children)


ctypedef union SubIds:
    int32_t* heap                # key ids when subs_cap > INLINE_SUBS (PyMem_Malloc'd)
    int32_t small[2]             # key ids when subs_cap == INLINE_SUBS


ctypedef struct TrieNode:
    # One cache line (64 bytes).
    PyObject* filter        # owned ref to the filter str while nsubs > 0, else NULL
    SubIds subs             # ids of the keys subscribed to the filter ending here
    int32_t parent          # parent node id (-1 for the root); next free id when KIND_FREE
    int32_t plus            # child node id of the '+' level, -1 if none
    int32_t pound           # child node id of the '#' level, -1 if none
    int32_t nchildren       # exact children (edge table entries with this parent)
    int32_t nsubs           # subscriptions (key ids) at this node
    int32_t subs_cap        # INLINE_SUBS while the ids fit in subs.small, else heap capacity
    uint16_t label_len      # bytes in the label (exact nodes; <= 65535 by the MQTT limit)
    uint8_t kind            # one of KIND_*
    uint8_t _pad
    # the label bytes when label_len <= INLINE_LABEL, else the first 8 bytes hold a char*
    # to a PyMem_Malloc'd copy (read and written with memcpy: not 8-byte aligned)
    char label[20]


ctypedef struct EdgeSlot:
    uint64_t key            # _edge_key(parent id, label hash); meaningless when child < 0
    int32_t child           # node id reached through this edge, -1 for an empty slot
    int32_t _pad


ctypedef struct Level:
    uint64_t hash           # _hash_level of the level bytes
    int32_t start           # offset of the level in the UTF-8 buffer
    int32_t length          # bytes in the level (0 for an empty level)


ctypedef struct Pending:
    int32_t node            # node to visit
    int32_t level           # index of the first topic level not yet consumed


ctypedef struct Collected:
    # Borrowed references gathered by a search before the result list is built.
    PyObject** items        # the stack buffer, or a PyMem_Malloc'd one when it overflows
    Py_ssize_t n            # items gathered
    Py_ssize_t cap          # capacity of items
    PyObject** heap         # non-NULL once items lives on the heap (freed by the search)


cdef class TopicTrie:
    # nodes and exact edges (C memory)
    cdef TrieNode* _nodes   # node array indexed by node id; node 0 is the root
    cdef int32_t _ncap      # allocated node slots
    cdef int32_t _nused     # high-water mark of node ids handed out
    cdef int32_t _free      # head of the free-node list, -1 if empty
    cdef int32_t _nlive     # live nodes, root excluded
    cdef EdgeSlot* _edges   # open-addressing (linear probing) table of exact edges
    cdef uint64_t _emask    # edge table capacity - 1 (capacity is a power of two)
    cdef Py_ssize_t _nedges # occupied edge slots
    # keys: each distinct key gets a small integer id, reused after the key goes away
    cdef dict _key_ids      # key -> key id, for every key with >= 1 subscription
    cdef list _keys         # key id -> key object (None for a free id); the only owner
    cdef list _key_where    # key id -> {node id: index in that node's id array}, or None
    cdef list _key_free     # free key ids
    cdef uint64_t* _stamps  # key id -> generation of the last match() that emitted it
    cdef Py_ssize_t _scap   # capacity of _stamps (>= len(_keys))
    cdef uint64_t _generation  # bumped by every match()
    cdef bint _busy         # inside add/remove/remove_key/filters_of (re-entry guard)
    # counters
    cdef Py_ssize_t _nsubs  # (filter, key) pairs
    cdef Py_ssize_t _nfilters  # nodes with >= 1 subscription

    cdef int _init_storage(self) except -1
    cdef void _free_storage(self) noexcept
    cdef int _grow_nodes(self) except -1
    cdef int32_t _new_node(self, int32_t parent, int kind) except -2
    cdef void _release_node(self, int32_t nid) noexcept
    cdef int _grow_edges(self, uint64_t new_capacity) except -1
    cdef int32_t _find_exact(self, int32_t parent, const char* p, Py_ssize_t n,
                             uint64_t h) noexcept
    cdef int32_t _add_exact(self, int32_t parent, const char* p, Py_ssize_t n,
                            uint64_t h) except -2
    cdef void _unlink_exact(self, int32_t nid) noexcept
    cdef void _prune(self, int32_t nid) noexcept
    cdef int _reset_if_empty(self) except -1
    cdef int32_t _insert_filter(self, const char* p, Level* levels,
                                Py_ssize_t nlevels) except -2
    cdef int32_t _find_filter(self, object filt) except -2
    cdef Py_ssize_t _key_id(self, object key, bint create) except -2
    cdef int _drop_key(self, Py_ssize_t kid) except -1
    cdef int _subscribe(self, int32_t nid, object filt, Py_ssize_t kid) except -1
    cdef int _unsubscribe(self, int32_t nid, Py_ssize_t kid) except -1
    cdef int _check_intact(self) except -1
    cdef int _enter(self) except -1
    cdef list _search(self, object topic, bint want_filters)
