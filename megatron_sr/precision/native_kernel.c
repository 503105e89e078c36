/* Native CPU kernels of megatron_sr.precision: the fused AdamW step of every
 * strategy and the SR cast, bit-identical to the torch reference
 * (rounding.py, adamw_torch.py) and the Triton kernels (kernels.py).
 *
 * Built and loaded by megatron_sr/precision/native.py with the system C
 * compiler: -O3 -march=native -ffp-contract=off -fno-math-errno, never
 * -ffast-math. Bit identity rests on:
 * - Philox4x32-10 in uint32 lanes (32x32->64-bit products in uint64), the
 *   words of Triton's tl.randint4x(key, counter): counter = element // 2,
 *   the even element takes the low, the odd element the high 16 bits;
 *   word 0 rounds the parameter, 1 exp_avg, 2 exp_avg_sq.
 * - IEEE fp32 +, -, *, / in the reference's order, with no contraction into
 *   FMAs (-ffp-contract=off) and no reassociation (no -ffast-math).
 * - sqrtf, correctly rounded (sqrtss / vsqrtps): equal to the reference's
 *   float64 square root rounded to fp32, since for square roots rounding
 *   first to 53 then to 24 bits never differs from rounding once
 *   (53 >= 2*24 + 2).
 * - The bf16 writes are the integer patterns of rounding.py (sr_pattern,
 *   nearest_pattern); NaN stays NaN (payloads are not part of the contract).
 *
 * Work is split into blocks of BLOCK elements: prefetch the block's tensors,
 * Philox for the block's pairs into small arrays of 16-bit draws, then the
 * element loop (auto-vectorized). Philox has three code paths, the fastest
 * the CPU has chosen at the first call (megatron_sr_set_philox_path can
 * force an available one, for tests and benchmarks): AVX-512 intrinsics (16 lanes),
 * AVX2 intrinsics (8 lanes), and the portable scalar loop (which the
 * compiler auto-vectorizes as it can; it also does every path's tail).
 * One call updates a whole bucket shard (a table of segments) on up to
 * `threads` pthreads, each on a contiguous range of the shard's elements.
 * The SR add (grad_accumulation.stochastic_add_) rounds the fp32 sum of two
 * bf16 tensors with stream 0 of its own key, like the SR cast.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#ifndef BLOCK
#define BLOCK 256
#endif
#define MAX_THREADS 64
#define MIN_ELEMENTS_PER_THREAD (1 << 16)

#define PHILOX_KEY_A 0x9E3779B9u
#define PHILOX_KEY_B 0xBB67AE85u
#define PHILOX_ROUND_A 0xD2511F53u
#define PHILOX_ROUND_B 0xCD9E8D57u

/* Write modes: the codes of adamw_torch.py (WRITE_EXACT, WRITE_NEAREST,
 * WRITE_STOCHASTIC, WRITE_KAHAN). */
enum { EXACT = 0, NEAREST = 1, STOCHASTIC = 2, KAHAN = 3 };

int megatron_sr_native_abi_version(void) { return 4; }

static inline float as_float(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint32_t as_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

/* rounding.sr_pattern >> 16 */
static inline uint16_t sr_bf16(float x, uint32_t random16) {
    uint32_t bits = as_bits(x);
    uint32_t rounded = (bits + random16) >> 16;
    uint32_t nan = (bits | 0x00400000u) >> 16;
    return (uint16_t)(x != x ? nan : rounded);
}

/* rounding.nearest_pattern >> 16 */
static inline uint16_t rtn_bf16(float x) {
    uint32_t bits = as_bits(x);
    uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    uint32_t nan = (bits | 0x00400000u) >> 16;
    return (uint16_t)(x != x ? nan : rounded);
}

static inline float bf16_value(uint16_t h) { return as_float((uint32_t)h << 16); }

/* Philox code paths (megatron_sr_philox_paths' bits). */
enum { PHILOX_PORTABLE = 0, PHILOX_AVX2 = 1, PHILOX_AVX512 = 2 };

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#define HAVE_X86_PATHS 1
#include <immintrin.h>

/* High and low 32-bit halves of the products of the uint32 lanes of a with
 * the constant m (m64: m in each 64-bit lane, m32: in each 32-bit lane). */
__attribute__((target("avx512f"))) static inline void mul_hi_lo_512(__m512i a, __m512i m64, __m512i m32,
                                                                     __m512i *hi, __m512i *lo) {
    __m512i even = _mm512_mul_epu32(a, m64);
    __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m64);
    *hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
    *lo = _mm512_mullo_epi32(a, m32);
}

