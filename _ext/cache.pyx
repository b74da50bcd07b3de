"""TTLCache: a bounded key -> value cache with a time to live per entry and LRU eviction.

The "ETS-like" cache of macula (routes, DHT lookups, peer records): O(1) ``get``, ``put``,
``pop``, ``in`` and ``len``; every entry expires ``ttl`` seconds after its last put (a
default per cache, overridable per put); at ``max_size`` entries a put of a new key evicts
the least recently used one; expired entries are never returned; ``expire(now, budget)``
removes expired entries in bounded time.

Structure
=========

A Python ``dict`` maps each key to an ``_Entry`` (a final extension type: key, value,
deadline, put sequence number, four links and its lane).  The dict holds the only reference
to an entry, so everything the collector must see (keys, values) is reachable through
ordinary references: dict -> entry -> key / value.  The links are borrowed C pointers, so
moving an entry costs no reference counting and entries form no cycles among themselves
(dropping a cache frees its entries at once, without waiting for the collector).  They are
valid exactly while the entry is in the dict: every removal unlinks the entry before the
dict lets go of it.

Two orders are kept over the same entries:

* the **LRU ring** (``prev`` / ``next`` around the sentinel ``_root``): least recently used
  first.  A put and a get hit move the entry to the MRU end; a put of a new key past
  ``max_size`` evicts the entry at the LRU end.
* the **expiry order**: one ring per TTL value in use (a ``_Lane``: ``eprev`` / ``enext``
  around a sentinel), each sorted by (deadline, seq).  With one TTL and a clock that does
  not go backwards (always true of the monotonic clock), deadlines arrive in order, so a put
  appends to its lane in O(1); a fake clock that goes back walks back from the lane's tail
  to keep it sorted.  ``expire`` repeatedly takes the earliest lane head: O(budget * L) for
  L lanes, L being the number of distinct TTL values held (1 when every put uses the
  default).  A lane other than the default one is dropped when it empties.

``expire(now, budget)`` therefore removes exactly ``min(budget, E)`` entries, E being the
entries with ``deadline <= now``, earliest deadline first (ties: earliest put), and returns
that number.  A heap would give the same guarantee for any mix of TTLs but costs O(log n)
per put and eviction; lanes cost O(1) for the common case of few TTL values.

Costs (at 100,000 entries; figures in docs/cores/cache.md)
==========================================================

* ``get`` hit: one dict lookup (hash of a str is cached), a deadline compare, 4 pointer
  writes to move the entry to the MRU end; the clock is one ``clock_gettime`` (vDSO) unless
  ``now=`` is given.
* ``put`` of an existing key: one ``PyDict_SetDefault``, relinks.  Of a new key:
  ``PyDict_SetDefault`` of a spare blank entry (inserted or, if the key exists, kept); past
  ``max_size`` the LRU entry is deleted from the dict, unlinked and kept blank as the next
  spare, so a put that evicts allocates nothing.
* ``len``: the dict's size (entries held, expired ones not yet removed included).

Time
====

Every method that looks at deadlines takes ``now=`` (seconds, a finite float); without it the
cache calls its ``clock`` (a zero-argument callable) if one was given, else reads
CLOCK_MONOTONIC itself and converts it exactly as ``time.monotonic()`` does (same clock,
same rounding).  ``module.monotonic()`` exposes that reading.

Re-entry
========

User code can run inside a call: ``__hash__`` / ``__eq__`` of keys, the ``clock``, and the
finaliser of a key or value dropped by the cache.  Keys and values are dropped only after
the structure is consistent, and the collector can only run (an allocation) before a call
changes anything.  A key's ``__hash__`` / ``__eq__`` that calls back into the cache while
the cache is inserting or deleting that key gets RuntimeError (the ``_busy`` guard), which
the failing operation passes on, leaving the cache consistent.
"""

cimport cython
from cpython.dict cimport PyDict_GetItemWithError, PyDict_Next, PyDict_Size
from cpython.float cimport PyFloat_AS_DOUBLE, PyFloat_AsDouble, PyFloat_CheckExact
from cpython.list cimport PyList_Append
from cpython.object cimport PyObject
from libc.math cimport isfinite, isnan
from libc.stdint cimport uint64_t

from types import GenericAlias as _GenericAlias


cdef extern from "Python.h":
    # Raw variants: the caller checks for NULL / -1 and cleans up before raising.
    PyObject* _setdefault "PyDict_SetDefault"(object d, object key, object default)
    int _delitem "PyDict_DelItem"(object d, object key)
    PyObject* _getitem "PyDict_GetItem"(object d, object key)   # no error, ever
    Py_ssize_t PyDict_GET_SIZE(object d)
    object PyObject_CallNoArgs(object callable)


