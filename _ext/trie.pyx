"""MQTT 5 topic filter index: which subscriptions match a published topic.

The algorithm
=============

Filters are stored in a trie of *levels* (the strings between ``/``).  Node 0 is the root,
the empty prefix.  Each node has three kinds of children:

* exact children, one per literal level, found through one flat hash table shared by the
  whole trie and keyed by ``(parent node id, hash of the level bytes)`` (the layout EMQX
  uses for its edge table, here as open addressing in C instead of ETS);
* at most one ``+`` child and at most one ``#`` child, kept as direct node ids on the
  parent, because every search asks for them at every level.

Keys are interned: each distinct key gets a small integer id (reused after the key goes
away).  A node where a filter ends holds the ids of its subscribed keys (two inline in the
node, more in a C array) and the filter string itself.

Adding ``a/+/c`` walks root -a-> n1 -+-> n2 -c-> n3 creating what is missing, and puts the
key's id in n3.  Removing the last key of a filter frees the nodes that no longer lead
anywhere, bottom up, so a trie emptied by removals holds no nodes at all.

Matching a topic is one pass over its UTF-8 bytes followed by a depth-first walk:

1. The pass splits the topic into levels, hashes each level and validates it at the same
   time (no ``+``, ``#`` or U+0000), 8 bytes per step (trie_scan.h), so the public
   ``match`` costs no extra scan for validation and creates no Python object per level.
2. The walk starts at the root with level 0 and keeps (node, next level) pairs on an
   explicit stack.  Visiting (node, i):
   - if the node has a ``#`` child, that child's subscribers match: ``#`` matches the
     remaining levels, none included (``a/#`` matches ``a``);
   - if i == number of levels, the node's own subscribers match and the walk goes no deeper;
   - otherwise (node.plus, i + 1) and (exact child for level i, i + 1) are pushed.
   At the root, if the topic starts with ``$``, the ``+`` and ``#`` children are skipped
   [MQTT-4.7.2-1].

Worked example.  Filters ``a/+/c`` (key K1), ``a/#`` (K2), ``+/b/#`` (K1), ``#`` (K3);
topic ``a/b/c`` (levels a, b, c):

    visit (root, 0): root.# -> K3.          push (root.+, 1), (a, 1)
    visit (a, 1):    a.#    -> K2.          push (a/+, 2); no exact child "b" under a
    visit (a/+, 2):  no #.                  push (a/+/c, 3)
    visit (a/+/c,3): i == 3 -> K1.
    visit (+, 1):    no #.                  push (+/b, 2)
    visit (+/b, 2):  +/b/#  -> K1 again: skipped, its stamp says "this match" already.

    result: [K3, K2, K1]

Topic ``$SYS/x`` against the same filters: the root's ``+`` and ``#`` are skipped, the
exact child ``$SYS`` does not exist, so nothing matches.

Distinct keys without hashing them: every match bumps ``_generation``; a key id is emitted
only if its stamp (a C array indexed by key id) differs from the current generation, and is
then stamped.  A node is reached by at most one path for a given topic (the path spells the
node's filter), so ``match_filters`` needs no de-duplication at all.  The walk gathers
borrowed references in a C buffer and builds the result list once, at its final size.

Costs: a match is O(topic bytes + visited nodes + matching subscriptions); add and remove are
O(filter bytes) plus amortised growth.  Memory: one 64-byte cache line per node (labels of
up to 20 bytes inline), 16 bytes per edge slot at a load factor <= 1/2, 8 bytes of stamp
plus list slots and a small dict per key.  C memory comes from PyMem_Malloc, so tracemalloc
sees all of it.

Hash flooding: level hashes are keyed with secrets drawn from os.urandom when the module is
imported, so clients cannot craft filters that collide in the edge table.

Garbage collection: the only references to keys are in the Python containers ``_keys`` and
``_key_ids``, which the collector traverses, so reference cycles through keys are found.  C
memory only holds ids, and ``TrieNode.filter`` (a ``str``, which cannot be part of a cycle).
If a cycle teardown clears those containers, the trie raises RuntimeError from then on
instead of reading freed memory.

Re-entry: add, remove, remove_key and filters_of hash and compare keys, which runs the keys'
``__hash__`` / ``__eq__`` (any Python code) while they hold key and node ids.  A call back
into add, remove, remove_key, filters_of or clear from there raises RuntimeError instead of
corrupting the trie; the read-only methods stay usable.
"""

cimport cython
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.object cimport PyObject
from cpython.ref cimport Py_DECREF, Py_INCREF
from libc.stdint cimport int32_t, uint8_t, uint16_t, uint64_t
from libc.string cimport memcmp, memcpy, memset

import os as _os


cdef extern from "Python.h":
    # Declared without an exception clause: a NULL return (a lone surrogate) is turned into
    # our own ValueError, off the fast path.
    const char* _utf8_of "PyUnicode_AsUTF8AndSize"(object s, Py_ssize_t* size)
    bint PyUnicode_CheckExact(object o)
    bint PyUnicode_Check(object o)
    object PyUnicode_FromObject(object o)
    void PyErr_Clear()
    ctypedef struct PyListObject:
        PyObject** ob_item
    list PyList_New(Py_ssize_t size)
    void PyList_SET_ITEM(object lst, Py_ssize_t i, PyObject* item)   # steals the reference


cdef extern from "trie_scan.h" nogil:
    uint64_t trie_load(const char* p, size_t n)
    uint64_t trie_specials(uint64_t w)
    uint64_t trie_low_bytes(size_t n)
    unsigned trie_first_byte(uint64_t mask)
    uint64_t trie_mum(uint64_t a, uint64_t b)
    void trie_prefetch(const void* p)
    bint trie_equal(const char* a, const char* b, size_t n)


