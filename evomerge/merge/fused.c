/* The task-vector merge (task arithmetic, TIES) of one tensor in one pass over memory, for CPU workers.

   evomerge/merge/fused.py builds this file into a shared library on first use and calls it through ctypes; read
   its docstring first. The torch path (methods._merge_deltas) makes some 30 elementwise passes per task vector
   (boolean masks, sign election, agreement), each a round trip through memory; this file reads every source once
   per block of BLOCK elements, keeps the block in L1 and writes the merged block once, in the output's dtype. Most
   blocks go through one loop that keeps each entry in registers from its load to its store (fast_block: one
   instance per source count, dtypes and consensus, so that it vectorises); the stage-by-stage loops (combine)
   serve the rest: the block where a RUN source's quota runs out, float16, mixed dtypes, more than 4 sources.

   Exactness: every float operation below is the one the torch path makes, in the same order, in float32 (built
   with -ffp-contract=off and without -ffast-math, so no operation is fused or reordered): the results are the
   same bits (tests/test_fused.py). The magnitude threshold of TIES is found without a sort: a histogram of the
   task vector's magnitudes by the top bits of their float32 pattern (a "sketch", built once per source tensor)
   names the one bin the threshold lies in. Where the sketch knows that bin's values exactly (a heavy bin: the rule
   for bf16 sources), the threshold value and how many of its ties are kept are known before the pass, which
   decides everything (RUN: ties kept by position, counted as it goes). Otherwise the pass keeps what is above the
   bin, drops what is below, and lists the entries inside it ("undecided"); fused.py finds the exact threshold
   among those few, and the fix-up recomputes the undecided entries from what the pass recorded. */

#include <stdint.h>
#include <string.h>

#define BLOCK 256
#define MAX_SOURCES 16
#define SHIFT 14 /* magnitude bins: float32 bits >> SHIFT, 512 bins per octave */

enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };
enum { KEEP_ALL = 0, THRESHOLD = 1, KEEP_NONE = 2, RUN = 3 };
enum { CONSENSUS_NONE = 0, CONSENSUS_SUM = 1, CONSENSUS_COUNT = 2 };

typedef struct {
    int64_t n;                      /* entries of the tensor */
    int32_t n_sources;
    int32_t base_dtype;
    const void *base;               /* the base tensor (the anchor of every task vector) */
    const void *source[MAX_SOURCES];
    int32_t source_dtype[MAX_SOURCES];
    int32_t is_delta[MAX_SOURCES];  /* 1: source is already the task vector (float32 layout), 0: minus base */
    int32_t mode[MAX_SOURCES];      /* KEEP_ALL (density >= 1), THRESHOLD, RUN, KEEP_NONE (density <= 0) */
    int32_t bin[MAX_SOURCES];       /* THRESHOLD: magnitudes in a higher bin are kept, lower dropped */
    uint32_t value[MAX_SOURCES];    /* RUN: the threshold magnitude's bits: above it kept, below dropped, */
    int64_t quota[MAX_SOURCES];     /* and of the entries equal to it the first quota (by position) */
    float weight[MAX_SOURCES];
    int32_t consensus;
    int32_t normalize;              /* consensus: divide by the agreeing weights */
    int32_t divide_total;           /* no consensus, normalize: divide by total (the weights' sum) */
    float total;
    int32_t scale;                  /* multiply by lambda */
    float lambda;
    void *out;
    int32_t out_dtype;
} Job;

static inline uint32_t bits_of(float x) { uint32_t u; memcpy(&u, &x, 4); return u; }
static inline float float_of(uint32_t u) { float x; memcpy(&x, &u, 4); return x; }

static void load(const void *src, int dtype, int64_t off, int len, float *dst) {
    if (dtype == DT_F32) {
        memcpy(dst, (const float *)src + off, (size_t)len * 4);
    } else if (dtype == DT_BF16) {
        const uint16_t *s = (const uint16_t *)src + off;
        uint32_t *d = (uint32_t *)dst;
        for (int j = 0; j < len; j++) d[j] = (uint32_t)s[j] << 16;
    } else {
        const _Float16 *s = (const _Float16 *)src + off;
        for (int j = 0; j < len; j++) dst[j] = (float)s[j];
    }
}

