/* Run detection for the simulated kernel's PAGEMAP_SCAN (tiermem.sim scan).
 *
 * A page's class is ``s & mask`` or, with ``val >= 0``, ``(s & mask) == val`` (a yes/no class).
 * edges(): every index i (1 <= i < n) where the class of s[i] differs from s[i-1]'s, written to an int64
 * buffer. numpy's flatnonzero over a dense edge mask mispredicts a branch per
 * edge (~3 ns each); this compares 64 bytes at a time into a bit mask and writes
 * the positions of its edges eight at a time, without a branch per edge (the
 * technique of simdjson's bit-index flattening). */
#include "native.h"

#if defined(__SSE2__)
#include <emmintrin.h>

typedef struct {
    __m128i mask, val;
    int bin;
} cls_t;

static inline __m128i cls16(const uint8_t *p, const cls_t *c)
{
    __m128i x = _mm_and_si128(_mm_loadu_si128((const __m128i *)p), c->mask);
    return c->bin ? _mm_cmpeq_epi8(x, c->val) : x;
}

static inline uint64_t neq16(const uint8_t *p, const cls_t *c)
{
    return (~(unsigned)_mm_movemask_epi8(_mm_cmpeq_epi8(cls16(p, c), cls16(p - 1, c)))) & 0xffffu;
}

static inline uint64_t neq64(const uint8_t *p, const cls_t *c)
{
    return neq16(p, c) | neq16(p + 16, c) << 16 | neq16(p + 32, c) << 32 | neq16(p + 48, c) << 48;
}

static inline cls_t classes(uint8_t mask, int val)
{
    cls_t c = {_mm_set1_epi8((char)mask), _mm_set1_epi8((char)(val < 0 ? 0 : val)), val >= 0};
    return c;
}
#endif

/* The class of one state, in the scalar tail. */
static inline int cls1(uint8_t x, uint8_t mask, int val)
{
    return val >= 0 ? (x & mask) == val : x & mask;
}

/* Eight positions from the mask, unconditionally: slots past the last edge are overwritten later. */
#define EIGHT(o, base, m)                                                  \
    do {                                                                   \
        for (int j_ = 0; j_ < 8; j_++) {                                   \
            (o)[j_] = (base) + __builtin_ctzll((m) | (1ull << 63));        \
            (m) &= (m) - 1;                                                \
        }                                                                  \
    } while (0)

Py_ssize_t tm_edges(const uint8_t *s, Py_ssize_t n, uint8_t mask, int val, int64_t *out)
{
    Py_ssize_t k = 0, i = 1;
#if defined(__SSE2__)
    cls_t c = classes(mask, val);
    for (; i + 64 <= n; i += 64) {
        uint64_t m = neq64(s + i, &c);
        if (!m)
            continue;
        int cnt = __builtin_popcountll(m);
        /* bit 63 stands in when the mask is exhausted: such slots are past the block's edges */
        EIGHT(out + k, i, m);
        if (cnt > 8) {
            EIGHT(out + k + 8, i, m);
            if (cnt > 16) {
                Py_ssize_t j = k + 16;
                while (m) {
                    out[j++] = i + __builtin_ctzll(m);
                    m &= m - 1;
                }
            }
        }
        k += cnt;
    }
#endif
    for (; i < n; i++) {
        out[k] = i;
        k += cls1(s[i], mask, val) != cls1(s[i - 1], mask, val);
    }
    return k;
}

/* The hot-set scan fused: the regions of the runs whose masked state equals ``match``, as
 * PAGE_REGION triples, straight from the states (no intermediate edge array: the scan is
 * bound by memory bandwidth once run detection is cheap). Two passes: count, then fill an
 * exactly sized output. */
Py_ssize_t tm_count_edges(const uint8_t *s, Py_ssize_t n, uint8_t mask, int val)
{
    Py_ssize_t k = 0, i = 1;
#if defined(__SSE2__)
    cls_t c = classes(mask, val);
    for (; i + 64 <= n; i += 64)
        k += __builtin_popcountll(neq64(s + i, &c));
#endif
    for (; i < n; i++)
        k += cls1(s[i], mask, val) != cls1(s[i - 1], mask, val);
    return k;
}

Py_ssize_t tm_match_regions(const uint8_t *s, Py_ssize_t n, uint8_t mask, int val, int match, uint64_t key,
                            uint64_t base, int shift, uint64_t *o, Py_ssize_t cap)
{
    /* Edges alternate between opening and closing a matching run (the branch on ``open`` is
     * perfectly predicted). A branch-free variant that writes eight edge slots at a time measured
     * slower here: its scattered stores cost more than the loop's exit mispredictions. */
    Py_ssize_t r = 0, i = 1;
    int open = n > 0 && cls1(s[0], mask, val) == match;
    uint64_t start = 0;
#define EDGE(pos)                                                \
    do {                                                         \
        uint64_t p_ = (uint64_t)(pos);                           \
        if (open) {                                              \
            if (r == cap)                                        \
                return -1;                                       \
            o[3 * r] = (start << shift) + base;                  \
            o[3 * r + 1] = (p_ << shift) + base;                 \
            o[3 * r + 2] = key;                                  \
            r++;                                                 \
        } else                                                   \
            start = p_;                                          \
        open = !open;                                            \
    } while (0)
#if defined(__SSE2__)
    cls_t c = classes(mask, val);
    for (; i + 64 <= n; i += 64) {
        uint64_t m = neq64(s + i, &c);
        while (m) {
            EDGE(i + __builtin_ctzll(m));
            m &= m - 1;
        }
    }
#endif
    for (; i < n; i++)
        if (cls1(s[i], mask, val) != cls1(s[i - 1], mask, val))
            EDGE(i);
    if (open)
        EDGE(n);
#undef EDGE
    return r;
}
