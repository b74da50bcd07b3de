"""Kademlia routing table: k-buckets over 256-bit node ids, and an exact ``closest()``.

The model
=========

A node id is 32 bytes (256 bits, bit 0 = the most significant bit of byte 0).  The distance
between two ids is their XOR read as a 256-bit unsigned integer.  The table belongs to one
node, ``self_id``; every other id lives in **bucket i = cpl(id, self_id)**, the number of
leading bits it shares with ``self_id`` (0 .. 255; ``self_id`` itself has no bucket and is
never stored: ``add(self_id, ...)`` raises ValueError).  Bucket i therefore holds the ids at
distance [2**(255-i), 2**(256-i)) from ``self_id``.

A bucket holds at most ``k`` contacts, in least-recently-seen (LRS) to most-recently-seen
(MRS) order.  ``add`` of a new id to a full bucket does not evict anyone: it returns the LRS
id, which the caller should ping (this module makes no network calls), and queues the
newcomer in the bucket's **replacement list** (at most ``replacements`` entries, newest kept:
the oldest is dropped and counted).  If the LRS answers, the caller ``touch``es it (it moves
to the MRS end); if not, the caller ``remove``s it and the newest replacement is promoted
into the bucket.  ``add`` of a known id refreshes its contact and makes it MRS.

Storage
=======

Each contact has a slot in a C array of ``Entry`` (its id as four big-endian ``uint64``
words, ``last_seen``, the bucket's list links); its Python objects (the id ``bytes`` and the
contact) sit at the same index in two lists, so the garbage collector sees them.  Freed slots
are chained in a free list.  Each bucket is a doubly linked list of slots (O(1) move to the
MRS end, O(1) unlink).  Finally ``_order`` holds every stored slot **sorted by id**, as an
array of int32: the look-ups (``get``, ``touch``, ``remove``, ``in``) are a binary search in
it (O(log N) comparisons of 4 words, no dict, no hashing), and it is what ``closest``
walks.  An insertion or removal moves the tail of ``_order``: 4 bytes per contact after the
position, ~1 us for the half of a 10,000-contact table, nothing noticeable at the ~300
contacts of a real k = 20 table.

closest(target, n): an implicit binary trie
=========================================

Sorted by id, every subtree of the binary trie of the stored ids is a contiguous range of
``_order``, and the ids of a range [lo, hi) share all their bits before the first bit where
its first and last ids differ (call it d: they are sorted, so the range splits there into
[lo, m) with bit d = 0 and [m, hi) with bit d = 1, m found by a binary search on bit d).
Within a range the XOR distances to the target differ only from bit d on, so every id on the
target's side of bit d is nearer than every id on the other side.  The descent:

    range = everything; need = n
    while range has more than `need` ids:
        split at its first differing bit d into near (target's side of bit d) and far
        if |near| >= need: range = near
        else:              take all of near; need -= |near|; range = far
    take the whole range

takes whole subtrees in increasing order of distance and stops at exactly n ids (min(n, N)),
the n nearest: exact, no approximation.  For random ids it visits about log2(N / n) + 2
levels, each one binary search (log2 of the range) through the slot indirection; then the n
candidates get their full 256-bit distances (4 XORs each) and are sorted (insertion sort up
to 32, qsort above) and the (id, contact) tuples are built.  About 1 us at N = 10,000,
n = 20, three quarters of it building the 20 tuples and the list.  Ids sharing long prefixes
only add levels (each level fixes at least one more bit, at most 256).

This needs no k-bucket structure at all (``closest`` is the same for any k); the bucket
order the issue sketched (bucket cpl(target, self), then all deeper buckets, then shallower
ones one by one) is what this descent does on the first bits, without scanning the
thousands of contacts that bucket 0 holds in a large table.

Costs: add / touch / remove / get / in: O(log N) + the move of ``_order``'s tail on add and
remove; closest: O(levels * log N + n log n); bucket(i): O(|bucket|); stale_buckets: O(N).
Memory: 56 bytes of Entry + 4 of ``_order`` + 16 of list slots per contact (plus the id and
contact objects, which are the caller's).

Re-entry: a finaliser (``__del__``, a weakref callback) run by the garbage collector while a
table method is allocating, that calls a mutating method of the same table, gets a
RuntimeError; the table stays consistent.  Objects a call drops (a replaced contact, a
dropped replacement) are released after the table is consistent again.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_Check, PyBytes_GET_SIZE
from cpython.object cimport PyObject
from cpython.ref cimport Py_INCREF
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.tuple cimport PyTuple_GET_ITEM
from libc.stdint cimport int32_t, uint8_t, uint64_t
from libc.stdlib cimport qsort
from libc.string cimport memcmp, memcpy, memmove

import operator as _operator
import time as _time

cdef extern from *:
    """
    #include <string.h>
    #if defined(_MSC_VER)
    #include <intrin.h>
    static inline int macula_clz64(unsigned long long x) {
        unsigned long i; _BitScanReverse64(&i, x); return 63 - (int)i;
    }
    #else
    static inline int macula_clz64(unsigned long long x) { return __builtin_clzll(x); }
    #endif
    /* the 8 bytes at p as a big-endian integer (compilers turn this into one bswap load) */
    static inline unsigned long long macula_load_be64(const unsigned char* p) {
        return ((unsigned long long)p[0] << 56) | ((unsigned long long)p[1] << 48)
             | ((unsigned long long)p[2] << 40) | ((unsigned long long)p[3] << 32)
             | ((unsigned long long)p[4] << 24) | ((unsigned long long)p[5] << 16)
             | ((unsigned long long)p[6] << 8) | (unsigned long long)p[7];
    }
    """
    int macula_clz64(uint64_t x) noexcept nogil    # x != 0
    uint64_t macula_load_be64(const uint8_t* p) noexcept nogil


cdef extern from "Python.h":
    list PyList_New(Py_ssize_t size)
    void PyList_SET_ITEM(object lst, Py_ssize_t i, PyObject* item)   # steals the reference


ID_SIZE = ID_BYTES
BUCKETS = ID_BITS
DEFAULT_BUCKET_SIZE = DEFAULT_K

cdef object _monotonic = _time.monotonic


# ---------------------------------------------------------------------------------------------
# Ids as words

cdef inline int _load(object node_id, str what, uint64_t* w) except -1:
    """Check ``node_id`` (bytes, 32 long) and read it into 4 big-endian words."""
    cdef const uint8_t* p
    if not PyBytes_Check(node_id):
        raise TypeError(f"{what} must be bytes, not {type(node_id).__name__}")
    if PyBytes_GET_SIZE(node_id) != ID_BYTES:
        raise ValueError(
            f"{what} must be {ID_BYTES} bytes (a 256-bit id), not {PyBytes_GET_SIZE(node_id)}"
        )
    p = <const uint8_t*>PyBytes_AS_STRING(node_id)
    w[0] = macula_load_be64(p)
    w[1] = macula_load_be64(p + 8)
    w[2] = macula_load_be64(p + 16)
    w[3] = macula_load_be64(p + 24)
    return 0


cdef inline int _cpl(const uint64_t* a, const uint64_t* b) noexcept nogil:
    """Leading bits shared by a and b (256 when equal)."""
    cdef uint64_t x
    cdef int i
    for i in range(4):
        x = a[i] ^ b[i]
        if x:
            return i * 64 + macula_clz64(x)
    return ID_BITS


cdef inline bint _less(const uint64_t* a, const uint64_t* b) noexcept nogil:
    if a[0] != b[0]:
        return a[0] < b[0]
    if a[1] != b[1]:
        return a[1] < b[1]
    if a[2] != b[2]:
        return a[2] < b[2]
    return a[3] < b[3]


cdef inline bint _eq(const uint64_t* a, const uint64_t* b) noexcept nogil:
    return a[0] == b[0] and a[1] == b[1] and a[2] == b[2] and a[3] == b[3]


cdef inline bint _cand_less(const Cand* a, const Cand* b) noexcept nogil:
    return _less(a.d, b.d)


cdef int _cand_cmp(const void* a, const void* b) noexcept nogil:
    if _less((<const Cand*>a).d, (<const Cand*>b).d):
        return -1
    return 1  # distances of distinct ids are distinct


cdef double _now(object now) except? -1.0:
    cdef double t
    if now is None:
        return _monotonic()
    if isinstance(now, (int, float)) and not isinstance(now, bool):
        t = now
    else:
        raise TypeError(f"now must be a number (seconds) or None, not {type(now).__name__}")
    if t != t:
        raise ValueError("now must not be NaN")
    return t


cdef int32_t _limit(object value, str name, int32_t low) except -1:
    """An int option (anything with __index__ but a bool) in [low, MAX_K]."""
    if isinstance(value, bool) or not hasattr(type(value), "__index__"):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    value = _operator.index(value)
    if not low <= value <= MAX_K:
        raise ValueError(f"{name} must be in [{low}, {MAX_K:,}], not {value:,}")
    return value


cdef int _bucket_index(object i) except -1:
    if isinstance(i, bool) or not hasattr(type(i), "__index__"):
        raise TypeError(f"bucket index must be an int, not {type(i).__name__}")
    i = _operator.index(i)
    if not 0 <= i < ID_BITS:
        raise ValueError(f"bucket index must be in [0, 255], not {i}")
    return i


# ---------------------------------------------------------------------------------------------
# The table

# no_gc_clear: the collector must not set _ids / _contacts / _repl to None under a live
# table; a cycle through a contact is broken at the contact or at those (private) lists.
@cython.final
@cython.no_gc_clear
cdef class RoutingTable:
    """Kademlia k-buckets around ``self_id`` (32 bytes).

    ``RoutingTable(self_id, k=20, *, replacements=None)``: at most ``k`` contacts per bucket;
    each bucket queues at most ``replacements`` (default: ``k``) newcomers that found it
    full.  Ids are ``bytes`` of length 32; a contact is any object.  ``now=`` arguments take
    seconds on the caller's clock (default ``time.monotonic()``).
    """

    def __cinit__(self, self_id, k=DEFAULT_K, *, replacements=None):
        cdef int i
        _load(self_id, "self_id", self._self)
        self._self_id = bytes(self_id)
        self._k = _limit(k, "k", 1)
        self._rmax = self._k if replacements is None else _limit(replacements, "replacements", 0)
        self._ids = []
        self._contacts = []
        self._repl = [None] * ID_BITS
        self._free = -1
        for i in range(ID_BITS):
            self._head[i] = self._tail[i] = -1
            self._count[i] = 0

    def __dealloc__(self):
        PyMem_Free(self._ent)
        PyMem_Free(self._order)
        PyMem_Free(self._scratch)

    # -- internals ----------------------------------------------------------------------------

    cdef int _enter(self) except -1:
        if self._busy:
            raise RuntimeError(
                "RoutingTable modified while one of its calls is running (from a finaliser?)"
            )
        self._busy = True
        return 0

    cdef Py_ssize_t _find(self, const uint64_t* key, bint* found) noexcept:
        """Position of ``key`` in _order (or where it would go); *found if it is there."""
        cdef Py_ssize_t lo = 0, hi = self._n, mid
        cdef const int32_t* order = self._order
        cdef const Entry* ent = self._ent
        while lo < hi:
            mid = (lo + hi) >> 1
            if _less(ent[order[mid]].w, key):
                lo = mid + 1
            else:
                hi = mid
        found[0] = lo < self._n and _eq(ent[order[lo]].w, key)
        return lo

    cdef int32_t _slot_of(self, object node_id) except -2:
        """The slot of a stored id, -1 if not stored; TypeError / ValueError for a bad id."""
        cdef uint64_t key[4]
        cdef bint found
        cdef Py_ssize_t pos
        _load(node_id, "node_id", key)
        pos = self._find(key, &found)
        return self._order[pos] if found else -1

    cdef void _unlink(self, int32_t s) noexcept:
        cdef Entry* e = &self._ent[s]
        cdef int b = e.bucket
        if e.prev >= 0:
            self._ent[e.prev].next = e.next
        else:
            self._head[b] = e.next
        if e.next >= 0:
            self._ent[e.next].prev = e.prev
        else:
            self._tail[b] = e.prev
        self._count[b] -= 1

    cdef void _link_tail(self, int32_t s, int b) noexcept:
        cdef Entry* e = &self._ent[s]
        e.bucket = b
        e.prev = self._tail[b]
        e.next = -1
        if self._tail[b] >= 0:
            self._ent[self._tail[b]].next = s
        else:
            self._head[b] = s
        self._tail[b] = s
        self._count[b] += 1

    cdef int _grow_slots(self) except -1:
        cdef Py_ssize_t cap = max(16, 2 * self._ecap)
        cdef Entry* ent
        if cap > MAX_K:
            cap = MAX_K
            if cap <= self._ecap:
                raise MemoryError("RoutingTable is full (2**31 - 1 contacts)")
        # The lists first: if one of these fails, only spare capacity was added.
        if len(self._ids) < cap:
            self._ids.extend([None] * (cap - len(self._ids)))
        if len(self._contacts) < cap:
            self._contacts.extend([None] * (cap - len(self._contacts)))
        ent = <Entry*>PyMem_Realloc(self._ent, cap * sizeof(Entry))
        if ent == NULL:
            raise MemoryError()
        self._ent = ent
        self._ecap = cap
        return 0

    cdef int _grow_order(self) except -1:
        cdef Py_ssize_t cap = max(16, 2 * self._ocap)
        cdef int32_t* order = <int32_t*>PyMem_Realloc(self._order, cap * sizeof(int32_t))
        if order == NULL:
            raise MemoryError()
        self._order = order
        self._ocap = cap
        return 0

    cdef int32_t _store(self, Py_ssize_t pos, const uint64_t* key, int b, double seen,
                        object node_id, object contact) except -1:
        """Store a new contact at the MRS end of bucket b and at ``pos`` of _order."""
        cdef int32_t s
        cdef Entry* e
        if self._n == self._ocap:
            self._grow_order()
        if self._free < 0 and self._used == self._ecap:
            self._grow_slots()
        # nothing below can fail
        if self._free >= 0:
            s = self._free
            self._free = self._ent[s].next
        else:
            s = <int32_t>self._used
            self._used += 1
        e = &self._ent[s]
        memcpy(e.w, key, sizeof(e.w))
        e.seen = seen
        self._link_tail(s, b)
        memmove(&self._order[pos + 1], &self._order[pos], (self._n - pos) * sizeof(int32_t))
        self._order[pos] = s
        self._n += 1
        self._ids[s] = node_id         # replaces None: nothing is released
        self._contacts[s] = contact
        return s

    cdef int _queue(self, int b, object node_id, object contact, double seen) except -1:
        """Queue a newcomer (newest) in bucket b's replacement list (the caller has taken out
        an older entry of the same id, and drops the oldest entry beyond the bound)."""
        cdef list rl = <list>self._repl[b]
        if self._rmax == 0:
            self._dropped += 1
            return 0
        item = (node_id, contact, seen)
        if rl is None:
            rl = []
            self._repl[b] = rl
        rl.append(item)
        return 0

    cdef object _unqueue(self, int b, const char* raw):
        """Take the id at ``raw`` out of bucket b's replacement list: its entry, or None."""
        cdef list rl = <list>self._repl[b]
        cdef Py_ssize_t i
        if rl is None:
            return None
        for i in range(len(rl)):
            nid = <object>PyTuple_GET_ITEM(<tuple>rl[i], 0)
            if memcmp(PyBytes_AS_STRING(nid), raw, ID_BYTES) == 0:
                return rl.pop(i)
        return None

    cdef Py_ssize_t _select(self, const uint64_t* t, Py_ssize_t need) noexcept:
        """Put the slots of the ``need`` (<= N) ids nearest to t into _scratch (unsorted)."""
        cdef Py_ssize_t lo = 0, hi = self._n, m, a, b, mid, got = 0, i
        cdef const int32_t* order = self._order
        cdef const Entry* ent = self._ent
        cdef Cand* out = self._scratch
        cdef int d, word
        cdef uint64_t mask
        while need > 0:
            if hi - lo <= need:
                for i in range(lo, hi):
                    out[got].slot = order[i]
                    got += 1
                break
            # the first bit where the range's ids differ: they share all bits before it
            d = _cpl(ent[order[lo]].w, ent[order[hi - 1]].w)
            word = d >> 6
            mask = (<uint64_t>1) << (63 - (d & 63))
            # m = first index of the range with bit d set
            a = lo + 1
            b = hi - 1
            while a < b:
                mid = (a + b) >> 1
                if ent[order[mid]].w[word] & mask:
                    b = mid
                else:
                    a = mid + 1
            m = a
            if t[word] & mask:              # near = [m, hi), far = [lo, m)
                if hi - m >= need:
                    lo = m
                else:
                    for i in range(m, hi):
                        out[got].slot = order[i]
                        got += 1
                    need -= hi - m
                    hi = m
            else:                           # near = [lo, m), far = [m, hi)
                if m - lo >= need:
                    hi = m
                else:
                    for i in range(lo, m):
                        out[got].slot = order[i]
                        got += 1
                    need -= m - lo
                    lo = m
        return got

    # -- mutation -----------------------------------------------------------------------------

    def add(self, node_id, contact, now=None):
        """Store or refresh ``node_id`` -> ``contact`` as most recently seen.

        Returns None when it is stored (or was already: its contact is replaced and it moves
        to the MRS end), or, when its bucket is full, the id of the bucket's least recently
        seen contact, which the caller should ping; the newcomer then waits in the bucket's
        replacement list.  ValueError for the table's own id.
        """
        cdef uint64_t key[4]
        cdef bint found
        cdef Py_ssize_t pos
        cdef int32_t s
        cdef int b
        cdef double t
        cdef const char* raw
        _load(node_id, "node_id", key)
        t = _now(now)
        b = _cpl(key, self._self)
        if b == ID_BITS:
            raise ValueError("node_id is the table's own id (self_id), which is never stored")
        self._enter()
        try:
            pos = self._find(key, &found)
            if found:
                s = self._order[pos]
                old = self._contacts[s]     # released when this call returns
                self._contacts[s] = contact
                self._ent[s].seen = t
                if self._tail[b] != s:
                    self._unlink(s)
                    self._link_tail(s, b)
                return None
            if self._count[b] < self._k:
                self._store(pos, key, b, t, node_id, contact)
                return None
            raw = PyBytes_AS_STRING(node_id)
            old = self._unqueue(b, raw)
            self._queue(b, node_id, contact, t)
            rl = self._repl[b]
            if rl is not None and len(<list>rl) > self._rmax:
                gone = (<list>rl).pop(0)
                self._dropped += 1
            return self._ids[self._head[b]]
        finally:
            self._busy = False

    def touch(self, node_id, now=None):
        """Mark a stored contact as seen now (it moves to the MRS end): True, or False when
        the id is not in the table (nothing changes; queued replacements are not touched)."""
        cdef int32_t s = self._slot_of(node_id)
        cdef double t = _now(now)
        cdef int b
        if s < 0:
            return False
        if self._busy:
            self._enter()   # raises
        self._ent[s].seen = t
        b = self._ent[s].bucket
        if self._tail[b] != s:
            self._unlink(s)
            self._link_tail(s, b)
        return True

    def remove(self, node_id):
        """Forget ``node_id``: True if it was in the table (the newest replacement of its
        bucket, if any, is promoted into the bucket, at the MRS end, with the last_seen it
        was queued with), False if not.  A queued replacement with this id is dropped too."""
        cdef uint64_t key[4]
        cdef bint found
        cdef Py_ssize_t pos, pos2
        cdef int32_t s
        cdef int b
        _load(node_id, "node_id", key)
        b = _cpl(key, self._self)
        if b == ID_BITS:
            return False
        self._enter()
        try:
            queued = self._unqueue(b, PyBytes_AS_STRING(node_id))
            pos = self._find(key, &found)
            if not found:
                return False
            s = self._order[pos]
            self._unlink(s)
            memmove(&self._order[pos], &self._order[pos + 1],
                    (self._n - pos - 1) * sizeof(int32_t))
            self._n -= 1
            self._ent[s].bucket = -1
            self._ent[s].next = self._free
            self._free = s
            old_id = self._ids[s]            # released when this call returns
            old_contact = self._contacts[s]
            self._ids[s] = None
            self._contacts[s] = None
            rl = self._repl[b]
            if rl is not None and len(<list>rl) > 0:
                # a slot and room in _order were just freed: _store cannot fail
                item = (<list>rl).pop()
                pid = <object>PyTuple_GET_ITEM(<tuple>item, 0)
                _load(pid, "node_id", key)
                pos2 = self._find(key, &found)
                self._store(pos2, key, b, <double>(<tuple>item)[2], pid,
                            <object>PyTuple_GET_ITEM(<tuple>item, 1))
            return True
        finally:
            self._busy = False

    def clear(self):
        """Remove every contact and every queued replacement (the dropped counter too)."""
        cdef int i
        self._enter()
        try:
            old = (self._ids, self._contacts, self._repl)   # released when this call returns
            self._ids = []
            self._contacts = []
            self._repl = [None] * ID_BITS
            PyMem_Free(self._ent)
            PyMem_Free(self._order)
            self._ent = NULL
            self._order = NULL
            self._ecap = self._ocap = self._used = self._n = 0
            self._free = -1
            self._dropped = 0
            for i in range(ID_BITS):
                self._head[i] = self._tail[i] = -1
                self._count[i] = 0
        finally:
            self._busy = False

    # -- queries ------------------------------------------------------------------------------

    def closest(self, target, n=20):
        """The ``n`` stored contacts nearest to ``target`` by XOR distance, nearest first, as
        ``(node_id, contact)`` pairs (all of them when fewer are stored; never self_id).
        Exact."""
        cdef uint64_t t[4]
        cdef Py_ssize_t want, m, i, j, got
        cdef Cand* c
        cdef Cand tmp
        cdef const Entry* e
        cdef bint was
        cdef int32_t s
        cdef Cand* grown
        _load(target, "target", t)
        if type(n) is not int:
            if isinstance(n, bool) or not hasattr(type(n), "__index__"):
                raise TypeError(f"n must be an int, not {type(n).__name__}")
            n = _operator.index(n)
        if n < 0:
            raise ValueError(f"n must be >= 0, not {n}")
        m = self._n if n >= self._n else <Py_ssize_t>n
        if m == 0:
            return []
        if m > self._scap:
            grown = <Cand*>PyMem_Realloc(self._scratch, m * sizeof(Cand))
            if grown == NULL:
                raise MemoryError()
            self._scratch = grown
            self._scap = m
        c = self._scratch
        got = self._select(t, m)
        for i in range(got):
            e = &self._ent[c[i].slot]
            c[i].d[0] = e.w[0] ^ t[0]
            c[i].d[1] = e.w[1] ^ t[1]
            c[i].d[2] = e.w[2] ^ t[2]
            c[i].d[3] = e.w[3] ^ t[3]
        if got <= SMALL_SORT:
            for i in range(1, got):
                tmp = c[i]
                j = i - 1
                while j >= 0 and _cand_less(&tmp, &c[j]):
                    c[j + 1] = c[j]
                    j -= 1
                c[j + 1] = tmp
        else:
            qsort(c, got, sizeof(Cand), _cand_cmp)
        was = self._busy
        self._busy = True
        try:
            ids = self._ids
            contacts = self._contacts
            out = PyList_New(got)
            for i in range(got):
                s = c[i].slot
                pair = ((<list>ids)[s], (<list>contacts)[s])
                Py_INCREF(pair)
                PyList_SET_ITEM(out, i, <PyObject*>pair)
            return out
        finally:
            self._busy = was

    def get(self, node_id):
        """The contact of a stored id, or None."""
        cdef int32_t s = self._slot_of(node_id)
        return None if s < 0 else self._contacts[s]

    def last_seen(self, node_id):
        """When a stored id was last added, touched (or queued, if it was promoted), or None."""
        cdef int32_t s = self._slot_of(node_id)
        return None if s < 0 else self._ent[s].seen

    def bucket_of(self, node_id):
        """The bucket index of ``node_id``: the number of leading bits it shares with
        self_id (0 .. 255).  ValueError for self_id itself."""
        cdef uint64_t key[4]
        cdef int b
        _load(node_id, "node_id", key)
        b = _cpl(key, self._self)
        if b == ID_BITS:
            raise ValueError("node_id is the table's own id (self_id), which has no bucket")
        return b

    def bucket(self, i):
        """Bucket ``i`` as a list of ``(node_id, contact)``, least recently seen first."""
        cdef int b = _bucket_index(i)
        cdef int32_t s
        cdef bint was = self._busy
        self._busy = True
        try:
            out = []
            s = self._head[b]
            while s >= 0:
                out.append((self._ids[s], self._contacts[s]))
                s = self._ent[s].next
            return out
        finally:
            self._busy = was

    def replacements(self, i):
        """Bucket ``i``'s replacement list as ``(node_id, contact)`` pairs, oldest first."""
        cdef int b = _bucket_index(i)
        rl = self._repl[b]
        if rl is None:
            return []
        return [(item[0], item[1]) for item in <list>rl]

    def stale_buckets(self, older_than, now=None):
        """Indices (ascending) of the non-empty buckets none of whose contacts was seen at or
        after ``now - older_than``: the buckets a Kademlia node should refresh."""
        cdef double age, t, newest, limit
        cdef int b
        cdef int32_t s
        if isinstance(older_than, (int, float)) and not isinstance(older_than, bool):
            age = older_than
        else:
            raise TypeError(f"older_than must be a number (seconds), not {type(older_than).__name__}")
        if not age >= 0:
            raise ValueError(f"older_than must be >= 0, not {older_than}")
        t = _now(now)
        limit = t - age
        out = []
        for b in range(ID_BITS):
            s = self._head[b]
            if s < 0:
                continue
            newest = self._ent[s].seen
            while s >= 0:
                if self._ent[s].seen > newest:
                    newest = self._ent[s].seen
                s = self._ent[s].next
            if newest < limit:
                out.append(b)
        return out

    def stats(self):
        """Counters: contacts, k, max_replacements, buckets_used, buckets_full,
        replacements (queued now), dropped (replacements dropped so far), bytes (C memory
        and slot lists; not the ids and contacts themselves)."""
        cdef int b, used = 0, full = 0
        queued = 0
        for b in range(ID_BITS):
            if self._count[b]:
                used += 1
                if self._count[b] >= self._k:
                    full += 1
            if self._repl[b] is not None:
                queued += len(<list>self._repl[b])
        return {
            "contacts": self._n,
            "k": self._k,
            "max_replacements": self._rmax,
            "buckets_used": used,
            "buckets_full": full,
            "replacements": queued,
            "dropped": self._dropped,
            "bytes": (
                self._ecap * sizeof(Entry) + self._ocap * sizeof(int32_t)
                + self._scap * sizeof(Cand)
                + 8 * (len(self._ids) + len(self._contacts))
            ),
        }

    @property
    def self_id(self):
        return self._self_id

    @property
    def k(self):
        return self._k

    @property
    def max_replacements(self):
        return self._rmax

    def __len__(self):
        return self._n

    def __contains__(self, node_id):
        return self._slot_of(node_id) >= 0

    def __iter__(self):
        """The stored ids, bucket 0 to 255, least recently seen first within a bucket (a
        snapshot: the table may be changed while iterating)."""
        cdef int b
        cdef int32_t s
        cdef bint was = self._busy
        self._busy = True
        try:
            out = []
            for b in range(ID_BITS):
                s = self._head[b]
                while s >= 0:
                    out.append(self._ids[s])
                    s = self._ent[s].next
        finally:
            self._busy = was
        return iter(out)

    def __repr__(self):
        return f"<RoutingTable self_id={self._self_id[:4].hex()}.. contacts={self._n} k={self._k}>"