/* float32 -> the output dtype, rounded to nearest even as torch rounds (a NaN never gets here: see has_nan). */
static inline uint16_t to_bf16(float x) {
    uint32_t u = bits_of(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* Whether a block of merged values holds a NaN: the pass then declines the tensor (torch's NaN bits differ from
   one conversion kernel to another; a merged NaN fails its candidate anyway). */
static inline int has_nan(const float *x, int len) {
    int nan = 0;
    for (int j = 0; j < len; j++) nan |= x[j] != x[j];
    return nan;
}

static void store(const float *src, int len, void *dst, int dtype, int64_t off) {
    if (dtype == DT_F32) {
        memcpy((float *)dst + off, src, (size_t)len * 4);
    } else if (dtype == DT_BF16) {
        uint16_t *d = (uint16_t *)dst + off;
        for (int j = 0; j < len; j++) d[j] = to_bf16(src[j]);
    } else {
        _Float16 *d = (_Float16 *)dst + off;
        for (int j = 0; j < len; j++) d[j] = (_Float16)src[j];
    }
}

static inline void store_one(float x, void *dst, int dtype, int64_t j) {
    if (dtype == DT_F32) ((float *)dst)[j] = x;
    else if (dtype == DT_BF16) ((uint16_t *)dst)[j] = to_bf16(x);
    else ((_Float16 *)dst)[j] = (_Float16)x;
}

/* |x| as its float32 bits: for magnitudes the bits order as the values do, and bits >> SHIFT is x's bin. */
static inline uint32_t abs_bits(float x) { return bits_of(x) & 0x7fffffffu; }

/* The merge of a block of entries from their task vectors d[i] and masks, as methods._merge_deltas computes
   it, stage by stage (each loop vectorises): c_i = (d_i * mask_i) * w_i (in place of d), the consensus sign,
   agreement, normalisation, lambda, then base + result. */
static void combine(const Job *J, int len, const float *b, float (*d)[BLOCK], float (*mask)[BLOCK], float *out) {
    int s = J->n_sources;
    for (int i = 0; i < s; i++) {
        float w = J->weight[i], *c = d[i], *m = mask[i];
        if (J->mode[i] == KEEP_NONE)
            for (int j = 0; j < len; j++) c[j] = 0.0f * w;
        else
            for (int j = 0; j < len; j++) c[j] = (c[j] * m[j]) * w;
    }
    if (J->consensus == CONSENSUS_NONE) {
        for (int j = 0; j < len; j++) out[j] = d[0][j];
        for (int i = 1; i < s; i++)
            for (int j = 0; j < len; j++) out[j] = out[j] + d[i][j];
        if (J->divide_total)
            for (int j = 0; j < len; j++) out[j] = out[j] / J->total;
    } else {
        float sign[BLOCK], divisor[BLOCK];
        for (int j = 0; j < len; j++) sign[j] = 0.0f;
        for (int i = 0; i < s; i++) {
            const float *c = d[i];
            if (J->consensus == CONSENSUS_SUM)
                for (int j = 0; j < len; j++) sign[j] = sign[j] + c[j];
            else
                for (int j = 0; j < len; j++) sign[j] = sign[j] + ((c[j] > 0.0f ? 1.0f : 0.0f) - (c[j] < 0.0f ? 1.0f : 0.0f));
        }
        for (int j = 0; j < len; j++) {
            sign[j] = sign[j] >= 0.0f ? 1.0f : -1.0f;
            out[j] = 0.0f;
            divisor[j] = 0.0f;
        }
        for (int i = 0; i < s; i++) {
            const float *c = d[i];
            float w = J->weight[i];
            for (int j = 0; j < len; j++) {
                float agree = (c[j] * sign[j]) > 0.0f ? 1.0f : 0.0f;
                out[j] = out[j] + c[j] * agree;
                divisor[j] = divisor[j] + w * agree;
            }
        }
        if (J->normalize)
            for (int j = 0; j < len; j++) out[j] = out[j] / (divisor[j] == 0.0f ? 1.0f : divisor[j]);
    }
    if (J->scale)
        for (int j = 0; j < len; j++) out[j] = out[j] * J->lambda;
    for (int j = 0; j < len; j++) out[j] = b[j] + out[j];
}

/* A block of one task vector in float32: source - base, or the source itself where it is one already. */
static void load_delta(const void *base, int base_dtype, const void *source, int source_dtype, int is_delta,
                       int64_t off, int len, float *x) {
    float b[BLOCK];
    load(source, source_dtype, off, len, x);
    if (is_delta) return;
    load(base, base_dtype, off, len, b);
    for (int j = 0; j < len; j++) x[j] = x[j] - b[j];
}

/* Histogram of |source - base| (or |source| for a task vector) by abs_bits >> SHIFT, over [start, end): counts[2^(31-SHIFT)]
   (exact zeros counted apart: whether a zero is kept or dropped never changes a merged entry). */
int fused_sketch(const void *base, int32_t base_dtype, const void *source, int32_t source_dtype, int32_t is_delta,
                 int64_t start, int64_t end, uint32_t *counts, int64_t *zeros) {
    float x[BLOCK];
    int64_t z = 0;
    for (int64_t off = start; off < end; off += BLOCK) {
        int len = end - off < BLOCK ? (int)(end - off) : BLOCK;
        load_delta(base, base_dtype, source, source_dtype, is_delta, off, len, x);
        for (int j = 0; j < len; j++) {
            uint32_t u = abs_bits(x[j]);
            if (u == 0) z++;
            else counts[u >> SHIFT]++;
        }
    }
    *zeros = z;
    return SHIFT;
}

/* The exact values of the heavy bins (slot[bin] >= 0): table[slot][id] counts the magnitudes whose low SHIFT bits
   have that id in lut. bf16 task vectors pile up on a few values per bin (the difference of two close bf16 numbers
   has at most 9 significant bits), and a bf16 family's heavy bins share a few hundred low-bit patterns: with lut
   all 0xffff (none yet), a pattern gets the next dense id on first sight and the table is a few hundred KiB, where
   one row of 2^SHIFT per heavy bin (lut the identity, cap 2^SHIFT) is 64 KiB a bin, a scatter through L3 at ~11 ns
   an entry. Returns how many ids were given, or -1 when more than cap would be needed (the caller then counts
   again with the identity). */
int64_t fused_bin_values(const void *base, int32_t base_dtype, const void *source, int32_t source_dtype,
                         int32_t is_delta, int64_t n, const int32_t *slot, uint16_t *lut, int32_t cap,
                         uint32_t *table) {
    float x[BLOCK];
    int32_t ids = 0;
    for (int64_t off = 0; off < n; off += BLOCK) {
        int len = n - off < BLOCK ? (int)(n - off) : BLOCK;
        load_delta(base, base_dtype, source, source_dtype, is_delta, off, len, x);
        for (int j = 0; j < len; j++) {
            uint32_t u = abs_bits(x[j]);
            int32_t at = u ? slot[u >> SHIFT] : -1;
            if (at < 0) continue;
            uint32_t low = u & ((1u << SHIFT) - 1);
            uint32_t id = lut[low];
            if (id == 0xffffu) {
                if (ids >= cap) return -1;
                id = lut[low] = (uint16_t)ids++;
            }
            table[(int64_t)at * cap + id]++;
        }
    }
    return ids;
}

/* Entries some source's threshold bin leaves undecided, in index order: what the fix-up needs to finish them
   without reading the sources again (the base, every task vector, and which sources are undecided, one bit each). */
typedef struct {
    int64_t cap, count;
    int64_t *index;
    float *base;
    float *delta[MAX_SOURCES];
    uint32_t *undecided;
    uint32_t *kept;  /* the pass's decision for every other source, one bit each */
} Pending;

/* The fast path of the pass: one loop over a block's entries that loads each source entry, forms its task
   vector, mask and weighted contribution, and merges them in registers (the stage-by-stage loops above make each
   stage a trip through L1: some 25 stores per entry for three sources, which is what bounded the pass). The float
   operations per entry are combine()'s, in its order, so the bits are the same. Every source's mask is a
   comparison, u >= lo: KEEP_ALL and KEEP_NONE sources; RUN sources, ties kept while the quota lasts and counted in
   equal[] (the caller redoes the one block per source where the quota runs out the slow way); THRESHOLD sources,
   their bin's entries dropped as in the slow pass, counted and marked in undecided[] (fast_pending lists them).
   S, DT (base and sources), DELTA (sources are task vectors), ODT and the consensus are constants in each
   instance: the loop then vectorises. */
static inline __attribute__((always_inline)) float fast_load(const void *restrict p, int dt, int64_t j) {
    if (dt == DT_BF16) return float_of((uint32_t)((const uint16_t *)p)[j] << 16);
    return ((const float *)p)[j];
}

#define FAST_MAX 4

/* One source's step of the fast loop, for source K (a literal) of S: its contribution c##K; the magnitudes in
   [a##K, z##K] counted in eq##K (a RUN source's ties; a THRESHOLD source's undecided entries, also marked in und). */
#define FAST_SOURCE(K)                                                                                      \
    float c##K = 0.0f;                                                                                       \
    if (S > K) {                                                                                             \
        float x = fast_load(p##K, DT, j);                                                                    \
        if (!DELTA) x = x - b;                                                                               \
        uint32_t u = abs_bits(x);                                                                            \
        int32_t in = (u >= a##K) & (u <= z##K);                                                              \
        eq##K += in;                                                                                         \
        und |= (uint32_t)(in & thr##K) << K;                                                                  \
        c##K = none##K ? zw##K : (x * (u >= l##K ? 1.0f : 0.0f)) * w##K;                                    \
    }
#define FAST_PARAMS(K)                                                                                      \
    const void *restrict p##K = S > K ? (const char *)J->source[K] + off * width : NULL;                     \
    const float w##K = S > K ? J->weight[K] : 0.0f, zw##K = 0.0f * w##K;                                     \
    const int none##K = S > K && J->mode[K] == KEEP_NONE;                                                    \
    const uint32_t l##K = S > K ? lo[K] : 0u, a##K = S > K ? count_lo[K] : 1u, z##K = S > K ? count_hi[K] : 0u; \
    const int32_t thr##K = S > K && J->mode[K] == THRESHOLD;                                                 \
    int32_t eq##K = 0;
/* agreement of source K with the elected sign: its contribution added to o, its weight to dv */
#define FAST_AGREE(K)                                                                                       \
    if (S > K) {                                                                                             \
        float agree = (c##K * sg) > 0.0f ? 1.0f : 0.0f;                                                      \
        o = o + c##K * agree;                                                                                \
        dv = dv + w##K * agree;                                                                              \
    }
#define FAST_SIGN(K)                                                                                        \
    if (S > K) sg = consensus == CONSENSUS_SUM ? sg + c##K                                                   \
                                               : sg + ((c##K > 0.0f ? 1.0f : 0.0f) - (c##K < 0.0f ? 1.0f : 0.0f));

static inline __attribute__((always_inline)) int fast_block(const Job *J, const int S, const int DT, const int DELTA,
                                                            const int ODT, const int consensus, int64_t off, int len,
                                                            const uint32_t *lo, const uint32_t *count_lo,
                                                            const uint32_t *count_hi, int64_t *equal, uint32_t *undecided) {
    /* every source its own pointer and constants (no arrays indexed in the loop): what lets it vectorise */
    const int64_t width = DT == DT_BF16 ? 2 : 4;
    const void *restrict base = (const char *)J->base + off * width;
    void *restrict outp = (char *)J->out + off * (ODT == DT_BF16 ? 2 : 4);
    FAST_PARAMS(0) FAST_PARAMS(1) FAST_PARAMS(2) FAST_PARAMS(3)
    const int normalize = J->normalize, divide_total = J->divide_total, scale = J->scale;
    const float total = J->total, lambda = J->lambda;
    int nan = 0;
    for (int j = 0; j < len; j++) {
        float b = fast_load(base, DT, j);
        uint32_t und = 0;
        FAST_SOURCE(0) FAST_SOURCE(1) FAST_SOURCE(2) FAST_SOURCE(3)
        float o;
        if (consensus == CONSENSUS_NONE) {
            o = c0;
            if (S > 1) o = o + c1;
            if (S > 2) o = o + c2;
            if (S > 3) o = o + c3;
            if (divide_total) o = o / total;
        } else {
            float sg = 0.0f, dv = 0.0f;
            FAST_SIGN(0) FAST_SIGN(1) FAST_SIGN(2) FAST_SIGN(3)
            sg = sg >= 0.0f ? 1.0f : -1.0f;
            o = 0.0f;
            FAST_AGREE(0) FAST_AGREE(1) FAST_AGREE(2) FAST_AGREE(3)
            if (normalize) o = o / (dv == 0.0f ? 1.0f : dv);
        }
        if (scale) o = o * lambda;
        o = b + o;
        nan |= o != o;
        undecided[j] = und;
        if (ODT == DT_BF16) ((uint16_t *)outp)[j] = to_bf16(o);
        else ((float *)outp)[j] = o;
    }
    equal[0] = eq0;
    if (S > 1) equal[1] = eq1;
    if (S > 2) equal[2] = eq2;
    if (S > 3) equal[3] = eq3;
    return nan;
}

/* One instance per (sources, dtype, task vectors or sources, output dtype) the fast path serves. */
#define FAST_CASE(S, DT, DELTA, ODT) \
    static int fast_##S##_##DT##_##DELTA##_##ODT(const Job *J, int64_t off, int len, const uint32_t *lo, \
                                                  const uint32_t *a, const uint32_t *z, int64_t *eq, uint32_t *und) { \
        if (J->consensus == CONSENSUS_NONE) \
            return fast_block(J, S, DT, DELTA, ODT, CONSENSUS_NONE, off, len, lo, a, z, eq, und); \
        if (J->consensus == CONSENSUS_SUM) \
            return fast_block(J, S, DT, DELTA, ODT, CONSENSUS_SUM, off, len, lo, a, z, eq, und); \
        return fast_block(J, S, DT, DELTA, ODT, CONSENSUS_COUNT, off, len, lo, a, z, eq, und); \
    }
#define FAST_DTYPES(S) \
    FAST_CASE(S, 1, 0, 1) FAST_CASE(S, 1, 0, 0) FAST_CASE(S, 0, 0, 0) FAST_CASE(S, 0, 1, 1) FAST_CASE(S, 0, 1, 0)
FAST_DTYPES(1) FAST_DTYPES(2) FAST_DTYPES(3) FAST_DTYPES(4)

/* 0 turns the fast path off (tests compare both ways of the pass); the blocks it merged, for tests to see it ran. */
int fused_fast = 1;
int64_t fused_fast_blocks = 0;

typedef int (*FastFn)(const Job *, int64_t, int, const uint32_t *, const uint32_t *, const uint32_t *, int64_t *,
                      uint32_t *);

/* The fast path's instance for this job, or NULL (sources of mixed dtypes or layouts, more than 4, float16). */
static FastFn fast_for(const Job *J) {
    int s = J->n_sources, dt = J->base_dtype, delta = J->is_delta[0], odt = J->out_dtype;
    if (s < 1 || s > FAST_MAX || (dt != DT_BF16 && dt != DT_F32) || (odt != DT_BF16 && odt != DT_F32)) return NULL;
    for (int i = 0; i < s; i++)
        if (J->source_dtype[i] != dt || J->is_delta[i] != delta) return NULL;
#define PICK(S) \
    if (s == S) { \
        if (dt == DT_BF16 && !delta && odt == DT_BF16) return fast_##S##_1_0_1; \
        if (dt == DT_BF16 && !delta && odt == DT_F32) return fast_##S##_1_0_0; \
        if (dt == DT_F32 && !delta && odt == DT_F32) return fast_##S##_0_0_0; \
        if (dt == DT_F32 && delta && odt == DT_BF16) return fast_##S##_0_1_1; \
        if (dt == DT_F32 && delta && odt == DT_F32) return fast_##S##_0_1_0; \
    }
    PICK(1) PICK(2) PICK(3) PICK(4)
#undef PICK
    return NULL;
}

/* The undecided entries of a block the fast path merged, listed as the slow path lists them (index order; the
   base, every task vector, which sources are undecided, the others' decisions), each read again from the sources:
   a few percent of a block, in L1 still. Returns 1 when the list would overflow. */
static int fast_pending(const Job *J, int64_t off, int len, const uint32_t *und, const uint32_t *lo, Pending *P) {
    int picked[BLOCK], m = 0, s = J->n_sources;
    for (int j = 0; j < len; j++) {  /* branch-free, as in the pass */
        picked[m] = j;
        m += und[j] != 0;
    }
    if (P->count + m > P->cap) return 1;
    for (int t = 0; t < m; t++) {
        int64_t c = P->count + t, at = off + picked[t];
        float b, x;
        uint32_t kept = 0;
        load(J->base, J->base_dtype, at, 1, &b);
        for (int i = 0; i < s; i++) {
            load(J->source[i], J->source_dtype[i], at, 1, &x);
            if (!J->is_delta[i]) x = x - b;
            P->delta[i][c] = x;
            kept |= (uint32_t)(abs_bits(x) >= lo[i]) << i;
        }
        P->index[c] = at;
        P->base[c] = b;
        P->undecided[c] = und[picked[t]];
        P->kept[c] = kept & ~und[picked[t]];
    }
    P->count += m;
    return 0;
}

/* The pass over [start, end): writes every merged entry, treating undecided magnitudes (in source i's threshold
   bin, nonzero) as dropped, and lists the entries with any undecided source. Returns 0; 1 when the list would
   overflow its capacity, 2 when a merged value is NaN (the caller then merges this tensor the torch way). */
int fused_pass(const Job *J, int64_t start, int64_t end, Pending *P) {
    static __thread float d[MAX_SOURCES][BLOCK], mask[MAX_SOURCES][BLOCK];
    float b[BLOCK], out[BLOCK];
    uint32_t und[BLOCK];
    int64_t run[MAX_SOURCES] = {0};  /* RUN: the bin's entries seen so far */
    int s = J->n_sources;
    if (s < 1 || s > MAX_SOURCES) return -1;
    P->count = 0;
    FastFn fast = fused_fast ? fast_for(J) : NULL;
    int64_t fast_blocks = 0;
    for (int64_t off = start; off < end; off += BLOCK) {
        int len = end - off < BLOCK ? (int)(end - off) : BLOCK;
        uint32_t any = 0;
        if (fast) {
            uint32_t lo[MAX_SOURCES], a[MAX_SOURCES], z[MAX_SOURCES], thr = 0;
            int64_t equal[MAX_SOURCES];
            for (int i = 0; i < s; i++) {  /* kept: u >= lo; counted: u in [a, z] */
                int open = J->mode[i] == RUN && run[i] < J->quota[i];
                lo[i] = 0u, a[i] = 1u, z[i] = 0u;
                if (J->mode[i] == RUN) {  /* ties kept while the quota lasts, and counted */
                    lo[i] = J->value[i] + (open ? 0u : 1u);
                    if (open) a[i] = z[i] = J->value[i];
                } else if (J->mode[i] == THRESHOLD) {  /* the bin above kept, the bin itself (but 0) undecided */
                    uint32_t bin = (uint32_t)J->bin[i];
                    lo[i] = (bin + 1u) << SHIFT;
                    a[i] = bin ? bin << SHIFT : 1u, z[i] = lo[i] - 1u;
                    thr |= 1u << i;
                }
            }
            if (fast(J, off, len, lo, a, z, equal, und)) return 2;
            int spent = 0, listed = 0;
            for (int i = 0; i < s; i++) {
                if (J->mode[i] == RUN) spent |= a[i] <= z[i] && run[i] + equal[i] > J->quota[i];
                if (thr >> i & 1u) listed |= equal[i] > 0;
            }
            if (!spent) {
                for (int i = 0; i < s; i++)
                    if (J->mode[i] == RUN && a[i] <= z[i]) run[i] += equal[i];
                if (listed && fast_pending(J, off, len, und, lo, P)) return 1;
                fast_blocks++;
                continue;
            }  /* the quota of some source runs out in this block: the slow way decides its ties by position */
        }
        load(J->base, J->base_dtype, off, len, b);
        for (int j = 0; j < len; j++) und[j] = 0;
        for (int i = 0; i < s; i++) {
            float *di = d[i], *mi = mask[i];
            load(J->source[i], J->source_dtype[i], off, len, di);
            if (!J->is_delta[i])
                for (int j = 0; j < len; j++) di[j] = di[j] - b[j];
            if (J->mode[i] == KEEP_ALL || J->mode[i] == KEEP_NONE) {
                for (int j = 0; j < len; j++) mi[j] = 1.0f;
                continue;
            }
            if (J->mode[i] == RUN) {
                uint32_t v = J->value[i];
                int64_t q = J->quota[i];
                if (run[i] >= q) {  /* the quota is spent: only what is above the value */
                    for (int j = 0; j < len; j++) mi[j] = abs_bits(di[j]) > v ? 1.0f : 0.0f;
                    continue;
                }
                int equal = 0;  /* first as if every tie of this block were kept, counting them */
                for (int j = 0; j < len; j++) {
                    uint32_t u = abs_bits(di[j]);
                    mi[j] = u >= v ? 1.0f : 0.0f;
                    equal += u == v;
                }
                if (run[i] + equal > q) {  /* the block where the quota runs out */
                    int64_t r = run[i];
                    for (int j = 0; j < len; j++) {
                        uint32_t u = abs_bits(di[j]);
                        int tie = u == v;
                        mi[j] = (u > v) | (tie & (r < q)) ? 1.0f : 0.0f;
                        r += tie;
                    }
                }
                run[i] += equal;
                continue;
            }
            uint32_t bin = (uint32_t)J->bin[i];
            for (int j = 0; j < len; j++) {
                uint32_t u = abs_bits(di[j]), k = u >> SHIFT;
                mi[j] = k > bin ? 1.0f : 0.0f;
                uint32_t here = (uint32_t)((k == bin) & (u != 0)) << i;
                und[j] |= here;
                any |= here;
            }
        }
        if (any) {
            int picked[BLOCK], m = 0;
            for (int j = 0; j < len; j++) {  /* branch-free: a few percent of entries, at random */
                picked[m] = j;
                m += und[j] != 0;
            }
            if (P->count + m > P->cap) return 1;
            for (int t = 0; t < m; t++) {
                int j = picked[t];
                int64_t c = P->count + t;
                P->index[c] = off + j;
                P->base[c] = b[j];
                P->undecided[c] = und[j];
                uint32_t kept = 0;
                for (int i = 0; i < s; i++) kept |= (uint32_t)(mask[i][j] != 0.0f) << i;
                P->kept[c] = kept;
            }
            for (int i = 0; i < s; i++)
                for (int t = 0; t < m; t++) P->delta[i][P->count + t] = d[i][picked[t]];
            P->count += m;
        }
        combine(J, len, b, d, mask, out);
        if (has_nan(out, len)) return 2;
        store(out, len, J->out, J->out_dtype, off);
    }
    __atomic_fetch_add(&fused_fast_blocks, fast_blocks, __ATOMIC_RELAXED);
    return 0;
}

/* The pending entries of one pass, now that each threshold is known: source i keeps an undecided magnitude above
   threshold[i], and of those equal to it the first quota[i] (ties by position, as a stable sort breaks them). */
int fused_fixup(const Job *J, const Pending *P, const float *threshold, const int64_t *quota) {
    static __thread float d[MAX_SOURCES][BLOCK], mask[MAX_SOURCES][BLOCK];
    float out[BLOCK];
    int s = J->n_sources;
    int64_t ties[MAX_SOURCES];
    for (int i = 0; i < s; i++) ties[i] = 0;
    for (int64_t off = 0; off < P->count; off += BLOCK) {
        int len = P->count - off < BLOCK ? (int)(P->count - off) : BLOCK;
        const uint32_t *und = P->undecided + off, *kept = P->kept + off;
        for (int i = 0; i < s; i++) {
            float *di = d[i], *mi = mask[i];
            memcpy(di, P->delta[i] + off, (size_t)len * 4);
            float v = threshold[i];
            int64_t t = ties[i], q = quota[i];
            for (int j = 0; j < len; j++) {  /* branch-free: which sources are undecided is data */
                float a = float_of(abs_bits(di[j]));
                int listed = (int)(und[j] >> i & 1u), equal = listed & (a == v);
                int keep = listed ? (a > v) | (equal & (t < q)) : (int)(kept[j] >> i & 1u);
                t += equal;
                mi[j] = keep ? 1.0f : 0.0f;
            }
            ties[i] = t;
        }
        combine(J, len, P->base + off, d, mask, out);
        if (has_nan(out, len)) return 2;
        for (int j = 0; j < len; j++) store_one(out[j], J->out, J->out_dtype, P->index[off + j]);
    }
    return 0;
}

/* Source i's undecided magnitudes in a pending list, in index order, into out; returns how many. */
int64_t fused_undecided(const Pending *P, int32_t i, float *out) {
    int64_t m = 0;
    for (int64_t c = 0; c < P->count; c++) {
        out[m] = float_of(abs_bits(P->delta[i][c]));
        m += P->undecided[c] >> i & 1u;
    }
    return m;
}
