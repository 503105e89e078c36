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
 * Philox for the block's pairs into small arrays of 16-bit draws (AVX-512
 * intrinsics where the compiler targets AVX-512, else the scalar loop,
 * auto-vectorized), then the element loop (auto-vectorized). Large calls
 * run on up to `threads` pthreads, each on a contiguous range of blocks.
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

int megatron_sr_native_abi_version(void) { return 2; }

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

#if defined(__AVX512F__)
#include <immintrin.h>
#define PHILOX_VECTOR_PAIRS 32

/* High and low 32-bit halves of the products of the uint32 lanes of a with
 * the constant m (m64: m in each 64-bit lane, m32: in each 32-bit lane). */
static inline void mul_hi_lo(__m512i a, __m512i m64, __m512i m32, __m512i *hi, __m512i *lo) {
    __m512i even = _mm512_mul_epu32(a, m64);
    __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m64);
    *hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
    *lo = _mm512_mullo_epi32(a, m32);
}

/* Philox for 32 consecutive pairs starting at counter (low, high), in two
 * interleaved vectors of 16 lanes; gcc's auto-vectorization of the scalar
 * loop below extracts the products' halves less well (~1.7x slower). */
static inline void philox_vector(uint32_t low, uint32_t high, uint64_t key, uint16_t *r0, uint16_t *r1,
                                 uint16_t *r2, const int need0, const int need1, const int need2) {
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i a64 = _mm512_set1_epi64(PHILOX_ROUND_A), b64 = _mm512_set1_epi64(PHILOX_ROUND_B);
    const __m512i a32 = _mm512_set1_epi32((int)PHILOX_ROUND_A), b32 = _mm512_set1_epi32((int)PHILOX_ROUND_B);
    const __m512i first_low = _mm512_set1_epi32((int)low), first_high = _mm512_set1_epi32((int)high);
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
            mul_hi_lo(c2[u], b64, b32, &hi_b, &lo_b);
            mul_hi_lo(c0[u], a64, a32, &hi_a, &lo_a);
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
        if (need0) _mm512_storeu_si512((void *)(r0 + 32 * u), c0[u]);
        if (need1) _mm512_storeu_si512((void *)(r1 + 32 * u), c1[u]);
        if (need2) _mm512_storeu_si512((void *)(r2 + 32 * u), c2[u]);
    }
}
#endif

/* Philox4x32-10 of the counters first_pair .. first_pair + npairs - 1.
 * Words 0, 1, 2 of pair p go to r0, r1, r2 as 16-bit draws: the low half
 * at [2p] (even element), the high half at [2p + 1] (odd element). */