/* Philox of the pairs first_pair .. first_pair + npairs - 1 in groups of 32
 * (two interleaved vectors of 16 lanes; gcc's auto-vectorization of the
 * portable loop extracts the products' halves less well, ~1.7x slower).
 * Returns the number of pairs done (a multiple of 32); the caller does the
 * rest. Same output layout as philox_block. */
__attribute__((target("avx512f"))) static int philox_avx512(uint64_t first_pair, int npairs, uint64_t key,
                                                            uint16_t *r0, uint16_t *r1, uint16_t *r2,
                                                            int need0, int need1, int need2) {
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i a64 = _mm512_set1_epi64(PHILOX_ROUND_A), b64 = _mm512_set1_epi64(PHILOX_ROUND_B);
    const __m512i a32 = _mm512_set1_epi32((int)PHILOX_ROUND_A), b32 = _mm512_set1_epi32((int)PHILOX_ROUND_B);
    int p = 0;
    for (; p + 32 <= npairs; p += 32) {
        uint64_t counter = first_pair + (uint64_t)p;
        const __m512i first_low = _mm512_set1_epi32((int)(uint32_t)counter);
        const __m512i first_high = _mm512_set1_epi32((int)(uint32_t)(counter >> 32));
        __m512i c0[2], c1[2], c2[2], c3[2];
        for (int u = 0; u < 2; u++) {
            c0[u] = _mm512_add_epi32(first_low, _mm512_add_epi32(iota, _mm512_set1_epi32(16 * u)));
            __mmask16 carry = _mm512_cmplt_epu32_mask(c0[u], first_low);
            c1[u] = _mm512_mask_add_epi32(first_high, carry, first_high, _mm512_set1_epi32(1));
            c2[u] = _mm512_setzero_si512();
            c3[u] = _mm512_setzero_si512();
        }
        uint32_t k0 = (uint32_t)key, k1 = (uint32_t)(key >> 32);
        for (int r = 0; r < 10; r++) {
            const __m512i key0 = _mm512_set1_epi32((int)k0), key1 = _mm512_set1_epi32((int)k1);
            for (int u = 0; u < 2; u++) {
                __m512i hi_b, lo_b, hi_a, lo_a;
                mul_hi_lo_512(c2[u], b64, b32, &hi_b, &lo_b);
                mul_hi_lo_512(c0[u], a64, a32, &hi_a, &lo_a);
                c0[u] = _mm512_ternarylogic_epi32(hi_b, c1[u], key0, 0x96); /* three-way xor */
                c2[u] = _mm512_ternarylogic_epi32(hi_a, c3[u], key1, 0x96);
                c1[u] = lo_b;
                c3[u] = lo_a;
            }
            k0 += PHILOX_KEY_A;
            k1 += PHILOX_KEY_B;
        }
        /* x86 is little-endian: a word's low half lands at [2p], its high half at [2p + 1]. */
        for (int u = 0; u < 2; u++) {
            if (need0) _mm512_storeu_si512((void *)(r0 + 2 * p + 32 * u), c0[u]);
            if (need1) _mm512_storeu_si512((void *)(r1 + 2 * p + 32 * u), c1[u]);
            if (need2) _mm512_storeu_si512((void *)(r2 + 2 * p + 32 * u), c2[u]);
        }
    }
    return p;
}

/* mul_hi_lo_512 in 8 lanes: vpmuludq on the even and on the odd lanes, a
 * shift and a blend for the high halves, vpmulld for the low ones. */