cdef extern from *:
    """
    #include <time.h>
    /* time.monotonic(), read the way CPython reads it: CLOCK_MONOTONIC in nanoseconds, then
       one division (as _PyTime_AsSecondsDouble), so both give the same float. */
    static double macula_cache_monotonic(void) {
    #if defined(__linux__) && defined(CLOCK_MONOTONIC)
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (double)((long long)ts.tv_sec * 1000000000LL + (long long)ts.tv_nsec) / 1e9;
    #elif PY_VERSION_HEX >= 0x030D0000
        PyTime_t t;
        (void)PyTime_MonotonicRaw(&t);
        return PyTime_AsSecondsDouble(t);
    #else
        return _PyTime_AsSecondsDouble(_PyTime_GetMonotonicClock());
    #endif
    }
    """
    double macula_cache_monotonic() nogil


def monotonic():
    """The cache's own clock reading: the same value ``time.monotonic()`` would give."""
    return macula_cache_monotonic()


# ---------------------------------------------------------------------------------------------
# Links (borrowed pointers; see the module docstring)

cdef inline _Entry _blank_entry():
    cdef _Entry e = _Entry.__new__(_Entry)
    e.prev = e.next = e.eprev = e.enext = <PyObject*>e
    e.lane = NULL
    return e


cdef inline void _lru_unlink(_Entry e) noexcept:
    (<_Entry>e.prev).next = e.next
    (<_Entry>e.next).prev = e.prev


cdef inline void _lru_append(_Entry root, _Entry e) noexcept:
    """Link ``e`` at the MRU end (just before the sentinel)."""
    e.next = <PyObject*>root
    e.prev = root.prev
    (<_Entry>root.prev).next = <PyObject*>e
    root.prev = <PyObject*>e


cdef inline void _lane_unlink(_Entry e) noexcept:
    (<_Entry>e.eprev).enext = e.enext
    (<_Entry>e.enext).eprev = e.eprev
    e.lane = NULL


cdef inline void _lane_insert(_Lane lane, _Entry e) noexcept:
    """Insert ``e`` into ``lane`` after the last entry with a deadline <= its own (so the lane
    stays in (deadline, seq) order: ``e`` has the highest seq). O(1) when the clock did not go
    back since the lane's last put."""
    cdef _Entry head = lane.head
    cdef PyObject* after = head.eprev
    while after != <PyObject*>head and (<_Entry>after).deadline > e.deadline:
        after = (<_Entry>after).eprev
    e.eprev = after
    e.enext = (<_Entry>after).enext
    (<_Entry>(<_Entry>after).enext).eprev = <PyObject*>e
    (<_Entry>after).enext = <PyObject*>e
    e.lane = <PyObject*>lane


# ---------------------------------------------------------------------------------------------
# Argument checks

cdef str _type_name(object obj):
    return type(obj).__name__


cdef double _seconds(object obj, str name) except? -1.0:
    """A number of seconds given as ``name`` (float, int, or anything with __float__; not
    bool) as a double; TypeError otherwise."""
    if PyFloat_CheckExact(obj):
        return PyFloat_AS_DOUBLE(obj)
    if isinstance(obj, bool):
        raise TypeError(f"{name} must be a number of seconds, not bool")
    try:
        return PyFloat_AsDouble(obj)
    except TypeError:
        raise TypeError(f"{name} must be a number of seconds, not {_type_name(obj)}") from None
    except OverflowError:
        raise ValueError(f"{name} is too large: {obj!r}") from None


cdef double _ttl_value(object obj, str name) except? -1.0:
    cdef double ttl = _seconds(obj, name)
    if isnan(ttl) or ttl <= 0.0:
        raise ValueError(
            f"{name} must be a positive number of seconds (inf: never expires), not {obj!r}"
        )
    return ttl


cdef Py_ssize_t _count(object obj, str name, Py_ssize_t low) except -1:
    """An int >= low (ints and __index__ objects; not bool)."""
    if isinstance(obj, bool) or not hasattr(type(obj), "__index__"):
        raise TypeError(f"{name} must be an int, not {_type_name(obj)}")
    value = obj.__index__()
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}, not {value!r}")
    if value > <Py_ssize_t>((<size_t>-1) >> 1):
        raise ValueError(f"{name} must be at most {<Py_ssize_t>((<size_t>-1) >> 1):,}")
    return value


cdef inline double _finite_now(double t, object obj) except? -1.0:
    if not isfinite(t):
        raise ValueError(f"now must be a finite number of seconds, not {obj!r}")
    return t