# ---------------------------------------------------------------------------------------------
# Limits and constants

cdef Py_ssize_t _MAX_BYTES = 65535
MAX_TOPIC_BYTES = _MAX_BYTES

cdef enum:
    # Levels and pending visits kept on the C stack by a search; deeper topics use the heap.
    STACK_LEVELS = 64
    # Results gathered on the C stack before spilling to the heap.
    STACK_RESULTS = 64
    INITIAL_NODES = 64
    INITIAL_EDGES = 64
    INITIAL_KEYS = 64

# Node ids are int32; stop well before the sign bit.
cdef int32_t _MAX_NODES = 1 << 30

# Scanner results.
cdef enum:
    SCAN_OK = 0
    SCAN_EMPTY = 1
    SCAN_TOO_LONG = 2
    SCAN_NUL = 3
    SCAN_WILDCARD_IN_TOPIC = 4
    SCAN_PLUS_NOT_WHOLE = 5
    SCAN_POUND_NOT_WHOLE = 6
    SCAN_POUND_NOT_LAST = 7
    SCAN_NEED_MORE = 8          # internal: the level buffer is too small

cdef const char* _SHARE_PREFIX = b"$share/"

# Hash secrets, fresh for every process (see "Hash flooding" above).
cdef uint64_t _S0, _S1, _S2, _S3, _S4
_S0, _S1, _S2, _S3, _S4 = [
    int.from_bytes(_os.urandom(8), "little") | 1 for _ in range(5)
]


# ---------------------------------------------------------------------------------------------
# Hashing

cdef inline uint64_t _mix(uint64_t h, uint64_t w) noexcept nogil:
    return trie_mum(w ^ _S1, h ^ _S2)


cdef inline uint64_t _finish(uint64_t h, Py_ssize_t n) noexcept nogil:
    return trie_mum(h ^ <uint64_t>n, _S3)


cdef uint64_t _hash_level(const char* p, Py_ssize_t n) noexcept nogil:
    """The hash _scan computes for a level: words of 8 bytes, the last one zero padded."""
    cdef uint64_t h = _S0
    cdef Py_ssize_t i = 0
    while n - i >= 8:
        h = _mix(h, trie_load(p + i, 8))
        i += 8
    if i < n:
        h = _mix(h, trie_load(p + i, n - i))
    return _finish(h, n)


cdef inline uint64_t _edge_key(int32_t parent, uint64_t label_hash) noexcept nogil:
    return trie_mum(label_hash ^ _S4, <uint64_t>parent ^ _S1)


# ---------------------------------------------------------------------------------------------
# Scanning and validation (C level, shared by every entry point)

cdef inline const char* _as_utf8(object s, Py_ssize_t* n, str what) except NULL:
    """UTF-8 bytes of ``s`` (cached on the str by CPython); TypeError / ValueError otherwise."""
    cdef const char* p
    if not PyUnicode_Check(s):
        raise TypeError(f"{what} must be str, not {type(s).__name__}")
    p = _utf8_of(s, n)
    if p == NULL:
        PyErr_Clear()
        raise ValueError(
            f"{what} is not valid UTF-8: it contains a lone surrogate [MQTT-1.5.4-1]"
        )
    return p


@cython.cdivision(True)
cdef inline int _scan(const char* p, Py_ssize_t n, bint is_filter, Level* out,
                      Py_ssize_t cap, Py_ssize_t* nlevels) noexcept nogil:
    """Split p[:n] into levels (offset, length, hash) and validate it, in one pass.

    Returns SCAN_OK and sets *nlevels, or the first rule broken.  SCAN_NEED_MORE means more
    than ``cap`` levels: the caller retries with n + 1 slots (the most there can be).
    A wildcard level of a filter gets hash 0 (it is never looked up by hash).
    """
    cdef Py_ssize_t i = 0, start = 0, nl = 0, j, rem
    cdef uint64_t h = _S0, w, special
    cdef char c
    if n == 0:
        return SCAN_EMPTY
    if n > _MAX_BYTES:
        return SCAN_TOO_LONG
    while True:
        rem = n - i
        if rem == 0:
            j = n
        else:
            w = trie_load(p + i, rem)
            special = trie_specials(w) & trie_low_bytes(rem)
            if special == 0:
                h = _mix(h, w)
                if rem > 8:
                    i += 8
                    continue
                j = n
            else:
                j = i + trie_first_byte(special)
                if j > i:
                    h = _mix(h, w & trie_low_bytes(j - i))
                c = p[j]
                if c == b"+" or c == b"#":
                    if not is_filter:
                        return SCAN_WILDCARD_IN_TOPIC
                    if j != start or (j + 1 < n and p[j + 1] != b"/"):
                        return SCAN_PLUS_NOT_WHOLE if c == b"+" else SCAN_POUND_NOT_WHOLE
                    if c == b"#" and j + 1 != n:
                        return SCAN_POUND_NOT_LAST
                    if nl == cap:
                        return SCAN_NEED_MORE
                    out[nl].hash = 0
                    out[nl].start = <int32_t>j
                    out[nl].length = 1
                    nl += 1
                    if j + 1 == n:
                        break
                    i = start = j + 2     # skip the '/' after the wildcard
                    h = _S0
                    continue
                if c == 0:
                    return SCAN_NUL
        # a level ends at j: a '/' or the end of the string
        if nl == cap:
            return SCAN_NEED_MORE
        out[nl].hash = _finish(h, j - start)
        out[nl].start = <int32_t>start
        out[nl].length = <int32_t>(j - start)
        nl += 1
        if j == n:
            break
        i = start = j + 1
        h = _S0
    nlevels[0] = nl
    return SCAN_OK