__attribute__((target("avx2"))) static inline void mul_hi_lo_256(__m256i a, __m256i m, __m256i *hi, __m256i *lo) {
    __m256i even = _mm256_mul_epu32(a, m);
    __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
    *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
    *lo = _mm256_mullo_epi32(a, m);
}

/* philox_avx512 in groups of 16 pairs (two interleaved vectors of 8 lanes:
 * four spill out of the 16 ymm registers, measured slower). The carry into
 * the counter's high word: an unsigned compare, done signed on words with
 * the sign bit flipped (AVX2 has no unsigned compare). */
__attribute__((target("avx2"))) static int philox_avx2(uint64_t first_pair, int npairs, uint64_t key,
                                                       uint16_t *r0, uint16_t *r1, uint16_t *r2,
                                                       int need0, int need1, int need2) {
    const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i sign = _mm256_set1_epi32((int)0x80000000u);
    const __m256i a32 = _mm256_set1_epi32((int)PHILOX_ROUND_A), b32 = _mm256_set1_epi32((int)PHILOX_ROUND_B);
    int p = 0;
    for (; p + 16 <= npairs; p += 16) {
        uint64_t counter = first_pair + (uint64_t)p;
        const __m256i first_low = _mm256_set1_epi32((int)(uint32_t)counter);
        const __m256i first_high = _mm256_set1_epi32((int)(uint32_t)(counter >> 32));
        __m256i c0[2], c1[2], c2[2], c3[2];
        for (int u = 0; u < 2; u++) {
            c0[u] = _mm256_add_epi32(first_low, _mm256_add_epi32(iota, _mm256_set1_epi32(8 * u)));
            __m256i carry = _mm256_cmpgt_epi32(_mm256_xor_si256(first_low, sign), _mm256_xor_si256(c0[u], sign));
            c1[u] = _mm256_sub_epi32(first_high, carry); /* carry is -1 where the low word wrapped */
            c2[u] = _mm256_setzero_si256();
            c3[u] = _mm256_setzero_si256();
        }
        uint32_t k0 = (uint32_t)key, k1 = (uint32_t)(key >> 32);
        for (int r = 0; r < 10; r++) {
            const __m256i key0 = _mm256_set1_epi32((int)k0), key1 = _mm256_set1_epi32((int)k1);
            for (int u = 0; u < 2; u++) {
                __m256i hi_b, lo_b, hi_a, lo_a;
                mul_hi_lo_256(c2[u], b32, &hi_b, &lo_b);
                mul_hi_lo_256(c0[u], a32, &hi_a, &lo_a);
                c0[u] = _mm256_xor_si256(_mm256_xor_si256(hi_b, c1[u]), key0);
                c2[u] = _mm256_xor_si256(_mm256_xor_si256(hi_a, c3[u]), key1);
                c1[u] = lo_b;
                c3[u] = lo_a;
            }
            k0 += PHILOX_KEY_A;
            k1 += PHILOX_KEY_B;
        }
        for (int u = 0; u < 2; u++) {
            if (need0) _mm256_storeu_si256((__m256i *)(r0 + 2 * p + 16 * u), c0[u]);
            if (need1) _mm256_storeu_si256((__m256i *)(r1 + 2 * p + 16 * u), c1[u]);
            if (need2) _mm256_storeu_si256((__m256i *)(r2 + 2 * p + 16 * u), c2[u]);
        }
    }
    return p;
}
#endif

/* Bit i set: path i can run on this CPU. */
int megatron_sr_philox_paths(void) {
    int paths = 1 << PHILOX_PORTABLE;
#ifdef HAVE_X86_PATHS
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2")) paths |= 1 << PHILOX_AVX2;
    if (__builtin_cpu_supports("avx512f")) paths |= 1 << PHILOX_AVX512;
#endif
    return paths;
}

static int philox_path = -1; /* -1: not chosen yet (the best available at the first call) */

/* Use Philox path `path` (PHILOX_*), or the fastest available for -1, from
 * the next call on (process-wide: not while a call runs). Returns the path
 * now in use, or -1 when `path` cannot run here (nothing changed). */