static inline void philox_block(uint64_t first_pair, int npairs, uint64_t key,
                                uint16_t *restrict r0, uint16_t *restrict r1, uint16_t *restrict r2,
                                const int need0, const int need1, const int need2) {
    const uint32_t key0 = (uint32_t)key, key1 = (uint32_t)(key >> 32);
    /* The 64-bit counter as two uint32 words, the carry into the high word
     * computed per lane: no 64-bit lanes in the loop. */
    const uint32_t first_low = (uint32_t)first_pair, first_high = (uint32_t)(first_pair >> 32);
    int p = 0;
#if defined(__AVX512F__)
    for (; p + PHILOX_VECTOR_PAIRS <= npairs; p += PHILOX_VECTOR_PAIRS) {
        uint64_t counter = first_pair + (uint64_t)p;
        philox_vector((uint32_t)counter, (uint32_t)(counter >> 32), key, r0 + 2 * p, r1 + 2 * p, r2 + 2 * p,
                      need0, need1, need2);
    }
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

typedef struct {
    void *param;
    const void *grad;
    void *exp_avg;
    void *exp_avg_sq;
    float *master;
    uint16_t *kahan;
    float coef[10];
    uint64_t key;
    uint64_t offset;
    int64_t begin, end; /* positions in the segment */
    int param_write, state_write, has_master;
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
    const int64_t n = end - begin;

    uint16_t draws[3][BLOCK + 2];
    const uint16_t *random_param = NULL, *random_exp_avg = NULL, *random_exp_avg_sq = NULL;
    if (P == STOCHASTIC || S == STOCHASTIC) {
        /* Start loading the block's tensors, which then arrive while Philox
         * computes (rather than after it). */
        const int64_t param_size = P == EXACT ? 4 : 2, state_size = S == EXACT ? 4 : 2;
        prefetch_range((const char *)a->grad + begin * (grad_bf16 ? 2 : 4), n * (grad_bf16 ? 2 : 4));
        prefetch_range((const char *)a->exp_avg + begin * state_size, n * state_size);
        prefetch_range((const char *)a->exp_avg_sq + begin * state_size, n * state_size);
        prefetch_range((const char *)a->param + begin * param_size, n * param_size);
        if (HM) prefetch_range(a->master + begin, n * 4);
        if (P == KAHAN) prefetch_range(a->kahan + begin, n * 2);
        uint64_t first = a->offset + (uint64_t)begin;
        uint64_t first_pair = first >> 1;
        int npairs = (int)(((first + (uint64_t)n - 1) >> 1) - first_pair + 1);
        philox_block(first_pair, npairs, a->key, draws[0], draws[1], draws[2],
                     P == STOCHASTIC, S == STOCHASTIC, S == STOCHASTIC);
        int shift = (int)(first & 1);
        random_param = draws[0] + shift;
        random_exp_avg = draws[1] + shift;
        random_exp_avg_sq = draws[2] + shift;
    }

    uint16_t *restrict param16 = (uint16_t *)a->param + begin;
    float *restrict param32 = (float *)a->param + begin;
    const uint16_t *restrict grad16 = (const uint16_t *)a->grad + begin;
    const float *restrict grad32 = (const float *)a->grad + begin;
    uint16_t *restrict m16 = (uint16_t *)a->exp_avg + begin;
    float *restrict m32 = (float *)a->exp_avg + begin;
    uint16_t *restrict v16 = (uint16_t *)a->exp_avg_sq + begin;
    float *restrict v32 = (float *)a->exp_avg_sq + begin;
    float *restrict master = HM ? a->master + begin : NULL;
    uint16_t *restrict kahan = P == KAHAN ? a->kahan + begin : NULL;

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

typedef struct {
    range_fn fn;
    adamw_args args;
} adamw_task;

static void *run_adamw_task(void *task) {
    adamw_task *t = (adamw_task *)task;
    t->fn(&t->args);
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

/* The fused AdamW step on `n` elements (see adamw.adamw_step); `coef` are the
 * ten fp32 scalars of adamw_torch.adamw_coefficients. Returns 0, or -1 for an
 * unsupported combination of write modes (nothing written). */
int megatron_sr_adamw_step(void *param, const void *grad, void *exp_avg, void *exp_avg_sq, float *master,
                           uint16_t *kahan, const float *coef, uint64_t key, uint64_t offset, int64_t n,
                           int param_write, int state_write, int has_master, int threads) {
    range_fn fn = select_range(param_write, state_write, has_master);
    if (fn == NULL) return -1;
    if (n <= 0) return 0;
    adamw_task tasks[MAX_THREADS];
    pthread_t handles[MAX_THREADS];
    int started[MAX_THREADS];
    int count = thread_count(n, threads);
    int64_t bounds[MAX_THREADS + 1];
    split(n, count, bounds);
    for (int t = 0; t < count; t++) {
        adamw_args *a = &tasks[t].args;
        tasks[t].fn = fn;
        a->param = param;
        a->grad = grad;
        a->exp_avg = exp_avg;
        a->exp_avg_sq = exp_avg_sq;
        a->master = master;
        a->kahan = kahan;
        memcpy(a->coef, coef, sizeof a->coef);
        a->key = key;
        a->offset = offset;
        a->begin = bounds[t];
        a->end = bounds[t + 1];
        a->param_write = param_write;
        a->state_write = state_write;
        a->has_master = has_master;
    }
    for (int t = 1; t < count; t++)
        started[t] = pthread_create(&handles[t], NULL, run_adamw_task, &tasks[t]) == 0;
    run_adamw_task(&tasks[0]);
    for (int t = 1; t < count; t++) {
        if (started[t])
            pthread_join(handles[t], NULL);
        else
            run_adamw_task(&tasks[t]); /* no thread: run it here */
    }
    return 0;
}

/* ---- SR cast (rounding.stochastic_round): fp32 -> bf16, stream 0 ---- */

typedef struct {
    const float *x;
    uint16_t *out;
    uint64_t key, offset;
    int64_t begin, end;
} cast_task;

static void *run_cast_task(void *task) {
    const cast_task *c = (const cast_task *)task;
    uint16_t draws[BLOCK + 2];
    for (int64_t b = c->begin; b < c->end; b += BLOCK) {
        int64_t n = b + BLOCK < c->end ? BLOCK : c->end - b;
        uint64_t first = c->offset + (uint64_t)b;
        uint64_t first_pair = first >> 1;
        int npairs = (int)(((first + (uint64_t)n - 1) >> 1) - first_pair + 1);
        philox_block(first_pair, npairs, c->key, draws, NULL, NULL, 1, 0, 0);
        const uint16_t *random16 = draws + (first & 1);
        const float *restrict x = c->x + b;
        uint16_t *restrict out = c->out + b;
        for (int64_t i = 0; i < n; i++) out[i] = sr_bf16(x[i], random16[i]);
    }
    return NULL;
}

void megatron_sr_sr_cast(const float *x, uint16_t *out, uint64_t key, uint64_t offset, int64_t n, int threads) {
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
        tasks[t].key = key;
        tasks[t].offset = offset;
        tasks[t].begin = bounds[t];
        tasks[t].end = bounds[t + 1];
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