cdef object _scan_error(int err, str what):
    """The ValueError for a scanner result, naming the rule (MQTT 5 section numbers)."""
    if err == SCAN_EMPTY:
        msg = f"{what} must not be empty [MQTT-4.7.3-1]"
    elif err == SCAN_TOO_LONG:
        msg = f"{what} is longer than 65,535 UTF-8 bytes [MQTT-4.7.3-3]"
    elif err == SCAN_NUL:
        msg = f"{what} must not contain U+0000 [MQTT-4.7.3-2]"
    elif err == SCAN_WILDCARD_IN_TOPIC:
        msg = f"{what} must not contain the wildcards '+' or '#' [MQTT-3.3.2-2]"
    elif err == SCAN_PLUS_NOT_WHOLE:
        msg = f"'+' must occupy a whole level of a {what} [MQTT-4.7.1-2]"
    elif err == SCAN_POUND_NOT_WHOLE:
        msg = f"'#' must occupy a whole level of a {what} [MQTT-4.7.1-1]"
    else:
        msg = f"'#' must be the last level of a {what} [MQTT-4.7.1-1]"
    return ValueError(msg)


cdef Level* _levels(const char* p, Py_ssize_t n, bint is_filter, Level* buf,
                    Level** heap, Py_ssize_t* nlevels, str what) except NULL:
    """Scan into ``buf`` (STACK_LEVELS slots), falling back to one heap buffer (*heap,
    which the caller frees) for more levels.  Raises the scanner's ValueError."""
    cdef int err = _scan(p, n, is_filter, buf, STACK_LEVELS, nlevels)
    if err == SCAN_OK:
        return buf
    if err == SCAN_NEED_MORE:
        heap[0] = <Level*>PyMem_Malloc((n + 1) * sizeof(Level))
        if heap[0] == NULL:
            raise MemoryError()
        err = _scan(p, n, is_filter, heap[0], n + 1, nlevels)
        if err == SCAN_OK:
            return heap[0]
    raise _scan_error(err, what)


cdef inline bint _is_shared(const char* p, Py_ssize_t n) noexcept nogil:
    return n >= 7 and memcmp(p, _SHARE_PREFIX, 7) == 0


cdef int _check(object s, bint is_filter, str what) except -1:
    """Validate a topic name, or a filter without looking at ``$share/`` (the inner filter of
    one, say)."""
    cdef Level buf[STACK_LEVELS]
    cdef Level* heap = NULL
    cdef Py_ssize_t n, nl
    cdef const char* p = _as_utf8(s, &n, what)
    try:
        _levels(p, n, is_filter, buf, &heap, &nl, what)
    finally:
        PyMem_Free(heap)
    return 0


cdef tuple _split_shared(object filt, Py_ssize_t nbytes):
    """(group, inner filter) of a well-formed ``$share/<group>/<filter>`` (a str that starts
    with ``$share/``, ``nbytes`` UTF-8 bytes long); ValueError naming the rule otherwise."""
    cdef str group, inner
    if nbytes > _MAX_BYTES:
        raise _scan_error(SCAN_TOO_LONG, "topic filter")
    parts = str.split(filt, "/", 2)
    if len(parts) < 3:
        raise ValueError(
            "shared subscription needs a share name and a filter: $share/<group>/<filter>"
            " [MQTT-4.8.2-1]"
        )
    group = parts[1]
    inner = parts[2]
    if not group:
        raise ValueError("shared subscription share name must not be empty [MQTT-4.8.2-1]")
    if "+" in group or "#" in group:
        raise ValueError(
            "shared subscription share name must not contain '+' or '#' [MQTT-4.8.2-2]"
        )
    if "\x00" in group:
        raise _scan_error(SCAN_NUL, "shared subscription share name")
    if inner.startswith("$share/"):
        raise ValueError(
            "the filter of a shared subscription must not itself be a $share/ filter"
        )
    try:
        _check(inner, True, "topic filter")
    except ValueError as exc:
        raise ValueError(f"shared subscription {group!r}: {exc}") from None
    return (group, inner)


cdef int _reject_shared(object filt, Py_ssize_t nbytes) except -1:
    _split_shared(filt, nbytes)   # a malformed $share/ filter gets its own message first
    raise ValueError(
        "shared subscription filters are not added to a TopicTrie: call parse_shared() and"
        " add the inner filter (the control plane keeps the groups)"
    )


# ---------------------------------------------------------------------------------------------
# Public module functions

def validate_topic(topic):
    """Raise ValueError (naming the MQTT rule broken) unless ``topic`` is a valid topic name.

    A topic name is a non-empty str of at most 65,535 UTF-8 bytes without U+0000, lone
    surrogates or the wildcards ``+`` and ``#``.  Non-str: TypeError.
    """
    _check(topic, False, "topic name")


def validate_filter(filter):
    """Raise ValueError (naming the MQTT rule broken) unless ``filter`` is a valid filter.

    The topic-name rules apply, except that ``+`` may occupy a whole level and ``#`` the
    whole last level.  ``$share/<group>/<filter>`` is accepted when the group is non-empty
    without ``/``, ``+``, ``#`` and the inner filter is a valid plain filter.
    Non-str: TypeError.
    """
    parse_shared(filter)


def parse_shared(filter):
    """``(group, inner_filter)`` for ``$share/<group>/<filter>``, ``None`` for a plain filter.

    Validates either kind fully: ValueError for a malformed ``$share/`` filter (``$share/``,
    ``$share/g``, ``$share//a``, ``$share/g+/a``, ...) or an invalid plain filter.
    """
    cdef Py_ssize_t n
    cdef const char* p = _as_utf8(filter, &n, "topic filter")
    if _is_shared(p, n):
        return _split_shared(filter, n)
    _check(filter, True, "topic filter")
    return None