int megatron_sr_set_philox_path(int path) {
    int paths = megatron_sr_philox_paths();
    if (path == -1) path = (paths >> PHILOX_AVX512) & 1 ? PHILOX_AVX512 : (paths >> PHILOX_AVX2) & 1 ? PHILOX_AVX2
                                                                                                      : PHILOX_PORTABLE;
    if (path < 0 || path > PHILOX_AVX512 || !((paths >> path) & 1)) return -1;
    philox_path = path;
    return path;
}

int megatron_sr_philox_path(void) {
    if (philox_path < 0) megatron_sr_set_philox_path(-1);
    return philox_path;
}

/* Philox4x32-10 of the counters first_pair .. first_pair + npairs - 1.
 * Words 0, 1, 2 of pair p go to r0, r1, r2 as 16-bit draws: the low half
 * at [2p] (even element), the high half at [2p + 1] (odd element). `path`:
 * the code path (PHILOX_*) for the pairs before the portable loop's tail. */
static inline void philox_block(uint64_t first_pair, int npairs, uint64_t key,
                                uint16_t *restrict r0, uint16_t *restrict r1, uint16_t *restrict r2,
                                const int need0, const int need1, const int need2, const int path) {
    const uint32_t key0 = (uint32_t)key, key1 = (uint32_t)(key >> 32);
    /* The 64-bit counter as two uint32 words, the carry into the high word
     * computed per lane: no 64-bit lanes in the loop. */
    const uint32_t first_low = (uint32_t)first_pair, first_high = (uint32_t)(first_pair >> 32);
    int p = 0;
#ifdef HAVE_X86_PATHS
    if (path == PHILOX_AVX512)
        p = philox_avx512(first_pair, npairs, key, r0, r1, r2, need0, need1, need2);
    else if (path == PHILOX_AVX2)
        p = philox_avx2(first_pair, npairs, key, r0, r1, r2, need0, need1, need2);
#else
    (void)path;
#endif
    for (; p < npairs; p++) {
        uint32_t c0 = first_low + (uint32_t)p;
        uint32_t c1 = first_high + (uint32_t)(c0 < first_low), c2 = 0, c3 = 0;
        uint32_t k0 = key0, k1 = key1;
        for (int r = 0; r < 10; r++) {
            uint64_t product_b = (uint64_t)c2 * PHILOX_ROUND_B;
            uint64_t product_a = (uint64_t)c0 * PHILOX_ROUND_A;
            uint32_t n0 = (uint32_t)(product_b >> 32) ^ c1 ^ k0;
            uint32_t n2 = (uint32_t)(product_a >> 32) ^ c3 ^ k1;
            c1 = (uint32_t)product_b;
            c3 = (uint32_t)product_a;
            c0 = n0;
            c2 = n2;
            k0 += PHILOX_KEY_A;
            k1 += PHILOX_KEY_B;
        }
        if (need0) {
            r0[2 * p] = (uint16_t)c0;
            r0[2 * p + 1] = (uint16_t)(c0 >> 16);
        }
        if (need1) {
            r1[2 * p] = (uint16_t)c1;
            r1[2 * p + 1] = (uint16_t)(c1 >> 16);
        }
        if (need2) {
            r2[2 * p] = (uint16_t)c2;
            r2[2 * p + 1] = (uint16_t)(c2 >> 16);
        }
    }
}

/* Hint the cache lines of `bytes` bytes at `start` into the cache, for writing. */
static inline void prefetch_range(const void *start, int64_t bytes) {
    const char *p = (const char *)start;
    for (int64_t line = 0; line < bytes; line += 64) __builtin_prefetch(p + line, 1, 3);
}

/* One piece [begin, end) of one segment of the shard tensors (whose
 * pointers these are): the segment starts at element `base` of the tensors,
 * its first element is element `offset` of its parameter (the SR counter). */
