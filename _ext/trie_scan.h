/* Word-at-a-time helpers for the TopicTrie level scanner (_ext/trie.pyx).
 *
 * The scanner reads a topic 8 bytes at a time: one load, four "has this byte" tests done
 * on all 8 bytes at once (SWAR), and one multiply-fold hash step per word, instead of a
 * branch and a multiply per byte.  Words are always little-endian here (bytes swapped on a
 * big-endian machine), so "the lowest flagged byte" is "the first byte in the string".
 */
#ifndef MACULA_TRIE_SCAN_H
#define MACULA_TRIE_SCAN_H

#include <stdint.h>
#include <string.h>

#define TRIE_ONES 0x0101010101010101ULL
#define TRIE_HIGHS 0x8080808080808080ULL

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#define TRIE_LE64(x) __builtin_bswap64(x)
#define TRIE_LE32(x) __builtin_bswap32(x)
#else
#define TRIE_LE64(x) (x)
#define TRIE_LE32(x) (x)
#endif

/* The n (1..8) bytes at p as a little-endian word, zero padded; never reads past p + n. */
static inline uint64_t trie_load(const char *p, size_t n)
{
    uint64_t w;
    uint32_t lo, hi;
    if (n >= 8) {
        memcpy(&w, p, 8);
        return TRIE_LE64(w);
    }
    if (n >= 4) {
        /* two overlapping 4-byte loads; the overlap holds the same bytes twice */
        memcpy(&lo, p, 4);
        memcpy(&hi, p + n - 4, 4);
        return (uint64_t)TRIE_LE32(lo) | ((uint64_t)TRIE_LE32(hi) << (8 * (n - 4)));
    }
    return (uint64_t)(uint8_t)p[0]
        | ((uint64_t)(uint8_t)p[n >> 1] << (8 * (n >> 1)))
        | ((uint64_t)(uint8_t)p[n - 1] << (8 * (n - 1)));
}

/* High bit set in each byte of x that is zero.  Exact for the lowest zero byte; bytes above
 * it may be flagged wrongly (borrow), which is harmless since only the lowest is used. */
static inline uint64_t trie_zero_bytes(uint64_t x)
{
    return (x - TRIE_ONES) & ~x & TRIE_HIGHS;
}

/* Flags the bytes of w that end or break a level: '/', '+', '#' and NUL. */
static inline uint64_t trie_specials(uint64_t w)
{
    return trie_zero_bytes(w)
        | trie_zero_bytes(w ^ (TRIE_ONES * (uint64_t)'/'))
        | trie_zero_bytes(w ^ (TRIE_ONES * (uint64_t)'+'))
        | trie_zero_bytes(w ^ (TRIE_ONES * (uint64_t)'#'));
}

/* Mask of the n (0..8) low bytes of a word. */
static inline uint64_t trie_low_bytes(size_t n)
{
    return n >= 8 ? ~(uint64_t)0 : (((uint64_t)1 << (8 * n)) - 1);
}

/* Index (0..7) of the lowest flagged byte of a non-zero mask. */
static inline unsigned trie_first_byte(uint64_t mask)
{
#if defined(__GNUC__) || defined(__clang__)
    return (unsigned)__builtin_ctzll(mask) >> 3;
#else
    unsigned i = 0;
    while (!(mask & 0xff)) { mask >>= 8; i++; }
    return i;
#endif
}

/* Multiply and fold (wyhash's "mum"): the 128-bit product's halves xor-ed together. */
static inline uint64_t trie_mum(uint64_t a, uint64_t b)
{
#if defined(__SIZEOF_INT128__)
    __uint128_t r = (__uint128_t)a * b;
    return (uint64_t)r ^ (uint64_t)(r >> 64);
#else
    uint64_t ha = a >> 32, la = (uint32_t)a, hb = b >> 32, lb = (uint32_t)b;
    uint64_t rh = ha * hb, rm0 = ha * lb, rm1 = hb * la, rl = la * lb;
    uint64_t t = rl + (rm0 << 32), c = t < rl;
    uint64_t lo = t + (rm1 << 32);
    c += lo < t;
    uint64_t hi = rh + (rm0 >> 32) + (rm1 >> 32) + c;
    return lo ^ hi;
#endif
}

/* Ask for the cache line at p without waiting for it (a hint; a no-op where unsupported). */
#if defined(__GNUC__) || defined(__clang__)
#define trie_prefetch(p) __builtin_prefetch((const void *)(p))
#else
#define trie_prefetch(p) ((void)(p))
#endif

/* a[:n] == b[:n] for short strings, 8 bytes at a time, never reading past a + n or b + n. */
static inline int trie_equal(const char *a, const char *b, size_t n)
{
    size_t i = 0;
    for (; n - i >= 8; i += 8)
        if (trie_load(a + i, 8) != trie_load(b + i, 8))
            return 0;
    return i == n || trie_load(a + i, n - i) == trie_load(b + i, n - i);
}

#endif /* MACULA_TRIE_SCAN_H */