# ---------------------------------------------------------------------------------------------
# Node helpers

cdef inline const char* _label_of(TrieNode* node) noexcept nogil:
    cdef char* heap
    if node.label_len <= INLINE_LABEL:
        return node.label
    memcpy(&heap, node.label, sizeof(char*))
    return heap


cdef inline int32_t* _ids_of(TrieNode* node) noexcept nogil:
    if node.subs_cap == INLINE_SUBS:
        return node.subs.small
    return node.subs.heap


cdef void _free_node_memory(TrieNode* node) noexcept:
    """Free a node's heap label and id array, and drop its filter reference."""
    cdef char* heap
    if node.kind == KIND_EXACT and node.label_len > INLINE_LABEL:
        memcpy(&heap, node.label, sizeof(char*))
        PyMem_Free(heap)
    node.label_len = 0
    if node.subs_cap != INLINE_SUBS:
        PyMem_Free(node.subs.heap)
        node.subs_cap = INLINE_SUBS
    if node.filter != NULL:
        Py_DECREF(<object>node.filter)
        node.filter = NULL


cdef inline int _push(Collected* c, PyObject* item) except -1:
    """Append a borrowed reference to the search's result buffer."""
    cdef PyObject** bigger
    if c.n == c.cap:
        bigger = <PyObject**>PyMem_Realloc(c.heap, 2 * c.cap * sizeof(PyObject*))
        if bigger == NULL:
            raise MemoryError()
        if c.heap == NULL:
            memcpy(bigger, c.items, c.n * sizeof(PyObject*))
        c.heap = bigger
        c.items = bigger
        c.cap *= 2
    c.items[c.n] = item
    c.n += 1
    return 0


cdef inline int _emit(Collected* c, TrieNode* node, PyObject** keys, uint64_t* stamps,
                      uint64_t gen, bint want_filter) except -1:
    """Gather node's filter, or those of its keys not yet stamped with ``gen``."""
    cdef int32_t* ids
    cdef int32_t j, kid
    if node.nsubs == 0:
        return 0
    if want_filter:
        return _push(c, node.filter)
    ids = _ids_of(node)
    for j in range(node.nsubs):
        kid = ids[j]
        if stamps[kid] != gen:
            stamps[kid] = gen
            trie_prefetch(keys[kid])        # the result list will incref it
            _push(c, keys[kid])
    return 0