typedef struct {
    void *param;
    const void *grad;
    void *exp_avg;
    void *exp_avg_sq;
    float *master;
    uint16_t *kahan;
    const float *coef; /* the ten of adamw_torch.adamw_coefficients */
    uint64_t key;
    uint64_t offset;
    int64_t base;
    int64_t begin, end; /* positions in the segment */
    int path;           /* Philox code path */
} adamw_args;

/* One block [begin, end) of the segment (end - begin <= BLOCK), specialized
 * by inlining on the write modes P (param), S (exp_avg and exp_avg_sq) and
 * HM (fp32 master). The gradient is bf16 exactly when the param is and
 * there is no master (the strategy table). */
static inline __attribute__((always_inline)) void adamw_block(const adamw_args *a, int64_t begin, int64_t end,
                                                             const int P, const int S, const int HM) {
    const int grad_bf16 = (P != EXACT) && !HM;
    const float lr = a->coef[0], beta1 = a->coef[1], one_minus_beta1 = a->coef[2];
    const float beta2 = a->coef[3], one_minus_beta2 = a->coef[4];
    const float inv_bc1 = a->coef[5], inv_bc2 = a->coef[6], eps = a->coef[7], decay = a->coef[8];
    const float grad_scale = a->coef[9];
    const int64_t n = end - begin, at = a->base + begin; /* at: the block's first element in the tensors */

    uint16_t draws[3][BLOCK + 2];
    const uint16_t *random_param = NULL, *random_exp_avg = NULL, *random_exp_avg_sq = NULL;
    if (P == STOCHASTIC || S == STOCHASTIC) {
        /* Start loading the block's tensors, which then arrive while Philox
         * computes (rather than after it). */
        const int64_t param_size = P == EXACT ? 4 : 2, state_size = S == EXACT ? 4 : 2;
        prefetch_range((const char *)a->grad + at * (grad_bf16 ? 2 : 4), n * (grad_bf16 ? 2 : 4));
        prefetch_range((const char *)a->exp_avg + at * state_size, n * state_size);
        prefetch_range((const char *)a->exp_avg_sq + at * state_size, n * state_size);
        prefetch_range((const char *)a->param + at * param_size, n * param_size);
        if (HM) prefetch_range(a->master + at, n * 4);
        if (P == KAHAN) prefetch_range(a->kahan + at, n * 2);
        uint64_t first = a->offset + (uint64_t)begin;
        uint64_t first_pair = first >> 1;
        int npairs = (int)(((first + (uint64_t)n - 1) >> 1) - first_pair + 1);
        philox_block(first_pair, npairs, a->key, draws[0], draws[1], draws[2],
                     P == STOCHASTIC, S == STOCHASTIC, S == STOCHASTIC, a->path);
        int shift = (int)(first & 1);
        random_param = draws[0] + shift;
        random_exp_avg = draws[1] + shift;
        random_exp_avg_sq = draws[2] + shift;
    }

    uint16_t *restrict param16 = (uint16_t *)a->param + at;
    float *restrict param32 = (float *)a->param + at;
    const uint16_t *restrict grad16 = (const uint16_t *)a->grad + at;
    const float *restrict grad32 = (const float *)a->grad + at;
    uint16_t *restrict m16 = (uint16_t *)a->exp_avg + at;
    float *restrict m32 = (float *)a->exp_avg + at;
    uint16_t *restrict v16 = (uint16_t *)a->exp_avg_sq + at;
    float *restrict v32 = (float *)a->exp_avg_sq + at;
    float *restrict master = HM ? a->master + at : NULL;
    uint16_t *restrict kahan = P == KAHAN ? a->kahan + at : NULL;

    for (int64_t i = 0; i < n; i++) {
        float g = (grad_bf16 ? bf16_value(grad16[i]) : grad32[i]) * grad_scale;
        float m = S == EXACT ? m32[i] : bf16_value(m16[i]);
        float v = S == EXACT ? v32[i] : bf16_value(v16[i]);
        float w = HM ? master[i] : (P == EXACT ? param32[i] : bf16_value(param16[i]));

        /* adamw_torch.adamw_values, op for op */
        m = m * beta1 + g * one_minus_beta1;
        v = v * beta2 + (g * g) * one_minus_beta2;
        float denom = sqrtf(v * inv_bc2) + eps;
        float update = (m * inv_bc1) / denom;
        w = w * decay - update * lr;

        if (S == EXACT) {
            m32[i] = m;
            v32[i] = v;
        } else if (S == NEAREST) {
            m16[i] = rtn_bf16(m);
            v16[i] = rtn_bf16(v);
        } else {
            m16[i] = sr_bf16(m, random_exp_avg[i]);
            v16[i] = sr_bf16(v, random_exp_avg_sq[i]);
        }
        if (HM) {
            master[i] = w;
            param16[i] = rtn_bf16(w);
        } else if (P == EXACT) {
            param32[i] = w;
        } else if (P == NEAREST) {
            param16[i] = rtn_bf16(w);
        } else if (P == STOCHASTIC) {
            param16[i] = sr_bf16(w, random_param[i]);
        } else { /* KAHAN */
            float target = w + bf16_value(kahan[i]);
            uint16_t new_param = rtn_bf16(target);
            param16[i] = new_param;
            kahan[i] = rtn_bf16(target - bf16_value(new_param));
        }
    }
}