cdef object _propagate():
    """Pass on the exception a raw C-API call has set."""
    raise _error_set()


cdef int _error_set() except -1:
    return -1


cdef object _reentry(str method):
    return RuntimeError(
        f"TTLCache.{method}() called while the cache is inserting or deleting a key "
        "(from a key's __hash__ or __eq__?)"
    )


# ---------------------------------------------------------------------------------------------
# The cache

@cython.final
@cython.auto_pickle(False)
@cython.freelist(16)
cdef class _Entry:
    pass


@cython.final
@cython.auto_pickle(False)
cdef class _Lane:
    pass


cdef _Lane _new_lane(double ttl):
    cdef _Lane lane = _Lane.__new__(_Lane)
    lane.ttl_key = ttl
    lane.head = _blank_entry()
    return lane


# no_gc_clear: the collector must not set _map / _root / _lanes to None under a live cache;
# a cycle through a value is broken at the dict, an entry or the value instead.
@cython.final
@cython.no_gc_clear
@cython.auto_pickle(False)
cdef class TTLCache:
    """A bounded key -> value cache: a TTL per entry, LRU eviction at ``max_size``.

    ``TTLCache(max_size, default_ttl, *, clock=None)``: at most ``max_size`` (an int >= 1)
    entries; an entry lives ``default_ttl`` seconds (a positive number, ``math.inf`` for
    never) after its put unless the put gives ``ttl``; ``clock`` is a zero-argument callable
    returning seconds, used when a method is not given ``now=`` (default: the monotonic
    clock, read in C).  Expired means ``now >= put time + ttl``.
    """

    __class_getitem__ = classmethod(_GenericAlias)

    def __cinit__(self, max_size, default_ttl, *, clock=None):
        self._max_size = _count(max_size, "max_size", 1)
        self._default_ttl = _ttl_value(default_ttl, "default_ttl")
        if clock is not None and not callable(clock):
            raise TypeError(f"clock must be a callable or None, not {_type_name(clock)}")
        self._clock = clock
        self._map = {}
        self._root = _blank_entry()
        self._default_lane = _new_lane(self._default_ttl)
        self._lanes = {self._default_lane.ttl_key: self._default_lane}
        self._spare = None

    # -- time ---------------------------------------------------------------------------------

    cdef double _call_clock(self) except? -1.0:
        t = PyObject_CallNoArgs(self._clock)
        if PyFloat_CheckExact(t):
            d = PyFloat_AS_DOUBLE(t)
        else:
            try:
                d = _seconds(t, "clock()")
            except TypeError:
                raise TypeError(
                    f"clock() must return a number of seconds, not {_type_name(t)}"
                ) from None
        if not isfinite(d):
            raise ValueError(f"clock() must return a finite number of seconds, not {t!r}")
        return d

    cdef double _time(self, object now) except? -1.0:
        if now is None:
            if self._clock is None:
                return macula_cache_monotonic()
            return self._call_clock()
        if PyFloat_CheckExact(now):
            return _finite_now(PyFloat_AS_DOUBLE(now), now)
        return _finite_now(_seconds(now, "now"), now)

    # -- structure ----------------------------------------------------------------------------

    cdef _Lane _lane_for(self, double ttl):
        if ttl == self._default_ttl:
            return self._default_lane
        key = ttl
        cdef PyObject* p = _getitem(self._lanes, key)
        if p != NULL:
            return <_Lane>p
        lane = _new_lane(ttl)
        self._lanes[key] = lane
        return lane

    cdef void _drop_lane_if_empty(self, _Lane lane) noexcept:
        if lane is not self._default_lane and lane.head.enext == <PyObject*>lane.head:
            # a float key: no user code, cannot fail
            if _delitem(self._lanes, lane.ttl_key) < 0:  # pragma: no cover
                pass

    cdef int _remove(self, _Entry e) except -1:
        """Take ``e`` out of the dict and both orders. The caller holds a reference to ``e``,
        so its key and value are dropped when the caller lets go (after this returns)."""
        cdef int rc
        self._busy = True
        rc = _delitem(self._map, e.key)
        self._busy = False
        if rc < 0:
            return -1
        _lru_unlink(e)
        lane = <_Lane>e.lane
        _lane_unlink(e)
        self._drop_lane_if_empty(lane)
        return 0

    cdef _Entry _live(self, object key, double t):
        """The entry of ``key`` unless absent or expired at ``t`` (an expired entry is removed
        and counted in ``expirations``); no LRU move, not a hit or a miss."""
        cdef PyObject* p = PyDict_GetItemWithError(self._map, key)
        if p == NULL:
            return None
        e = <_Entry>p
        if t >= e.deadline:
            self._remove(e)
            self._expirations += 1
            return None
        return e

    cdef int _evict_lru(self) except -1:
        victim = <_Entry>self._root.next
        self._remove(victim)
        self._evictions += 1
        # Keep the entry, blank, for the next insert; its key and value are dropped when
        # these locals go, after everything else.
        key = victim.key
        value = victim.value
        victim.key = None
        victim.value = None
        if self._spare is None:
            self._spare = victim
        return 0

    cdef _Entry _earliest(self):
        """The lane head with the smallest (deadline, seq), or None when every lane is empty."""
        cdef PyObject* best = NULL
        cdef PyObject* head
        cdef PyObject* first
        cdef PyObject* k
        cdef PyObject* v
        cdef Py_ssize_t pos = 0
        if PyDict_GET_SIZE(self._lanes) == 1:
            head = <PyObject*>self._default_lane.head
            first = (<_Entry>head).enext
            return None if first == head else <_Entry>first
        while PyDict_Next(self._lanes, &pos, &k, &v):
            head = <PyObject*>(<_Lane>v).head
            first = (<_Entry>head).enext
            if first == head:
                continue
            if best == NULL or (<_Entry>first).deadline < (<_Entry>best).deadline or (
                (<_Entry>first).deadline == (<_Entry>best).deadline
                and (<_Entry>first).seq < (<_Entry>best).seq
            ):
                best = first
        return None if best == NULL else <_Entry>best

    # -- the API ------------------------------------------------------------------------------

    def get(self, key, default=None, *, now=None):
        """The value of ``key``, or ``default`` when it is absent or expired (an expired entry
        is removed and counted in ``expirations``). A hit makes the entry the most recently
        used; hits and misses are counted."""
        if self._busy:
            raise _reentry("get")
        cdef double t = 0.0
        cdef bint c_clock = now is None and self._clock is None
        if not c_clock:
            t = self._time(now)  # a user clock runs before the lookup, never in between
        cdef PyObject* p = PyDict_GetItemWithError(self._map, key)
        if p == NULL:
            self._misses += 1
            return default
        e = <_Entry>p
        if c_clock:
            t = macula_cache_monotonic()  # only a hit needs the time
        if t >= e.deadline:
            self._remove(e)
            self._expirations += 1
            self._misses += 1
            return default
        self._hits += 1
        if e.next != <PyObject*>self._root:
            _lru_unlink(e)
            _lru_append(self._root, e)
        return e.value

    def put(self, key, value, ttl=None, *, now=None):
        """Store ``value`` under ``key`` for ``ttl`` seconds (default: ``default_ttl``) from
        ``now``, as the most recently used entry. A new key beyond ``max_size`` entries evicts
        the least recently used entry. Putting an existing key (expired or not) replaces its
        value and deadline."""
        if self._busy:
            raise _reentry("put")
        cdef double t = self._time(now)
        cdef _Lane lane
        cdef double deadline
        cdef double d = self._default_ttl
        if ttl is not None:
            d = _ttl_value(ttl, "ttl")
        deadline = t + d
        # Allocations (which may run the collector, hence finalisers that use the cache) come
        # before anything changes: the spare entry, then the lane (new lanes go in _lanes).
        cdef _Entry e = self._spare
        if e is None:
            e = _blank_entry()
        else:
            self._spare = None
        lane = self._default_lane if ttl is None else self._lane_for(d)
        self._busy = True
        cdef PyObject* found = _setdefault(self._map, key, e)
        self._busy = False
        if found == NULL:  # unhashable key, or an error from its __eq__: nothing changed
            if self._spare is None:
                self._spare = e
            self._drop_lane_if_empty(lane)
            return _propagate()
        self._seq += 1
        if found == <PyObject*>e:
            e.key = key
            e.value = value
            e.deadline = deadline
            e.seq = self._seq
            _lru_append(self._root, e)
            _lane_insert(lane, e)
            if PyDict_GET_SIZE(self._map) > self._max_size:
                self._evict_lru()
            return None
        if self._spare is None:
            self._spare = e
        e = <_Entry>found
        old = e.value  # dropped on return, once the entry is relinked
        e.value = value
        e.deadline = deadline
        e.seq = self._seq
        if e.next != <PyObject*>self._root:
            _lru_unlink(e)
            _lru_append(self._root, e)
        old_lane = <_Lane>e.lane
        _lane_unlink(e)
        _lane_insert(lane, e)
        if old_lane is not lane:
            self._drop_lane_if_empty(old_lane)
        return None

    def pop(self, key, default=None, *, now=None):
        """Remove ``key`` and return its value; ``default`` when it is absent or expired (an
        expired entry is removed too and counted in ``expirations``). Not a hit or a miss."""
        if self._busy:
            raise _reentry("pop")
        cdef double t = self._time(now)
        cdef PyObject* p = PyDict_GetItemWithError(self._map, key)
        if p == NULL:
            return default
        e = <_Entry>p
        self._remove(e)
        if t >= e.deadline:
            self._expirations += 1
            return default
        return e.value

    def __contains__(self, key):
        """True when ``key`` is present and not expired, by the cache's clock (an expired entry
        is removed and counted in ``expirations``). Not a hit or a miss; no LRU move."""
        if self._busy:
            raise _reentry("__contains__")
        return self._live(key, self._time(None)) is not None

    def ttl(self, key, *, now=None):
        """Seconds ``key`` has left to live (``deadline - now``; ``inf`` for a never-expiring
        entry), or None when it is absent or expired (an expired entry is removed and counted
        in ``expirations``). No LRU move."""
        if self._busy:
            raise _reentry("ttl")
        cdef double t = self._time(now)
        e = self._live(key, t)
        return None if e is None else e.deadline - t

    def expire(self, now=None, budget=DEFAULT_EXPIRE_BUDGET):
        """Remove up to ``budget`` expired entries (an int >= 0), earliest deadline first
        (ties: earliest put); return how many were removed. Exactly ``min(budget, E)``, E being
        the entries expired at ``now``; O(budget) with one TTL value in use, O(budget * L)
        with L distinct TTL values."""
        if self._busy:
            raise _reentry("expire")
        cdef double t = self._time(now)
        cdef Py_ssize_t limit = _count(budget, "budget", 0)
        cdef Py_ssize_t removed = 0
        cdef _Entry e
        while removed < limit:
            e = None  # drop the previous entry first: its key's or value's finaliser may run
            e = self._earliest()
            if e is None or t < e.deadline:
                break
            self._remove(e)
            self._expirations += 1
            removed += 1
        return removed

    def __len__(self):
        """Entries held, including expired ones not removed yet (see ``expire``)."""
        return PyDict_GET_SIZE(self._map)

    def clear(self):
        """Remove every entry (the counters of ``stats()`` are kept)."""
        if self._busy:
            raise _reentry("clear")
        # Everything new is allocated first, then swapped in at once; the old entries are
        # dropped on return, when the cache is already empty.
        new_map = {}
        new_root = _blank_entry()
        new_lane = _new_lane(self._default_ttl)
        new_lanes = {new_lane.ttl_key: new_lane}
        old_map, old_lanes, old_root = self._map, self._lanes, self._root
        self._map = new_map
        self._root = new_root
        self._default_lane = new_lane
        self._lanes = new_lanes

    def keys(self, *, now=None):
        """The live keys, least recently used first (expired entries are skipped, not
        removed; nothing moves)."""
        cdef double t = self._time(now)
        cdef list out = []
        cdef PyObject* root = <PyObject*>self._root
        cdef PyObject* p = self._root.next
        while p != root:
            if t < (<_Entry>p).deadline:
                PyList_Append(out, (<_Entry>p).key)
            p = (<_Entry>p).next
        return out

    def items(self, *, now=None):
        """The live (key, value) pairs, least recently used first (as ``keys``)."""
        cdef double t = self._time(now)
        cdef list entries = []
        cdef PyObject* root = <PyObject*>self._root
        cdef PyObject* p = self._root.next
        while p != root:
            if t < (<_Entry>p).deadline:
                PyList_Append(entries, <_Entry>p)
            p = (<_Entry>p).next
        # Tuples are made after the walk (making them may run the collector).
        return [((<_Entry>e).key, (<_Entry>e).value) for e in entries]

    def stats(self):
        """Counters since creation: ``hits``, ``misses`` (get), ``evictions`` (LRU entries
        removed for room), ``expirations`` (expired entries removed), and ``size`` (as
        ``len``) and ``max_size``."""
        return {
            "hits": self._hits,
            "misses": self._misses,
            "evictions": self._evictions,
            "expirations": self._expirations,
            "size": PyDict_GET_SIZE(self._map),
            "max_size": self._max_size,
        }

    @property
    def max_size(self):
        return self._max_size

    @property
    def default_ttl(self):
        return self._default_ttl

    @property
    def clock(self):
        return self._clock

    def __repr__(self):
        return (
            f"<TTLCache size={PyDict_GET_SIZE(self._map)} max_size={self._max_size} "
            f"default_ttl={self._default_ttl!r}>"
        )