@cython.final
cdef class TopicTrie:
    """Index of MQTT topic filters -> subscription keys; ``match(topic)`` finds the keys.

    ``add(filter, key)`` subscribes any hashable ``key`` to a topic filter; ``match(topic)``
    returns the distinct keys whose filters match (order unspecified).  See
    docs/cores/trie.md for the semantics and limits.
    """

    def __cinit__(self):
        self._nodes = NULL
        self._edges = NULL
        self._stamps = NULL
        self._init_storage()

    def __dealloc__(self):
        self._free_storage()

    # ---- storage ------------------------------------------------------------------------

    cdef int _init_storage(self) except -1:
        """Fresh, empty storage: the root node, an empty edge table, no keys."""
        cdef TrieNode* nodes = <TrieNode*>PyMem_Malloc(INITIAL_NODES * sizeof(TrieNode))
        cdef EdgeSlot* edges = <EdgeSlot*>PyMem_Malloc(INITIAL_EDGES * sizeof(EdgeSlot))
        cdef uint64_t* stamps = <uint64_t*>PyMem_Malloc(INITIAL_KEYS * sizeof(uint64_t))
        cdef Py_ssize_t i
        if nodes == NULL or edges == NULL or stamps == NULL:
            PyMem_Free(nodes)
            PyMem_Free(edges)
            PyMem_Free(stamps)
            raise MemoryError()
        # the old containers (if any) are released when this function returns, after the
        # trie is consistent again: releasing keys may run arbitrary __del__ code
        old = (self._key_ids, self._keys, self._key_where, self._key_free)
        for i in range(INITIAL_EDGES):
            edges[i].child = -1
        memset(&nodes[0], 0, sizeof(TrieNode))
        nodes[0].parent = -1
        nodes[0].plus = -1
        nodes[0].pound = -1
        nodes[0].subs_cap = INLINE_SUBS
        nodes[0].kind = KIND_ROOT
        self._nodes = nodes
        self._ncap = INITIAL_NODES
        self._nused = 1
        self._free = -1
        self._nlive = 0
        self._edges = edges
        self._emask = INITIAL_EDGES - 1
        self._nedges = 0
        self._key_ids = {}
        self._keys = []
        self._key_where = []
        self._key_free = []
        self._stamps = stamps
        self._scap = INITIAL_KEYS
        self._nsubs = 0
        self._nfilters = 0
        return 0

    cdef void _free_storage(self) noexcept:
        """Free the C memory (the Python containers are replaced by _init_storage)."""
        cdef int32_t i
        if self._nodes != NULL:
            for i in range(self._nused):
                if self._nodes[i].kind != KIND_FREE:
                    _free_node_memory(&self._nodes[i])
            PyMem_Free(self._nodes)
            self._nodes = NULL
        PyMem_Free(self._edges)
        self._edges = NULL
        PyMem_Free(self._stamps)
        self._stamps = NULL
        self._ncap = 0
        self._nused = 0
        self._scap = 0

    cdef int _grow_nodes(self) except -1:
        cdef int32_t new_cap = self._ncap * 2
        cdef TrieNode* nodes
        if self._ncap >= _MAX_NODES:
            raise MemoryError("TopicTrie is limited to 2**30 nodes")
        nodes = <TrieNode*>PyMem_Realloc(self._nodes, new_cap * sizeof(TrieNode))
        if nodes == NULL:
            raise MemoryError()
        self._nodes = nodes
        self._ncap = new_cap
        return 0

    cdef int32_t _new_node(self, int32_t parent, int kind) except -2:
        cdef int32_t nid
        cdef TrieNode* node
        if self._free >= 0:
            nid = self._free
            self._free = self._nodes[nid].parent
        else:
            if self._nused == self._ncap:
                self._grow_nodes()
            nid = self._nused
            self._nused += 1
        node = &self._nodes[nid]
        memset(node, 0, sizeof(TrieNode))
        node.parent = parent
        node.plus = -1
        node.pound = -1
        node.subs_cap = INLINE_SUBS
        node.kind = <uint8_t>kind
        self._nlive += 1
        return nid

    cdef void _release_node(self, int32_t nid) noexcept:
        cdef TrieNode* node = &self._nodes[nid]
        _free_node_memory(node)
        node.kind = KIND_FREE
        node.parent = self._free
        self._free = nid
        self._nlive -= 1

    cdef int _grow_edges(self, uint64_t new_capacity) except -1:
        cdef EdgeSlot* old = self._edges
        cdef uint64_t old_cap = self._emask + 1
        cdef EdgeSlot* table = <EdgeSlot*>PyMem_Malloc(new_capacity * sizeof(EdgeSlot))
        cdef uint64_t i, j, mask = new_capacity - 1
        if table == NULL:
            raise MemoryError()
        for i in range(new_capacity):
            table[i].child = -1
        for i in range(old_cap):
            if old[i].child >= 0:
                j = old[i].key & mask
                while table[j].child >= 0:
                    j = (j + 1) & mask
                table[j] = old[i]
        self._edges = table
        self._emask = mask
        PyMem_Free(old)
        return 0

    # ---- exact edges ----------------------------------------------------------------------

    cdef int32_t _find_exact(self, int32_t parent, const char* p, Py_ssize_t n,
                             uint64_t h) noexcept:
        cdef uint64_t key = _edge_key(parent, h)
        cdef uint64_t mask = self._emask, i = key & mask
        cdef EdgeSlot* slot
        cdef TrieNode* node
        while True:
            slot = &self._edges[i]
            if slot.child < 0:
                return -1
            if slot.key == key:
                node = &self._nodes[slot.child]
                if (node.parent == parent and node.label_len == n
                        and trie_equal(_label_of(node), p, n)):
                    return slot.child
            i = (i + 1) & mask

    cdef int32_t _add_exact(self, int32_t parent, const char* p, Py_ssize_t n,
                            uint64_t h) except -2:
        cdef uint64_t key = _edge_key(parent, h), i
        cdef int32_t nid
        cdef TrieNode* node
        cdef char* heap = NULL
        if <uint64_t>(self._nedges + 1) * 2 > self._emask + 1:
            self._grow_edges((self._emask + 1) * 2)
        if n > INLINE_LABEL:
            heap = <char*>PyMem_Malloc(n)
            if heap == NULL:
                raise MemoryError()
            memcpy(heap, p, n)
        try:
            nid = self._new_node(parent, KIND_EXACT)
        except MemoryError:
            PyMem_Free(heap)
            raise
        node = &self._nodes[nid]
        node.label_len = <uint16_t>n
        if heap != NULL:
            memcpy(node.label, &heap, sizeof(char*))
        else:
            memcpy(node.label, p, n)
        i = key & self._emask
        while self._edges[i].child >= 0:
            i = (i + 1) & self._emask
        self._edges[i].key = key
        self._edges[i].child = nid
        self._nedges += 1
        self._nodes[parent].nchildren += 1
        return nid

    cdef void _unlink_exact(self, int32_t nid) noexcept:
        """Delete the edge leading to ``nid`` (backward-shift deletion, no tombstones)."""
        cdef TrieNode* node = &self._nodes[nid]
        cdef uint64_t mask = self._emask
        cdef uint64_t key = _edge_key(node.parent, _hash_level(_label_of(node), node.label_len))
        cdef uint64_t i = key & mask, j, home
        cdef EdgeSlot* edges = self._edges
        while edges[i].child != nid:
            i = (i + 1) & mask
        j = i
        while True:
            j = (j + 1) & mask
            if edges[j].child < 0:
                break
            home = edges[j].key & mask
            # The entry at j moves back into the hole at i unless its home slot lies
            # cyclically in (i, j].
            if (j > i and (home <= i or home > j)) or (j < i and home <= i and home > j):
                edges[i] = edges[j]
                i = j
        edges[i].child = -1
        self._nedges -= 1
        self._nodes[node.parent].nchildren -= 1

    cdef void _prune(self, int32_t nid) noexcept:
        """Free ``nid`` and its ancestors while they hold nothing: no subscriber, no child."""
        cdef TrieNode* node
        cdef int32_t parent
        while nid > 0:
            node = &self._nodes[nid]
            if node.nsubs or node.nchildren or node.plus >= 0 or node.pound >= 0:
                return
            parent = node.parent
            if node.kind == KIND_EXACT:
                self._unlink_exact(nid)
            elif node.kind == KIND_PLUS:
                self._nodes[parent].plus = -1
            else:
                self._nodes[parent].pound = -1
            self._release_node(nid)
            nid = parent

    cdef int _reset_if_empty(self) except -1:
        """Give the high-water memory back once the last subscription is gone."""
        if self._nlive == 0 and (self._ncap > INITIAL_NODES
                                 or self._emask + 1 > INITIAL_EDGES
                                 or self._scap > INITIAL_KEYS):
            self._free_storage()
            self._init_storage()
        return 0

    # ---- filters ----------------------------------------------------------------------------

    cdef int32_t _insert_filter(self, const char* p, Level* levels,
                                Py_ssize_t nlevels) except -2:
        """Node id of the filter given as scanned levels, creating the missing nodes."""
        cdef int32_t nid = 0, child
        cdef Py_ssize_t i
        cdef Level* lv
        cdef char c
        try:
            for i in range(nlevels):
                lv = &levels[i]
                c = p[lv.start] if lv.length == 1 else 0
                if c == b"+":
                    child = self._nodes[nid].plus
                    if child < 0:
                        child = self._new_node(nid, KIND_PLUS)
                        self._nodes[nid].plus = child
                elif c == b"#":
                    child = self._nodes[nid].pound
                    if child < 0:
                        child = self._new_node(nid, KIND_POUND)
                        self._nodes[nid].pound = child
                else:
                    child = self._find_exact(nid, p + lv.start, lv.length, lv.hash)
                    if child < 0:
                        child = self._add_exact(nid, p + lv.start, lv.length, lv.hash)
                nid = child
        except MemoryError:
            self._prune(nid)
            raise
        return nid

    cdef int32_t _find_filter(self, object filt) except -2:
        """Node id of a valid plain filter (ValueError otherwise), -1 if no node spells it."""
        cdef Level buf[STACK_LEVELS]
        cdef Level* heap = NULL
        cdef Level* levels
        cdef Level* lv
        cdef Py_ssize_t n, nl, i
        cdef const char* p = _as_utf8(filt, &n, "topic filter")
        cdef int32_t nid = 0
        cdef char c
        try:
            levels = _levels(p, n, True, buf, &heap, &nl, "topic filter")
            if _is_shared(p, n):
                _reject_shared(filt, n)
            for i in range(nl):
                lv = &levels[i]
                c = p[lv.start] if lv.length == 1 else 0
                if c == b"+":
                    nid = self._nodes[nid].plus
                elif c == b"#":
                    nid = self._nodes[nid].pound
                else:
                    nid = self._find_exact(nid, p + lv.start, lv.length, lv.hash)
                if nid < 0:
                    return -1
            return nid
        finally:
            PyMem_Free(heap)

    # ---- keys and subscriptions -------------------------------------------------------------

    cdef Py_ssize_t _key_id(self, object key, bint create) except -2:
        """Id of ``key`` (-1 if unknown and not ``create``); TypeError if unhashable."""
        cdef Py_ssize_t kid
        cdef uint64_t* stamps
        try:
            found = self._key_ids.get(key)
        except TypeError as exc:
            raise TypeError(f"subscription key must be hashable: {exc}") from None
        if found is not None:
            return found
        if not create:
            return -1
        if self._key_free:
            kid = self._key_free.pop()
            self._keys[kid] = key
            self._key_where[kid] = {}
        else:
            kid = len(self._keys)
            if kid == self._scap:
                stamps = <uint64_t*>PyMem_Realloc(self._stamps,
                                                  2 * self._scap * sizeof(uint64_t))
                if stamps == NULL:
                    raise MemoryError()
                self._stamps = stamps
                self._scap *= 2
            self._key_where.append({})
            self._keys.append(key)
        self._stamps[kid] = 0
        try:
            self._key_ids[key] = kid
        except BaseException:
            self._keys[kid] = None
            self._key_where[kid] = None
            self._key_free.append(kid)
            raise
        return kid

    cdef int _drop_key(self, Py_ssize_t kid) except -1:
        """Forget a key that has no subscription left; its id becomes free."""
        key = self._keys[kid]
        self._keys[kid] = None
        self._key_where[kid] = None
        self._key_free.append(kid)
        del self._key_ids[key]
        return 0

    cdef int _subscribe(self, int32_t nid, object filt, Py_ssize_t kid) except -1:
        cdef TrieNode* node = &self._nodes[nid]
        cdef int32_t* ids
        cdef int32_t new_cap
        cdef dict where = <dict>self._key_where[kid]
        if node.nsubs == node.subs_cap:
            new_cap = 2 * node.subs_cap
            ids = <int32_t*>PyMem_Malloc(new_cap * sizeof(int32_t))
            if ids == NULL:
                raise MemoryError()
            memcpy(ids, _ids_of(node), node.nsubs * sizeof(int32_t))
            if node.subs_cap != INLINE_SUBS:
                PyMem_Free(node.subs.heap)
            node.subs.heap = ids
            node.subs_cap = new_cap
        where[nid] = node.nsubs             # may raise MemoryError: nothing committed yet
        node = &self._nodes[nid]
        _ids_of(node)[node.nsubs] = <int32_t>kid
        node.nsubs += 1
        if node.nsubs == 1:
            Py_INCREF(filt)
            node.filter = <PyObject*>filt
            self._nfilters += 1
        self._nsubs += 1
        return 0

    cdef int _unsubscribe(self, int32_t nid, Py_ssize_t kid) except -1:
        """Remove key ``kid`` from node ``nid`` (the last id takes its place: O(1))."""
        cdef dict where = <dict>self._key_where[kid]
        cdef Py_ssize_t idx = where.pop(nid)
        cdef TrieNode* node = &self._nodes[nid]
        cdef int32_t* ids = _ids_of(node)
        cdef int32_t last = node.nsubs - 1, moved
        if idx != last:
            moved = ids[last]
            ids[idx] = moved
            (<dict>self._key_where[moved])[nid] = idx
        node.nsubs = last
        if node.subs_cap != INLINE_SUBS and last <= INLINE_SUBS:
            memcpy(node.subs.small, ids, last * sizeof(int32_t))
            PyMem_Free(ids)
            node.subs_cap = INLINE_SUBS
        if last == 0:
            Py_DECREF(<object>node.filter)
            node.filter = NULL
            self._nfilters -= 1
        self._nsubs -= 1
        return 0

    cdef int _check_intact(self) except -1:
        # Only a reference-cycle teardown by the garbage collector (tp_clear), or a failed
        # clear(), can break this; after that the trie refuses to work instead of crashing.
        if (self._nodes == NULL or self._key_ids is None or self._keys is None
                or self._key_where is None or self._key_free is None
                or len(self._keys) != len(self._key_where) or len(self._keys) > self._scap):
            raise RuntimeError("this TopicTrie was cleared by the garbage collector")
        return 0

    cdef int _enter(self) except -1:
        """Start a call that runs keys' __hash__ / __eq__; the caller resets _busy."""
        self._check_intact()
        if self._busy:
            raise RuntimeError(
                "TopicTrie changed while one of its calls is running (from a key's __hash__"
                " or __eq__?)"
            )
        self._busy = True
        return 0

    # ---- public API -----------------------------------------------------------------------

    def add(self, filter, key):
        """Subscribe ``key`` to ``filter``; True if the pair is new, False if already there.

        ``filter`` must be a valid plain topic filter (ValueError otherwise; a
        ``$share/<group>/<filter>`` filter is rejected: parse it with parse_shared() and add
        the inner filter).  ``key`` must be hashable (TypeError).  On error nothing changes.
        """
        cdef Level buf[STACK_LEVELS]
        cdef Level* heap = NULL
        cdef Level* levels
        cdef Py_ssize_t n, nl, kid
        cdef const char* p = _as_utf8(filter, &n, "topic filter")
        cdef int32_t nid = -1
        self._enter()
        try:
            levels = _levels(p, n, True, buf, &heap, &nl, "topic filter")
            if _is_shared(p, n):
                _reject_shared(filter, n)
            kid = self._key_id(key, True)
            try:
                nid = self._insert_filter(p, levels, nl)
                if nid in <dict>self._key_where[kid]:
                    return False
                if not PyUnicode_CheckExact(filter):
                    filter = PyUnicode_FromObject(filter)
                self._subscribe(nid, filter, kid)
            except BaseException:
                if nid >= 0:
                    self._prune(nid)
                if not self._key_where[kid]:
                    self._drop_key(kid)
                raise
        finally:
            PyMem_Free(heap)
            self._busy = False
        return True

    def remove(self, filter, key):
        """Unsubscribe ``key`` from ``filter``; True if it was subscribed.

        Validates like add(); frees the trie nodes that become empty.
        """
        cdef int32_t nid
        cdef Py_ssize_t kid
        self._enter()
        try:
            nid = self._find_filter(filter)
            kid = self._key_id(key, False)
            if nid < 0 or kid < 0 or nid not in <dict>self._key_where[kid]:
                return False
            stored = self._keys[kid]    # released after _busy is reset: its __del__ may call us
            self._unsubscribe(nid, kid)
            self._prune(nid)
            if not self._key_where[kid]:
                self._drop_key(kid)
            self._reset_if_empty()
        finally:
            self._busy = False
        return True

    def remove_key(self, key):
        """Remove every subscription of ``key``; returns how many there were."""
        cdef Py_ssize_t kid, count = 0
        cdef int32_t nid
        self._enter()
        try:
            kid = self._key_id(key, False)
            if kid < 0:
                return 0
            stored = self._keys[kid]    # released after _busy is reset: its __del__ may call us
            for nid in list(<dict>self._key_where[kid]):
                self._unsubscribe(nid, kid)
                self._prune(nid)
                count += 1
            self._drop_key(kid)
            self._reset_if_empty()
        finally:
            self._busy = False
        return count

    def match(self, topic):
        """Distinct keys subscribed to a filter that matches ``topic`` (order unspecified).

        ``topic`` must be a valid topic name (TypeError / ValueError otherwise); the check
        runs in the same pass that splits and hashes the levels.
        """
        return self._search(topic, False)

    def match_filters(self, topic):
        """The subscribed filters that match ``topic`` (each once; order unspecified)."""
        return self._search(topic, True)

    def subscribers(self, filter):
        """Keys subscribed to exactly ``filter`` (no wildcard matching); [] if none."""
        cdef int32_t nid, j
        cdef TrieNode* node
        self._check_intact()
        nid = self._find_filter(filter)
        out = []
        if nid >= 0:
            node = &self._nodes[nid]
            for j in range(node.nsubs):
                out.append(self._keys[_ids_of(node)[j]])
        return out

    def filters_of(self, key):
        """Filters ``key`` is subscribed to; [] for an unknown key."""
        cdef Py_ssize_t kid
        cdef int32_t nid
        self._enter()
        try:
            kid = self._key_id(key, False)
            out = []
            if kid >= 0:
                for nid in <dict>self._key_where[kid]:
                    out.append(<object>self._nodes[nid].filter)
        finally:
            self._busy = False
        return out

    def clear(self):
        """Remove every subscription and give back the memory."""
        if self._busy:
            raise RuntimeError(
                "TopicTrie cleared while one of its calls is running (from a key's __hash__"
                " or __eq__?)"
            )
        self._free_storage()
        self._init_storage()

    @property
    def node_count(self):
        """Trie nodes in use, the root excluded (0 for a trie without subscriptions)."""
        return self._nlive

    def stats(self):
        """Sizes for monitoring and leak tests: counts, capacities and C bytes."""
        cdef int32_t i
        cdef Py_ssize_t extra = 0
        cdef TrieNode* node
        for i in range(self._nused):
            node = &self._nodes[i]
            if node.kind == KIND_FREE:
                continue
            if node.kind == KIND_EXACT and node.label_len > INLINE_LABEL:
                extra += node.label_len
            if node.subs_cap != INLINE_SUBS:
                extra += node.subs_cap * sizeof(int32_t)
        return {
            "subscriptions": self._nsubs,
            "filters": self._nfilters,
            "keys": len(self._key_ids) if self._key_ids is not None else 0,
            "nodes": self._nlive,
            "edges": self._nedges,
            "node_capacity": self._ncap,
            "edge_capacity": self._emask + 1 if self._edges != NULL else 0,
            "key_capacity": self._scap,
            "c_bytes": (self._ncap * sizeof(TrieNode)
                        + (self._emask + 1 if self._edges != NULL else 0) * sizeof(EdgeSlot)
                        + self._scap * sizeof(uint64_t) + extra),
        }

    def __len__(self):
        return self._nsubs

    def __contains__(self, filter):
        cdef int32_t nid
        self._check_intact()
        nid = self._find_filter(filter)
        return nid >= 0 and self._nodes[nid].nsubs > 0

    def __iter__(self):
        """The distinct subscribed filters (a snapshot: the trie may change meanwhile)."""
        cdef int32_t i
        snapshot = []
        for i in range(self._nused):
            if self._nodes[i].kind != KIND_FREE and self._nodes[i].filter != NULL:
                snapshot.append(<object>self._nodes[i].filter)
        return iter(snapshot)

    def __repr__(self):
        return (f"<TopicTrie {self._nsubs} subscriptions, {self._nfilters} filters, "
                f"{self._nlive} nodes>")

    def __reduce__(self):
        raise TypeError("TopicTrie cannot be pickled; rebuild it from its subscriptions")

    # ---- the search ------------------------------------------------------------------------

    cdef list _search(self, object topic, bint want_filters):
        cdef Level level_buf[STACK_LEVELS]
        cdef Pending pending_buf[STACK_LEVELS + 2]
        cdef PyObject* result_buf[STACK_RESULTS]
        cdef Collected found
        cdef Level* heap_levels = NULL
        cdef Pending* heap_pending = NULL
        cdef Level* levels
        cdef Pending* stack
        cdef Py_ssize_t n, nl, sp, i
        cdef const char* p
        cdef TrieNode* nodes
        cdef TrieNode* node
        cdef EdgeSlot* edges
        cdef uint64_t emask
        cdef int32_t nid, child
        cdef uint64_t gen
        cdef uint64_t* stamps
        cdef PyObject** keys
        cdef Level* lv
        cdef list out

        if PyUnicode_CheckExact(topic):
            p = _utf8_of(topic, &n)
            if p == NULL:
                PyErr_Clear()
                p = _as_utf8(topic, &n, "topic name")   # raises the ValueError
        else:
            p = _as_utf8(topic, &n, "topic name")
        self._check_intact()
        levels = _levels(p, n, False, level_buf, &heap_levels, &nl, "topic name")
        found.items = result_buf
        found.n = 0
        found.cap = STACK_RESULTS
        found.heap = NULL
        try:
            if nl > STACK_LEVELS:
                heap_pending = <Pending*>PyMem_Malloc((nl + 2) * sizeof(Pending))
                if heap_pending == NULL:
                    raise MemoryError()
                stack = heap_pending
            else:
                stack = pending_buf
            self._generation += 1
            gen = self._generation
            stamps = self._stamps
            keys = (<PyListObject*>self._keys).ob_item
            nodes = self._nodes
            edges = self._edges
            emask = self._emask
            # The root is visited here, so that the '$' rule stays out of the loop.
            node = &nodes[0]
            sp = 0
            if p[0] != b"$":
                if node.pound >= 0:
                    _emit(&found, &nodes[node.pound], keys, stamps, gen, want_filters)
                if node.plus >= 0:
                    stack[sp].node = node.plus
                    stack[sp].level = 1
                    sp += 1
            if node.nchildren:
                child = self._find_exact(0, p, levels[0].length, levels[0].hash)
                if child >= 0:
                    stack[sp].node = child
                    stack[sp].level = 1
                    sp += 1
            while sp:
                sp -= 1
                nid = stack[sp].node
                i = stack[sp].level
                node = &nodes[nid]
                # Start loading the wildcard children now; the exact lookup below waits
                # on memory anyway, so their cache misses overlap with it.
                if node.pound >= 0:
                    trie_prefetch(&nodes[node.pound])
                if i == nl:
                    if node.pound >= 0:
                        _emit(&found, &nodes[node.pound], keys, stamps, gen, want_filters)
                    _emit(&found, node, keys, stamps, gen, want_filters)
                    continue
                if node.plus >= 0:
                    trie_prefetch(&nodes[node.plus])
                    if i + 1 < nl:
                        trie_prefetch(&edges[_edge_key(node.plus, levels[i + 1].hash) & emask])
                    stack[sp].node = node.plus
                    stack[sp].level = <int32_t>(i + 1)
                    sp += 1
                if node.nchildren:
                    lv = &levels[i]
                    child = self._find_exact(nid, p + lv.start, lv.length, lv.hash)
                    if child >= 0:
                        if i + 1 < nl:
                            trie_prefetch(&edges[_edge_key(child, levels[i + 1].hash) & emask])
                        stack[sp].node = child
                        stack[sp].level = <int32_t>(i + 1)
                        sp += 1
                if node.pound >= 0:
                    _emit(&found, &nodes[node.pound], keys, stamps, gen, want_filters)
            out = PyList_New(found.n)
            for i in range(found.n):
                Py_INCREF(<object>found.items[i])
                PyList_SET_ITEM(out, i, found.items[i])
        finally:
            PyMem_Free(heap_levels)
            PyMem_Free(heap_pending)
            PyMem_Free(found.heap)
        return out