#define ADAMW_RANGE(NAME, P, S, HM)                                                   \
    static void NAME(const adamw_args *a) {                                           \
        for (int64_t b = a->begin; b < a->end; b += BLOCK)                            \
            adamw_block(a, b, b + BLOCK < a->end ? b + BLOCK : a->end, P, S, HM);     \
    }

/* The combinations the strategy table produces (adamw_torch.write_modes):
 * fp32/amp; bf16-mixed; bf16, bf16-sr, bf16-kahan with bf16 or fp32 m, v. */
ADAMW_RANGE(range_fp32, EXACT, EXACT, 0)
ADAMW_RANGE(range_mixed, NEAREST, EXACT, 1)
ADAMW_RANGE(range_rtn, NEAREST, NEAREST, 0)
ADAMW_RANGE(range_rtn_fp32_state, NEAREST, EXACT, 0)
ADAMW_RANGE(range_sr, STOCHASTIC, STOCHASTIC, 0)
ADAMW_RANGE(range_sr_fp32_state, STOCHASTIC, EXACT, 0)
ADAMW_RANGE(range_kahan, KAHAN, STOCHASTIC, 0)
ADAMW_RANGE(range_kahan_fp32_state, KAHAN, EXACT, 0)

typedef void (*range_fn)(const adamw_args *);

static range_fn select_range(int param_write, int state_write, int has_master) {
    if (has_master) return param_write == NEAREST && state_write == EXACT ? range_mixed : NULL;
    switch (param_write * 4 + state_write) {
        case EXACT * 4 + EXACT: return range_fp32;
        case NEAREST * 4 + NEAREST: return range_rtn;
        case NEAREST * 4 + EXACT: return range_rtn_fp32_state;
        case STOCHASTIC * 4 + STOCHASTIC: return range_sr;
        case STOCHASTIC * 4 + EXACT: return range_sr_fp32_state;
        case KAHAN * 4 + STOCHASTIC: return range_kahan;
        case KAHAN * 4 + EXACT: return range_kahan_fp32_state;
        default: return NULL;
    }
}

/* 1 when the native kernel covers this combination of write modes. */
int megatron_sr_adamw_supported(int param_write, int state_write, int has_master) {
    return select_range(param_write, state_write, has_master) != NULL;
}

/* One call's shard: the tensors, the segment table and what every piece shares. */
typedef struct {
    void *param;
    const void *grad;
    void *exp_avg;
    void *exp_avg_sq;
    float *master;
    uint16_t *kahan;
    const float *coef_decay, *coef_no_decay;
    const int64_t *table; /* rows of 4: start, length, offset, weight decay (0/1) */
    const uint64_t *keys;
    int64_t segments;
    range_fn fn;
    int path;
} shard_args;

/* A thread's share: elements [first, last) of the concatenation of the segments. */
typedef struct {
    const shard_args *shard;
    int64_t first, last;
} shard_task;

static void *run_shard_task(void *task) {
    const shard_task *t = (const shard_task *)task;
    const shard_args *s = t->shard;
    int64_t done = 0; /* elements of the segments before segment k */
    for (int64_t k = 0; k < s->segments && done < t->last; k++) {
        const int64_t *row = s->table + 4 * k;
        int64_t begin = t->first > done ? t->first - done : 0;
        int64_t end = t->last - done < row[1] ? t->last - done : row[1];
        done += row[1];
        if (begin >= end) continue;
        adamw_args a = {s->param, s->grad, s->exp_avg, s->exp_avg_sq, s->master, s->kahan,
                        row[3] ? s->coef_decay : s->coef_no_decay, s->keys[k], (uint64_t)row[2], row[0],
                        begin, end, s->path};
        s->fn(&a);
    }
    return NULL;
}

static int thread_count(int64_t n, int threads) {
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    int64_t useful = n / MIN_ELEMENTS_PER_THREAD;
    if (useful < threads) threads = (int)useful;
    return threads < 1 ? 1 : threads;
}

/* Ranges of whole blocks for each of `count` threads: thread t gets
 * [bounds[t], bounds[t + 1]). */
static void split(int64_t n, int count, int64_t *bounds) {
    int64_t blocks = (n + BLOCK - 1) / BLOCK;
    for (int t = 0; t <= count; t++) {
        int64_t edge = blocks * t / count * BLOCK;
        bounds[t] = edge < n ? edge : n;
    }
}

/* The fused AdamW step on the `segments` segments of a bucket shard (see
 * adamw.adamw_shard_step): `table` holds a row of four int64 per segment
 * (start in the tensors, length, offset in its parameter, 1 when weight decay
 * applies), `keys` the segments' SR keys, `coef_decay` / `coef_no_decay` the
 * ten fp32 scalars of adamw_torch.adamw_coefficients with and without weight
 * decay. The segments' elements are split evenly over up to `threads`
 * threads (one pass over the shard, whatever the number of segments).
 * Returns 0, or -1 for an unsupported combination of write modes (nothing
 * written). */
int megatron_sr_adamw_shard_step(void *param, const void *grad, void *exp_avg, void *exp_avg_sq, float *master,
                                 uint16_t *kahan, const float *coef_decay, const float *coef_no_decay,
                                 const int64_t *table, const uint64_t *keys, int64_t segments, int param_write,
                                 int state_write, int has_master, int threads) {
    range_fn fn = select_range(param_write, state_write, has_master);
    if (fn == NULL) return -1;
    int64_t total = 0;
    for (int64_t k = 0; k < segments; k++) total += table[4 * k + 1];
    if (total <= 0) return 0;
    shard_args shard = {param, grad, exp_avg, exp_avg_sq, master, kahan, coef_decay, coef_no_decay,
                        table, keys, segments, fn, megatron_sr_philox_path()};
    shard_task tasks[MAX_THREADS];
    pthread_t handles[MAX_THREADS];
    int started[MAX_THREADS];
    int count = thread_count(total, threads);
    int64_t bounds[MAX_THREADS + 1];
    split(total, count, bounds);
    for (int t = 0; t < count; t++) {
        tasks[t].shard = &shard;
        tasks[t].first = bounds[t];
        tasks[t].last = bounds[t + 1];
    }
    for (int t = 1; t < count; t++)
        started[t] = pthread_create(&handles[t], NULL, run_shard_task, &tasks[t]) == 0;
    run_shard_task(&tasks[0]);
    for (int t = 1; t < count; t++) {
        if (started[t])
            pthread_join(handles[t], NULL);
        else
            run_shard_task(&tasks[t]); /* no thread: run it here */
    }
    return 0;
}

/* The fused AdamW step on one segment of `n` elements (a shard of one
 * segment; see adamw.adamw_step): `coef` are the ten fp32 scalars of
 * adamw_torch.adamw_coefficients. Returns 0, or -1 for an unsupported
 * combination of write modes (nothing written). */
int megatron_sr_adamw_step(void *param, const void *grad, void *exp_avg, void *exp_avg_sq, float *master,
                           uint16_t *kahan, const float *coef, uint64_t key, uint64_t offset, int64_t n,
                           int param_write, int state_write, int has_master, int threads) {
    const int64_t table[4] = {0, n > 0 ? n : 0, (int64_t)offset, 1};
    return megatron_sr_adamw_shard_step(param, grad, exp_avg, exp_avg_sq, master, kahan, coef, coef, table, &key,
                                        1, param_write, state_write, has_master, threads);
}

/* ---- SR cast (rounding.stochastic_round): fp32 -> bf16, stream 0, and the
 * SR add (grad_accumulation.stochastic_add_): acc <- SR(float(acc) + float(addend)),
 * bf16 += bf16, stream 0. `x` is NULL for the add, `acc` NULL for the cast. ---- */

typedef struct {
    const float *x;
    uint16_t *out;
    uint16_t *acc;
    const uint16_t *addend;
    uint64_t key, offset;
    int64_t begin, end;
    int path;
} cast_task;

static void *run_cast_task(void *task) {
    const cast_task *c = (const cast_task *)task;
    uint16_t draws[BLOCK + 2];
    for (int64_t b = c->begin; b < c->end; b += BLOCK) {
        int64_t n = b + BLOCK < c->end ? BLOCK : c->end - b;
        uint64_t first = c->offset + (uint64_t)b;
        uint64_t first_pair = first >> 1;
        int npairs = (int)(((first + (uint64_t)n - 1) >> 1) - first_pair + 1);
        philox_block(first_pair, npairs, c->key, draws, NULL, NULL, 1, 0, 0, c->path);
        const uint16_t *random16 = draws + (first & 1);
        if (c->acc != NULL) {
            uint16_t *restrict acc = c->acc + b;
            const uint16_t *restrict addend = c->addend + b;
            for (int64_t i = 0; i < n; i++) acc[i] = sr_bf16(bf16_value(acc[i]) + bf16_value(addend[i]), random16[i]);
        } else {
            const float *restrict x = c->x + b;
            uint16_t *restrict out = c->out + b;
            for (int64_t i = 0; i < n; i++) out[i] = sr_bf16(x[i], random16[i]);
        }
    }
    return NULL;
}

static void run_cast(const float *x, uint16_t *out, uint16_t *acc, const uint16_t *addend, uint64_t key,
                     uint64_t offset, int64_t n, int threads) {
    if (n <= 0) return;
    cast_task tasks[MAX_THREADS];
    pthread_t handles[MAX_THREADS];
    int started[MAX_THREADS];
    int count = thread_count(n, threads);
    int64_t bounds[MAX_THREADS + 1];
    split(n, count, bounds);
    for (int t = 0; t < count; t++) {
        tasks[t].x = x;
        tasks[t].out = out;
        tasks[t].acc = acc;
        tasks[t].addend = addend;
        tasks[t].key = key;
        tasks[t].offset = offset;
        tasks[t].begin = bounds[t];
        tasks[t].end = bounds[t + 1];
        tasks[t].path = megatron_sr_philox_path();
    }
    for (int t = 1; t < count; t++)
        started[t] = pthread_create(&handles[t], NULL, run_cast_task, &tasks[t]) == 0;
    run_cast_task(&tasks[0]);
    for (int t = 1; t < count; t++) {
        if (started[t])
            pthread_join(handles[t], NULL);
        else
            run_cast_task(&tasks[t]);
    }
}

void megatron_sr_sr_cast(const float *x, uint16_t *out, uint64_t key, uint64_t offset, int64_t n, int threads) {
    run_cast(x, out, NULL, NULL, key, offset, n, threads);
}

void megatron_sr_sr_add(uint16_t *acc, const uint16_t *addend, uint64_t key, uint64_t offset, int64_t n,
                        int threads) {
    run_cast(NULL, NULL, acc, addend, key, offset, n, threads);
}
