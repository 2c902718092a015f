/* CPU kernels for decode steps on x86 CPUs with AVX2 + FMA: skinny matmuls, norms, rotary,
 * attention over the paged cache, and a whole decode step over all layers. Where the compiler
 * targets AVX-512 (__AVX512F__: -march=native on such a CPU, unless LLMSCALE_CPU_ISA=avx2 adds
 * -mno-avx512f), the dense and panel matmuls take 16-lane versions, and with AVX-512 BF16 too
 * (__AVX512BF16__) bf16 weights in pair panels multiply bf16 activations two products a lane at
 * a time; everything else is AVX2.
 *
 * Skinny matmuls y[m, n] = x[m, k] @ W[n, k]^T. A decode step multiplies a handful of activation rows by every weight of the model, so its
 * speed is the speed of streaming the weights from memory. torch's kernels for these shapes
 * stop well short of that on AVX2-only CPUs (fp32 GEMV is single-threaded; the int8/int4
 * weight-only kernels are compute-bound from one row). These kernels read each weight once per
 * call, for up to MAX_ROWS activation rows at a time, split by output rows over OpenMP threads.
 *
 * Quantized weights use integer dot products, as llama.cpp does: each activation row is
 * quantized to int8 per block of 32 (absmax scale), then 32 weights x 32 activations become
 * one maddubs + madd. Weight formats are llmscale's (see llmscale/model/quant.py):
 *   int8: q int8 [n, k], w = q * scale[row].
 *   int4: q uint8 [n, k/2], element 2j in the low nibble of byte j, w = (q - 8) * s + z
 *         per group.
 * Activations in each 32-block are stored even elements first, then odd ones, so the low and
 * high nibbles of 16 weight bytes line up with them without shuffles.
 */
#define _GNU_SOURCE /* sched_setaffinity */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAX_ROWS 8
#define QBLOCK 32
#define ROW_TILE 64 /* output rows per tile: their weights stay in L2 across row chunks */
/* Row-wise kernels (norms, rotary, SwiGLU) split rows over the threads from this many rows
 * (prefill chunks); a decode batch's rows take less than waking the team. */
#define ROWWISE_PARALLEL_MIN 128

static inline float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline __m256 load_bf16(const uint16_t *p) {
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}

/* 8 floats rounded to bf16, to nearest with ties to even as torch rounds (finite values). */
static inline void store_bf16(uint16_t *p, __m256 v) {
    __m256i b = _mm256_castps_si256(v);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    b = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
    _mm_storeu_si128((__m128i *)p, _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1)));
}

/* Element i of an fp32 array, or (bf) of a bf16 one widened. */
static inline float element(const void *p, int bf, int64_t i) {
    if (!bf) return ((const float *)p)[i];
    const uint32_t bits = (uint32_t)((const uint16_t *)p)[i] << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* The output rows [n0, n1) that thread t of nt owns, in whole tiles. */
static void thread_rows(int64_t n, int t, int nt, int64_t *n0, int64_t *n1) {
    int64_t tiles = (n + ROW_TILE - 1) / ROW_TILE;
    int64_t per = tiles / nt, extra = tiles % nt;
    int64_t first = t * per + (t < extra ? t : extra);
    int64_t count = per + (t < extra);
    *n0 = first * ROW_TILE < n ? first * ROW_TILE : n;
    *n1 = (first + count) * ROW_TILE < n ? (first + count) * ROW_TILE : n;
}

/* Pins the calling thread's OpenMP team, thread i to cores[i]: the team torch's ops and these
 * kernels run on when called from this thread. Returns how many threads were pinned. */
int bind_threads(const int64_t *cores, int n) {
    int pinned = 0;
#pragma omp parallel num_threads(n) reduction(+ : pinned)
    {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET((int)cores[omp_get_thread_num()], &set);
        pinned += sched_setaffinity(0, sizeof set, &set) == 0;
    }
    return pinned;
}

/* ---------------------------------------------------------------- dense fp32 / bf16 weights */

/* The vector width the library was compiled for: 512 (AVX-512 matmuls) or 256. */
int vector_bits(void) {
#if defined(__AVX512F__)
    return 512;
#else
    return 256;
#endif
}

#if defined(__AVX512F__)
static inline __m512 load_bf16x16(const uint16_t *p) {
    __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}

/* 8 weights into the low lanes, the high ones zero (the k % 16 == 8 tail). */
static inline __m512 load_f32x8z(const float *p) { return _mm512_maskz_loadu_ps(0xFF, p); }
static inline __m512 load_bf16x8z(const uint16_t *p) {
    return _mm512_zextps256_ps512(load_bf16(p));
}

/* 16 lanes, two accumulators per row (k in steps of 32): one row is not bound by the FMA's
 * latency, and each row's sums are the same whatever M. */
#define DENSE_ROWS(NAME, WTYPE, LOADW16, LOADW8)                                                \
    static inline __attribute__((always_inline)) void NAME(                                     \
        const float *x, int64_t k, const WTYPE *w, int64_t n0, int64_t n1, float *y,           \
        int64_t ldy, const int M) {                                                             \
        for (int64_t n = n0; n < n1; n++) {                                                     \
            const WTYPE *wr = w + n * k;                                                        \
            __m512 acc[MAX_ROWS], acc1[MAX_ROWS];                                               \
            for (int i = 0; i < M; i++) acc[i] = acc1[i] = _mm512_setzero_ps();                 \
            int64_t j = 0;                                                                      \
            for (; j + 32 <= k; j += 32) {                                                      \
                __m512 w0 = LOADW16(wr + j), w1 = LOADW16(wr + j + 16);                         \
                for (int i = 0; i < M; i++) {                                                   \
                    acc[i] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + i * k + j), acc[i]);       \
                    acc1[i] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + i * k + j + 16), acc1[i]); \
                }                                                                               \
            }                                                                                   \
            if (j + 16 <= k) {                                                                  \
                __m512 w0 = LOADW16(wr + j);                                                    \
                for (int i = 0; i < M; i++)                                                     \
                    acc[i] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + i * k + j), acc[i]);       \
                j += 16;                                                                        \
            }                                                                                   \
            if (j < k) {                                                                        \
                __m512 w1 = LOADW8(wr + j);                                                     \
                for (int i = 0; i < M; i++)                                                     \
                    acc1[i] = _mm512_fmadd_ps(w1, load_f32x8z(x + i * k + j), acc1[i]);         \
            }                                                                                   \
            for (int i = 0; i < M; i++)                                                         \
                y[i * ldy + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc[i], acc1[i]));          \
        }                                                                                       \
    }

DENSE_ROWS(rows_f32, float, _mm512_loadu_ps, load_f32x8z)
DENSE_ROWS(rows_bf16, uint16_t, load_bf16x16, load_bf16x8z)
#else
#define DENSE_ROWS(NAME, WTYPE, LOADW)                                                          \
    static inline __attribute__((always_inline)) void NAME(                                     \
        const float *x, int64_t k, const WTYPE *w, int64_t n0, int64_t n1, float *y,           \
        int64_t ldy, const int M) {                                                             \
        for (int64_t n = n0; n < n1; n++) {                                                     \
            const WTYPE *wr = w + n * k;                                                        \
            __m256 acc[MAX_ROWS];                                                               \
            for (int i = 0; i < M; i++) acc[i] = _mm256_setzero_ps();                           \
            for (int64_t j = 0; j < k; j += 8) {                                                \
                __m256 wv = LOADW(wr + j);                                                      \
                for (int i = 0; i < M; i++)                                                     \
                    acc[i] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + i * k + j), acc[i]);       \
            }                                                                                   \
            for (int i = 0; i < M; i++) y[i * ldy + n] = hsum_ps(acc[i]);                      \
        }                                                                                       \
    }

DENSE_ROWS(rows_f32, float, _mm256_loadu_ps)
DENSE_ROWS(rows_bf16, uint16_t, load_bf16)
#endif

#define DISPATCH_ROWS(FN, M, ...)                                                               \
    switch (M) {                                                                                \
        case 1: FN(__VA_ARGS__, 1); break;                                                      \
        case 2: FN(__VA_ARGS__, 2); break;                                                      \
        case 3: FN(__VA_ARGS__, 3); break;                                                      \
        case 4: FN(__VA_ARGS__, 4); break;                                                      \
        case 5: FN(__VA_ARGS__, 5); break;                                                      \
        case 6: FN(__VA_ARGS__, 6); break;                                                      \
        case 7: FN(__VA_ARGS__, 7); break;                                                      \
        default: FN(__VA_ARGS__, 8); break;                                                     \
    }

/* Runs BODY for each tile [t, t1) of this thread's output rows and each chunk of at most
 * MAX_ROWS activation rows starting at r (`rows` of them): the weights of a tile stay in L2
 * while every chunk passes over them. Expects `nthreads` in scope. */
#define PARALLEL_ROW_TILES(n, m, BODY)                                                          \
    _Pragma("omp parallel num_threads(nthreads)") {                                             \
        int64_t n0_, n1_;                                                                       \
        thread_rows(n, omp_get_thread_num(), omp_get_num_threads(), &n0_, &n1_);                \
        for (int64_t t = n0_; t < n1_; t += ROW_TILE) {                                         \
            int64_t t1 = t + ROW_TILE < n1_ ? t + ROW_TILE : n1_;                               \
            for (int64_t r = 0; r < m; r += MAX_ROWS) {                                         \
                int rows = m - r < MAX_ROWS ? (int)(m - r) : MAX_ROWS;                          \
                BODY                                                                            \
            }                                                                                   \
        }                                                                                       \
    }

/* k % 8 == 0. */
void matmul_f32(const float *x, int64_t m, int64_t k, const float *w, int64_t n, float *y,
                int nthreads) {
    PARALLEL_ROW_TILES(n, m, DISPATCH_ROWS(rows_f32, rows, x + r * k, k, w, t, t1, y + r * n, n))
}

void matmul_bf16(const float *x, int64_t m, int64_t k, const uint16_t *w, int64_t n, float *y,
                 int nthreads) {
    PARALLEL_ROW_TILES(n, m, DISPATCH_ROWS(rows_bf16, rows, x + r * k, k, w, t, t1, y + r * n, n))
}

/* e^x for 8 lanes, x clamped to [-87, 88]: 2^n * p(r) with a degree-6 polynomial, ~1e-7
 * relative error. */
static inline __m256 exp_ps(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.f)), _mm256_set1_ps(88.f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-06f), r);
    __m256 p = _mm256_set1_ps(1.3981999507e-3f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* ---------------------------------------------------------------- fp32 weights in panels */

/* The micro-kernel of a BLAS GEMM, for every row count: the weights are packed in panels of
 * PANEL output rows, wp [ceil(n / PANEL)][k][PANEL] with the last panel zero-padded, so one
 * step along k loads PANEL weights in two vectors and multiplies them by one broadcast
 * activation of each of up to PANEL_ROWS rows: 12 independent accumulators, 8 loads per 12
 * FMAs. The row-major kernel above needs a horizontal sum per output and re-reads activations
 * once per weight row; on a 2-core AVX2 CPU, all decoder linears of SmolLM2-135M run at
 * ~100 GFLOP/s at 48 rows against its ~72, and at ~130 at 2,048 rows, level with oneDNN on
 * its own blocked copy. */
#define PANEL 16
#define PANEL_GROUP 4 /* panels per pass over the activation rows: they stay in L2 meanwhile */
/* Activation rows per such pass: past a few hundred, re-reading all of them for every group of
 * panels comes from memory (a 2,048-row prefill chunk: 106-126 GFLOP/s in one pass, ~130-137
 * in passes of 384 rows). */
#define PANEL_BLOCK_ROWS 384

/* Accumulators are named variables, not an array: GCC keeps an array of vectors in memory
 * for some row counts, a store per FMA. Rows past M drop out at compile time. */
#define PANEL_ROW(i, ...)                                                                         \
    if (M > i) {                                                                                \
        __VA_ARGS__                                                                             \
    }
/* AVX2: a tile of 6 rows keeps two vectors per row, 12 accumulators. */
#define PANEL_ROWS 6
#define PANEL_ROWS_DO_N(OP) OP(0) OP(1) OP(2) OP(3) OP(4) OP(5)
#define PANEL_DECLARE_N __m256 a00, a01, a10, a11, a20, a21, a30, a31, a40, a41, a50, a51
#define PANEL_ZERO_N(i) PANEL_ROW(i, a##i##0 = a##i##1 = _mm256_setzero_ps();)
#define PANEL_LOAD_N(i)                                                                         \
    PANEL_ROW(i, a##i##0 = _mm256_loadu_ps(part + i * PANEL); a##i##1 = _mm256_loadu_ps(part + i * PANEL + 8);)
#define PANEL_FMA_N(i)                                                                          \
    PANEL_ROW(i, __m256 xb = _mm256_broadcast_ss(x + i * ldx + j);                               \
              a##i##0 = _mm256_fmadd_ps(xb, w0, a##i##0); a##i##1 = _mm256_fmadd_ps(xb, w1, a##i##1);)
/* Eight weights at element `at` of the panel: fp32, or bf16 (BF) widened as they load. */
#define PANEL_W_N(at) (BF ? load_bf16((const uint16_t *)wp + (at)) : _mm256_loadu_ps((const float *)wp + (at)))
#define PANEL_K_STEP_N                                                                          \
    {                                                                                           \
        __m256 w0 = PANEL_W_N(j * PANEL), w1 = PANEL_W_N(j * PANEL + 8);                        \
        PANEL_ROWS_DO_N(PANEL_FMA_N)                                                            \
    }
#define PANEL_STORE_N(i)                                                                        \
    PANEL_ROW(i, _mm256_storeu_ps(y + i * ldy, a##i##0); _mm256_storeu_ps(y + i * ldy + 8, a##i##1);)

/* What a panel holds, fixed at compile time in each tile: fp32 weights, bf16 weights widened
 * as they load, or (PANEL_DOT_BF16, AVX-512 BF16 only) bf16 weights in pairs along k, multiplied
 * with activations rounded to bf16 pairs by dot-product instructions: `pack_pair_panels`. */
#define PANEL_F32 0
#define PANEL_BF16 1
#define PANEL_DOT_BF16 2

#if defined(__AVX512F__)
#define PANEL_PAIRS 1 /* the AVX-512 tile below: two panels at a time */
#else
#define PANEL_PAIRS 0
#define PANEL_PAIR_ROWS PANEL_ROWS
#endif

/* silu(gate) * up for 8 lanes: `silu_and_mul` and the GEMM that fuses it (below) share it, so
 * both give bit-identical activations. */
static inline __attribute__((always_inline)) __m256 swiglu8(__m256 gate, __m256 up) {
    const __m256 silu = _mm256_div_ps(gate, _mm256_add_ps(_mm256_set1_ps(1.f),
                                                          exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), gate))));
    return _mm256_mul_ps(silu, up);
}

/* rows x [8 gate, 8 up] products (PANEL floats apart) -> y: 8 activations per row. Not inlined
 * into the micro-kernel: there, the exp's registers made GCC spill accumulators inside the k
 * loop (the whole gate-up GEMM 2x slower). */
static __attribute__((noinline)) void swiglu_store(const float *acc, int rows, float *y, int64_t ldy) {
    for (int i = 0; i < rows; i++)
        _mm256_storeu_ps(y + i * ldy, swiglu8(_mm256_loadu_ps(acc + i * PANEL), _mm256_loadu_ps(acc + i * PANEL + 8)));
}

/* SWIGLU: the panel holds 8 gate then 8 up outputs (`pack_swiglu_panels`); each row stores the 8
 * values silu(gate) * up instead of 16. V: N (AVX2 tile) or W (AVX-512 tile). */
#define PANEL_TILE(NAME, V, ROWS)                                                               \
    static inline __attribute__((always_inline)) void NAME(                                     \
        const float *x, int64_t ldx, int64_t k, const void *wp, float *y, int64_t ldy, const int M, \
        const int SWIGLU, const float *part, const int BF) {                                    \
        PANEL_DECLARE_##V;                                                                      \
        if (part) { /* sums so far, PANEL floats per row */                                     \
            PANEL_ROWS_DO_##V(PANEL_LOAD_##V)                                                   \
        } else {                                                                                \
            PANEL_ROWS_DO_##V(PANEL_ZERO_##V)                                                   \
        }                                                                                       \
        /* Unrolled, the loop's own instructions stop sharing the cycles of its FMAs: 3-5%      \
         * faster from 1 to 2,048 rows (AVX2, all decoder linears, alternated in one process). */ \
        _Pragma("GCC unroll 4") for (int64_t j = 0; j < k; j++) PANEL_K_STEP_##V                \
        if (SWIGLU) {                                                                           \
            float acc[ROWS * PANEL], *out = y;                                                  \
            const int64_t ld = ldy;                                                             \
            y = acc, ldy = PANEL;                                                               \
            PANEL_ROWS_DO_##V(PANEL_STORE_##V)                                                  \
            swiglu_store(acc, M, out, ld);                                                      \
        } else {                                                                                \
            PANEL_ROWS_DO_##V(PANEL_STORE_##V)                                                  \
        }                                                                                       \
    }

PANEL_TILE(panel_tile, N, PANEL_ROWS)
#if PANEL_PAIRS
/* AVX-512: a panel's 16 weights are one vector, and a tile multiplies two neighbouring panels
 * at once: 8 rows keep 16 accumulators (2 per row), 2 weight loads and 8 broadcasts per 16
 * FMAs, and even a few rows keep enough FMAs in flight. A tile of 12 rows on one panel (12
 * accumulators) measured 1.1-1.6x its time from 4 to 2,048 rows (BENCHMARKS.md). Each output
 * is the same chain of FMAs along k as in the AVX2 tile: bit for bit its results, which take
 * a last unpaired panel. Outputs of panel q (0, 1) go to yq (ldq floats apart), sums start
 * from inq unless it is NULL. */
#define PANEL_PAIR_ROWS 8
#define PANEL_ROWS_DO_P(OP) OP(0) OP(1) OP(2) OP(3) OP(4) OP(5) OP(6) OP(7)
#define PANEL_DECLARE_P                                                                         \
    __m512 a00, a01, a10, a11, a20, a21, a30, a31, a40, a41, a50, a51, a60, a61, a70, a71
#define PANEL_ZERO_P(i) PANEL_ROW(i, a##i##0 = a##i##1 = _mm512_setzero_ps();)
#define PANEL_LOAD_P(i)                                                                         \
    PANEL_ROW(i, a##i##0 = _mm512_loadu_ps(in0 + i * PANEL); a##i##1 = _mm512_loadu_ps(in1 + i * PANEL);)
#define PANEL_FMA_P(i)                                                                          \
    PANEL_ROW(i, const __m512 xb = _mm512_set1_ps(x[i * ldx + j]);                               \
              a##i##0 = pair_fma(a##i##0, xb, w0, BF); a##i##1 = pair_fma(a##i##1, xb, w1, BF);)
#define PANEL_STORE_P(i)                                                                        \
    PANEL_ROW(i, _mm512_storeu_ps(y0 + i * ld0, a##i##0); _mm512_storeu_ps(y1 + i * ld1, a##i##1);)
#define PANEL_W_P(w, at)                                                                        \
    (BF == PANEL_BF16 ? load_bf16x16((const uint16_t *)(w) + (at)) : _mm512_loadu_ps((const float *)(w) + (at)))

/* acc + x * w for 16 lanes; with PANEL_DOT_BF16, x holds two bf16 activations and each lane of w
 * the two matching bf16 weights, and the pair's two products are added (VDPBF16PS). */
static inline __attribute__((always_inline)) __m512 pair_fma(__m512 acc, __m512 x, __m512 w, const int BF) {
#if defined(__AVX512BF16__)
    if (BF == PANEL_DOT_BF16)
        return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_castps_si512(x), (__m512bh)_mm512_castps_si512(w));
#endif
    return _mm512_fmadd_ps(x, w, acc);
}

static inline __attribute__((always_inline)) void panel_pair_tile(
    const float *x, int64_t ldx, int64_t k, const void *wp0, const void *wp1, float *y0, int64_t ld0,
    float *y1, int64_t ld1, const int M, const int SWIGLU, const float *in0, const float *in1, const int BF) {
    PANEL_DECLARE_P;
    if (in0) {
        PANEL_ROWS_DO_P(PANEL_LOAD_P)
    } else {
        PANEL_ROWS_DO_P(PANEL_ZERO_P)
    }
    _Pragma("GCC unroll 4") for (int64_t j = 0; j < k; j++) {
        const __m512 w0 = PANEL_W_P(wp0, j * PANEL), w1 = PANEL_W_P(wp1, j * PANEL);
        PANEL_ROWS_DO_P(PANEL_FMA_P)
    }
    if (SWIGLU) {
        float acc0[PANEL_PAIR_ROWS * PANEL], acc1[PANEL_PAIR_ROWS * PANEL], *out0 = y0, *out1 = y1;
        const int64_t l0 = ld0, l1 = ld1;
        y0 = acc0, y1 = acc1, ld0 = ld1 = PANEL;
        PANEL_ROWS_DO_P(PANEL_STORE_P)
        swiglu_store(acc0, M, out0, l0);
        swiglu_store(acc1, M, out1, l1);
    } else {
        PANEL_ROWS_DO_P(PANEL_STORE_P)
    }
}

#define PANEL_PAIR_CASE(R)                                                                      \
    case R: panel_pair_tile(x, ldx, k, wp0, wp1, y0, ld0, y1, ld1, R, SWIGLU, in0, in1, BF); break;

static inline __attribute__((always_inline)) void panel_pair_rows(
    const float *x, int64_t ldx, int rows, int64_t k, const void *wp0, const void *wp1, float *y0,
    int64_t ld0, float *y1, int64_t ld1, const int SWIGLU, const float *in0, const float *in1, const int BF) {
    switch (rows) {
        PANEL_PAIR_CASE(1) PANEL_PAIR_CASE(2) PANEL_PAIR_CASE(3) PANEL_PAIR_CASE(4)
        PANEL_PAIR_CASE(5) PANEL_PAIR_CASE(6) PANEL_PAIR_CASE(7)
        default: panel_pair_tile(x, ldx, k, wp0, wp1, y0, ld0, y1, ld1, PANEL_PAIR_ROWS, SWIGLU, in0, in1, BF);
    }
}

/* `panel_step` for panels p and p + 1, both whole (no padded columns); parts: PANEL floats per
 * row for each. */
static inline __attribute__((always_inline)) void panel_pair_step(
    const float *x, int64_t k, int rows, int64_t kb, int64_t kc, const void *panel, int64_t panel_bytes,
    float *part0, float *part1, float *yr, int64_t ldy, int64_t p, int swiglu, const int BF) {
    const float *in0 = kb ? part0 : NULL, *in1 = kb ? part1 : NULL;
    const char *w0 = (const char *)panel + kb * PANEL * (BF == PANEL_BF16 ? 2 : 4), *w1 = w0 + panel_bytes;
    if (kb + kc < k)
        panel_pair_rows(x + kb, k, rows, kc, w0, w1, part0, PANEL, part1, PANEL, 0, in0, in1, BF);
    else if (swiglu)
        panel_pair_rows(x + kb, k, rows, kc, w0, w1, yr + p * PANEL / 2, ldy, yr + (p + 1) * PANEL / 2, ldy, 1,
                        in0, in1, BF);
    else
        panel_pair_rows(x + kb, k, rows, kc, w0, w1, yr + p * PANEL, ldy, yr + (p + 1) * PANEL, ldy, 0, in0,
                        in1, BF);
}

/* `panel_pair_step` for the panels' kind `bf`, chosen once per (tile, pair), not per weight load. */
static inline __attribute__((always_inline)) void panel_pair_kind(
    int bf, const float *x, int64_t k, int rows, int64_t kb, int64_t kc, const void *panel, int64_t panel_bytes,
    float *part0, float *part1, float *yr, int64_t ldy, int64_t p, int swiglu) {
    if (bf == PANEL_DOT_BF16)
        panel_pair_step(x, k, rows, kb, kc, panel, panel_bytes, part0, part1, yr, ldy, p, swiglu, PANEL_DOT_BF16);
    else if (bf == PANEL_BF16)
        panel_pair_step(x, k, rows, kb, kc, panel, panel_bytes, part0, part1, yr, ldy, p, swiglu, PANEL_BF16);
    else
        panel_pair_step(x, k, rows, kb, kc, panel, panel_bytes, part0, part1, yr, ldy, p, swiglu, PANEL_F32);
}
#endif

#define PANEL_CASE(F, R) case R: F(x, ldx, k, wp, y, ldy, R, SWIGLU, part, BF); break;

/* Up to PANEL_ROWS rows of x (ldx floats apart) times the first k rows of one panel, the sums
 * started from `part` unless it is NULL. */
static inline __attribute__((always_inline)) void panel_rows(const float *x, int64_t ldx, int rows,
                                                              int64_t k, const void *wp, float *y,
                                                              int64_t ldy, const int SWIGLU,
                                                              const float *part, const int BF) {
    switch (rows) {
        PANEL_CASE(panel_tile, 1) PANEL_CASE(panel_tile, 2) PANEL_CASE(panel_tile, 3)
        PANEL_CASE(panel_tile, 4) PANEL_CASE(panel_tile, 5)
        default: panel_tile(x, ldx, k, wp, y, ldy, PANEL_ROWS, SWIGLU, part, BF); break;
    }
}

/* One row tile (x: its first row, k floats apart) times panel p over k [kb, kb + kc). The sums
 * start from `part` when kb > 0, and end in `part` (PANEL floats per row) while blocks remain,
 * else in yr (the tile's first output row, ldy floats apart): 16 outputs, 8 SwiGLU activations,
 * or the kept columns of a zero-padded last panel. */
static inline __attribute__((always_inline)) void panel_step(const float *x, int64_t k, int rows,
                                                              int64_t kb, int64_t kc, const void *panel,
                                                              float *part, float *yr, int64_t ldy,
                                                              int64_t n, int64_t p, int swiglu, const int BF) {
    const int64_t cols = n - p * PANEL < PANEL ? n - p * PANEL : PANEL;
    const float *in = kb ? part : NULL;
    const void *w = (const char *)panel + kb * PANEL * (BF ? 2 : 4);
    if (kb + kc < k || cols < PANEL) {
        panel_rows(x + kb, k, rows, kc, w, part, PANEL, 0, in, BF);
        if (kb + kc == k)
            for (int i = 0; i < rows; i++)
                for (int64_t c = 0; c < cols; c++) yr[i * ldy + p * PANEL + c] = part[i * PANEL + c];
    } else if (swiglu) {
        panel_rows(x + kb, k, rows, kc, w, yr + p * PANEL / 2, ldy, 1, in, BF);
    } else {
        panel_rows(x + kb, k, rows, kc, w, yr + p * PANEL, ldy, 0, in, BF);
    }
}

static inline void prefetch_lines(const char **pf, const char *end, int64_t count) {
    for (int64_t l = 0; l < count && *pf < end; l++, *pf += 64) _mm_prefetch(*pf, _MM_HINT_T1);
}

/* Up to this many rows (decode batches) the first row tile of each group of panels would wait on
 * memory for the group's weights, and the others find them in L2. Instead, the next group's
 * lines are prefetched into L2 a few at a time before each (tile, panel) product, so the weights
 * stream while the FMAs run; groups are smaller so that two fit in L2 beside the activations.
 * All decoder linears at 32 and 64 rows: 3-7% faster (medians, alternated); level at 8. */
#define PANEL_PREFETCH_MAX_ROWS 64
#define PANEL_GROUP_PREFETCHED 2
/* From this many rows up to PANEL_PREFETCH_MAX_ROWS, a panel is multiplied in blocks of
 * PANEL_KC steps along k, each block by every row tile in turn: its 8 KB stay in L1 while the
 * tiles' activations come from L2, where whole panels (37-98 KB) came from L2 for every tile.
 * Partial sums wait in fp32 and resume in the same order: bit-identical results. All decoder
 * linears (30 layers' weights, alternated): 16-64 rows 5-25% faster; a single row a little
 * slower (memory-bound: kept whole); 2,048 rows slower in k-blocks of 128-384 (kept whole). */
#define PANEL_KC 128
#define PANEL_KBLOCK_MIN_ROWS 4

/* x [m, k] times the packed weight of n outputs -> y [m, n]; with `swiglu` (the weight packed by
 * `pack_swiglu_panels`, n % 16 == 0) -> y [m, n / 2] = silu(gate) * up, the gate-up product
 * never stored. */
/* One panel for `rows` rows in single-panel tiles (a pair's row tile is taller), its weights'
 * type fixed at compile time: chosen once per (tile, panel), not per weight load. */
static inline __attribute__((always_inline)) void panel_single(int bf, const float *x, int64_t k, int rows,
                                                                int64_t kb, int64_t kc, const void *panel,
                                                                float *part, float *yr, int64_t ldy, int64_t n,
                                                                int64_t p, int swiglu) {
    for (int s = 0; s < rows; s += PANEL_ROWS) {
        const int r = rows - s < PANEL_ROWS ? rows - s : PANEL_ROWS;
        if (bf == PANEL_BF16)
            panel_step(x + s * k, k, r, kb, kc, panel, part + s * PANEL, yr + s * ldy, ldy, n, p, swiglu, PANEL_BF16);
        else
            panel_step(x + s * k, k, r, kb, kc, panel, part + s * PANEL, yr + s * ldy, ldy, n, p, swiglu, PANEL_F32);
    }
}

#if PANEL_PAIRS && defined(__AVX512BF16__)
/* rows x cols fp32 (lds floats apart) -> bf16 (ldd apart), rounded to nearest even; cols % 8 == 0.
 * In place too (dst at src): each vector is loaded before its half-width result is stored, which
 * never reaches values not yet loaded. */
static void store_rows_bf16(const float *src, int64_t lds, int64_t rows, int64_t cols, uint16_t *dst,
                            int64_t ldd) {
    for (int64_t i = 0; i < rows; i++) {
        const float *s = src + i * lds;
        uint16_t *d = dst + i * ldd;
        int64_t c = 0;
        for (; c + 16 <= cols; c += 16)
            _mm256_storeu_si256((__m256i *)(d + c), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(s + c)));
        if (c < cols)
            _mm_storeu_si128((__m128i *)(d + c), (__m128i)_mm256_cvtneps_pbh(_mm256_loadu_ps(s + c)));
    }
}
#endif

/* A block's rows in as few tiles of at most `tile` rows as hold them, sizes within one of each
 * other: 33 rows are 7, 7, 7, 6, 6, not 8, 8, 8, 8, 1. A tile of few rows keeps too few sums in
 * flight to cover the dot products' latency, and costs nearly a full tile; how rows are grouped
 * never changes a row's sums. */
typedef struct {
    int64_t count, base, extra; /* tiles; rows per tile; tiles with one more */
} RowTiles;
static inline RowTiles row_tiles(int64_t rows, int64_t tile) {
    const int64_t count = (rows + tile - 1) / tile;
    return (RowTiles){count, rows / count, rows % count};
}
static inline int64_t tile_start(RowTiles t, int64_t j) { return j * t.base + (j < t.extra ? j : t.extra); }
static inline int tile_size(RowTiles t, int64_t j) { return (int)(t.base + (j < t.extra)); }

/* bf: the panels' kind (PANEL_F32, PANEL_BF16, PANEL_DOT_BF16). PANEL_DOT_BF16 runs only in
 * pairs: n % 32 == 0, x and k count bf16 pairs, and each thread takes whole pairs. y is fp32,
 * or with `ybf16` (PANEL_DOT_BF16 only) bf16: each group's sums for a block of rows wait in an
 * fp32 scratch that stays in L2 and are rounded into y as the group ends, so no fp32 copy of
 * the whole product is written and read back. */
static void matmul_panels(const float *x, int64_t m, int64_t k, const void *wp, int64_t n, void *y,
                          int swiglu, int bf, int ybf16, int nthreads) {
    const int64_t es = bf == PANEL_BF16 ? 2 : 4, panel_bytes = k * PANEL * es; /* a step's bytes, a panel's */
    const int64_t ldy = swiglu ? n / 2 : n, per_panel = swiglu ? PANEL / 2 : PANEL;
    const int64_t panels = (n + PANEL - 1) / PANEL;
    const int prefetch = m <= PANEL_PREFETCH_MAX_ROWS;
    const int64_t group = prefetch ? PANEL_GROUP_PREFETCHED : PANEL_GROUP;
    const int64_t kc = prefetch && m >= PANEL_KBLOCK_MIN_ROWS && k > PANEL_KC ? PANEL_KC : k;
    const int64_t kblocks = (k + kc - 1) / kc;
    const int pair = PANEL_PAIRS;
    const int64_t tile = pair ? PANEL_PAIR_ROWS : PANEL_ROWS;
#pragma omp parallel num_threads(nthreads)
    {
        const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
        const int64_t unit = bf == PANEL_DOT_BF16 ? 2 : 1; /* panels a thread takes together */
        const int64_t first = unit * (panels / unit * t / nt), p1 = unit * (panels / unit * (t + 1) / nt);
        float part[PANEL_BLOCK_ROWS * PANEL];
#if PANEL_PAIRS
        float part1[PANEL_PREFETCH_MAX_ROWS * PANEL]; /* a pair's second panel's (k-blocks: m <= 64) */
#endif
        /* Where the sums of row i0 + r and panel base + p go: y itself, or the group's scratch. */
        const int64_t ldo = ybf16 ? group * per_panel : ldy;
        float *scratch = ybf16 ? malloc(PANEL_BLOCK_ROWS * ldo * sizeof(float)) : NULL;
        for (int64_t i0 = 0; i0 < m; i0 += PANEL_BLOCK_ROWS) {
            const int64_t i1 = i0 + PANEL_BLOCK_ROWS < m ? i0 + PANEL_BLOCK_ROWS : m;
            const RowTiles rt = row_tiles(i1 - i0, tile);
            float *out = ybf16 ? scratch : (float *)y + i0 * ldy; /* row i0's */
            for (int64_t g = first; g < p1; g += group) {
                const int64_t g1 = g + group < p1 ? g + group : p1;
#if PANEL_PAIRS
                const int64_t base = ybf16 ? g : 0; /* the scratch's first panel */
#endif
                const int64_t g2 = g1 + group < p1 ? g1 + group : p1;
                /* The next group's panels in lines of 64 bytes, spread over this group's products. */
                const int64_t lines = prefetch ? (g2 - g1) * panel_bytes / 64 : 0;
                const int64_t products = rt.count * (pair ? (g1 - g + 1) / 2 : g1 - g) * kblocks;
                const int64_t per_product = (lines + products - 1) / products;
                const char *pf = (const char *)wp + g1 * panel_bytes, *pf_end = pf + lines * 64;
                if (kblocks > 1) { /* panel by panel (or pair by pair), block by block, every row tile */
                    for (int64_t p = g; p < g1;) {
                        /* Two whole panels of this group make a pair. */
                        const int two = pair && p + 1 < g1 && (p + 2) * PANEL <= n;
                        const void *panel = (const char *)wp + p * panel_bytes;
                        for (int64_t kb = 0; kb < k; kb += kc)
                            for (int64_t j = 0; j < rt.count; j++) {
                                const int64_t r = i0 + tile_start(rt, j);
                                const int rows = tile_size(rt, j);
                                const int64_t kn = k - kb < kc ? k - kb : kc;
                                prefetch_lines(&pf, pf_end, per_product);
#if PANEL_PAIRS
                                if (two)
                                    panel_pair_kind(bf, x + r * k, k, rows, kb, kn, panel, panel_bytes,
                                                    part + (r - i0) * PANEL, part1 + (r - i0) * PANEL,
                                                    out + (r - i0) * ldo, ldo, p - base, swiglu);
                                else
#endif
                                    panel_single(bf, x + r * k, k, rows, kb, kn, panel,
                                                 part + (r - i0) * PANEL, out + (r - i0) * ldo, ldo, n, p, swiglu);
                            }
                        p += two ? 2 : 1;
                    }
                } else { /* row tile by row tile: each stays in L1 for the group's panels */
                    for (int64_t j = 0; j < rt.count; j++) {
                        const int64_t r = i0 + tile_start(rt, j);
                        const int rows = tile_size(rt, j);
                        for (int64_t p = g; p < g1;) {
                            const int two = pair && p + 1 < g1 && (p + 2) * PANEL <= n;
                            const void *panel = (const char *)wp + p * panel_bytes;
                            prefetch_lines(&pf, pf_end, per_product);
#if PANEL_PAIRS
                            if (two)
                                panel_pair_kind(bf, x + r * k, k, rows, 0, k, panel, panel_bytes, part, part1,
                                                out + (r - i0) * ldo, ldo, p - base, swiglu);
                            else
#endif
                                panel_single(bf, x + r * k, k, rows, 0, k, panel, part, out + (r - i0) * ldo, ldo, n, p,
                                             swiglu);
                            p += two ? 2 : 1;
                        }
                    }
                }
#if PANEL_PAIRS && defined(__AVX512BF16__)
                if (ybf16)
                    store_rows_bf16(scratch, ldo, i1 - i0, (g1 - g) * per_panel,
                                    (uint16_t *)y + i0 * ldy + g * per_panel, ldy);
#endif
            }
        }
        free(scratch);
    }
}

void matmul_panels_f32(const float *x, int64_t m, int64_t k, const float *wp, int64_t n, float *y,
                       int swiglu, int nthreads) {
    matmul_panels(x, m, k, wp, n, y, swiglu, PANEL_F32, 0, nthreads);
}

/* The same panels holding bf16 weights (`pack_panels` of a bf16 weight), fp32 sums. */
void matmul_panels_bf16(const float *x, int64_t m, int64_t k, const uint16_t *wp, int64_t n, float *y,
                        int swiglu, int nthreads) {
    matmul_panels(x, m, k, wp, n, y, swiglu, PANEL_BF16, 0, nthreads);
}

#if PANEL_PAIRS && defined(__AVX512BF16__)
/* bf16 weights in pair panels (`pack_pair_panels`; n % 32 == 0, k even) times x, fp32 sums: each
 * VDPBF16PS adds two products per lane, twice an FMA's work. x is bf16 (`xbf16`: its pairs are
 * the operand as stored) or fp32, rounded to bf16 (to nearest even) first; y is fp32, or bf16
 * with `ybf16`, rounded the same way. Built only where the CPU has AVX-512 BF16. */
void matmul_pair_panels_bf16(const void *x, int xbf16, int64_t m, int64_t k, const uint16_t *wp, int64_t n,
                             void *y, int ybf16, int swiglu, int nthreads) {
    if (xbf16) {
        matmul_panels(x, m, k / 2, wp, n, y, swiglu, PANEL_DOT_BF16, ybf16, nthreads);
        return;
    }
    const float *xf = x;
    const int64_t len = m * k;
    uint16_t *xb = malloc(len * sizeof(uint16_t));
    int64_t i = 0;
    for (; i + 16 <= len; i += 16)
        _mm256_storeu_si256((__m256i *)(xb + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(xf + i)));
    if (i < len) {
        const __mmask16 rest = (__mmask16)((1u << (len - i)) - 1);
        _mm256_mask_storeu_epi16(xb + i, rest, (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(rest, xf + i)));
    }
    matmul_panels((const float *)xb, m, k / 2, wp, n, y, swiglu, PANEL_DOT_BF16, ybf16, nthreads);
    free(xb);
}
#endif

/* ---------------------------------------------------------------- activation quantization */

/* x [m, k] fp32 -> xq int8 [m, k] and dx [m, k/32] per 32-block absmax scales. With
 * `interleave`, each block is stored even elements first, then odd ones (int4 nibble order). */
static void quantize_rows(const float *x, int64_t m, int64_t k, int interleave, int8_t *xq,
                          float *dx) {
    for (int64_t i = 0; i < m * k; i += QBLOCK) {
        const float *xb = x + i;
        float amax = 0.f;
        for (int j = 0; j < QBLOCK; j++) {
            float a = fabsf(xb[j]);
            amax = a > amax ? a : amax;
        }
        float d = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
        dx[i / QBLOCK] = d;
        for (int j = 0; j < QBLOCK; j++) {
            int dst = interleave ? (j & 1) * (QBLOCK / 2) + j / 2 : j;
            xq[i + dst] = (int8_t)lrintf(xb[j] * inv);
        }
    }
}

static inline __m256 dot_block(__m256i wu8, __m256i xs8) {
    /* unsigned weights x signed activations: 32 products summed to 8 int32 lanes. */
    __m256i p16 = _mm256_maddubs_epi16(wu8, xs8);
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
}

/* ---------------------------------------------------------------- int8 weights */

static inline __attribute__((always_inline)) void rows_int8(
    const int8_t *xq, const float *dx, int64_t k, const int8_t *w, const float *scale,
    int64_t n0, int64_t n1, float *y, int64_t ldy, const int M) {
    const int64_t nb = k / QBLOCK;
    for (int64_t n = n0; n < n1; n++) {
        const int8_t *wr = w + n * k;
        __m256 acc[MAX_ROWS];
        for (int i = 0; i < M; i++) acc[i] = _mm256_setzero_ps();
        for (int64_t b = 0; b < nb; b++) {
            __m256i wv = _mm256_loadu_si256((const __m256i *)(wr + b * QBLOCK));
            __m256i wabs = _mm256_sign_epi8(wv, wv);
            for (int i = 0; i < M; i++) {
                __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + i * k + b * QBLOCK));
                __m256 d = _mm256_set1_ps(dx[i * nb + b]);
                acc[i] = _mm256_fmadd_ps(dot_block(wabs, _mm256_sign_epi8(xv, wv)), d, acc[i]);
            }
        }
        for (int i = 0; i < M; i++) y[i * ldy + n] = hsum_ps(acc[i]) * scale[n];
    }
}

/* k % 32 == 0. */
void matmul_int8(const float *x, int64_t m, int64_t k, const int8_t *w, const float *scale,
                 int64_t n, float *y, int nthreads) {
    int8_t *xq = malloc(m * k);
    float *dx = malloc(m * (k / QBLOCK) * sizeof(float));
    quantize_rows(x, m, k, 0, xq, dx);
    const int64_t nb = k / QBLOCK;
    PARALLEL_ROW_TILES(n, m, DISPATCH_ROWS(rows_int8, rows, xq + r * k, dx + r * nb, k, w, scale, t, t1,
                                           y + r * n, n))
    free(xq);
    free(dx);
}

/* ---------------------------------------------------------------- int4 weights */

static inline __attribute__((always_inline)) void rows_int4(
    const int8_t *xq, const float *dx, const float *xsum, int64_t k, int64_t group,
    const uint8_t *w, const float *s, const float *z, int64_t n0, int64_t n1, float *y,
    int64_t ldy, const int M) {
    const int64_t nb = k / QBLOCK, ng = k / group;
    const int shift = __builtin_ctzll(group / QBLOCK); /* block -> group index */
    const __m128i low4 = _mm_set1_epi8(0x0f);
    const __m256i mid = _mm256_set1_epi8(8);
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *wr = w + n * (k / 2);
        const float *sr = s + n * ng, *zr = z + n * ng;
        __m256 acc[MAX_ROWS];
        for (int i = 0; i < M; i++) acc[i] = _mm256_setzero_ps();
        for (int64_t b = 0; b < nb; b++) {
            __m128i raw = _mm_loadu_si128((const __m128i *)(wr + b * (QBLOCK / 2)));
            __m128i lo = _mm_and_si128(raw, low4);
            __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low4);
            /* even elements, then odd ones; centred (q - 8) halves the error that the
             * activations' rounding contributes, against q in [0, 15] */
            __m256i q = _mm256_sub_epi8(_mm256_set_m128i(hi, lo), mid);
            __m256i qabs = _mm256_sign_epi8(q, q);
            const float sb = sr[b >> shift];
            for (int i = 0; i < M; i++) {
                __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + i * k + b * QBLOCK));
                __m256 d = _mm256_set1_ps(dx[i * nb + b] * sb);
                acc[i] = _mm256_fmadd_ps(dot_block(qabs, _mm256_sign_epi8(xv, q)), d, acc[i]);
            }
        }
        for (int i = 0; i < M; i++) { /* the zero points: sum over groups of z * (sum of x) */
            float offset = 0.f;
            for (int64_t g = 0; g < ng; g++) offset += zr[g] * xsum[i * ng + g];
            y[i * ldy + n] = hsum_ps(acc[i]) + offset;
        }
    }
}

/* k % group == 0, group % 32 == 0. */
void matmul_int4(const float *x, int64_t m, int64_t k, int64_t group, const uint8_t *w,
                 const float *s, const float *z, int64_t n, float *y, int nthreads) {
    const int64_t nb = k / QBLOCK, ng = k / group;
    int8_t *xq = malloc(m * k);
    float *dx = malloc(m * nb * sizeof(float)), *xsum = malloc(m * ng * sizeof(float));
    quantize_rows(x, m, k, 1, xq, dx);
    for (int64_t i = 0; i < m * ng; i++) { /* exact fp32 group sums for the offset term */
        float acc = 0.f;
        for (int64_t j = 0; j < group; j++) acc += x[i * group + j];
        xsum[i] = acc;
    }
    PARALLEL_ROW_TILES(n, m, DISPATCH_ROWS(rows_int4, rows, xq + r * k, dx + r * nb, xsum + r * ng, k,
                                           group, w, s, z, t, t1, y + r * n, n))
    free(xq);
    free(dx);
    free(xsum);
}

/* ---------------------------------------------------------------- dequantization */

/* Weights to fp32 for the dense GEMM that many activation rows take (prefill): rows [0, n) of
 * w into out [n, k], in natural element order, split by rows over threads. */
void dequant_int8(const int8_t *w, const float *scale, int64_t n, int64_t k, float *out,
                  int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < n; r++) {
        const __m256 s = _mm256_set1_ps(scale[r]);
        for (int64_t j = 0; j < k; j += 8) {
            __m256i q = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(w + r * k + j)));
            _mm256_storeu_ps(out + r * k + j, _mm256_mul_ps(_mm256_cvtepi32_ps(q), s));
        }
    }
}

/* k % group == 0, group % 32 == 0; w = (q - 8) * s + z. */
void dequant_int4(const uint8_t *w, const float *s, const float *z, int64_t n, int64_t k,
                  int64_t group, float *out, int nthreads) {
    const int64_t ng = k / group;
    const __m128i low4 = _mm_set1_epi8(0x0f), mid = _mm_set1_epi8(8);
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < n; r++) {
        for (int64_t b = 0; b < k; b += QBLOCK) {
            __m128i raw = _mm_loadu_si128((const __m128i *)(w + r * (k / 2) + b / 2));
            __m128i lo = _mm_sub_epi8(_mm_and_si128(raw, low4), mid);
            __m128i hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(raw, 4), low4), mid);
            /* interleaved back to element order: lo0 hi0 lo1 hi1 ... */
            __m128i q[2] = {_mm_unpacklo_epi8(lo, hi), _mm_unpackhi_epi8(lo, hi)};
            const int64_t g = r * ng + b / group;
            const __m256 sv = _mm256_set1_ps(s[g]), zv = _mm256_set1_ps(z[g]);
            float *o = out + r * k + b;
            for (int h = 0; h < 2; h++) {
                __m256 a = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q[h]));
                __m256 c = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q[h], 8)));
                _mm256_storeu_ps(o + 16 * h, _mm256_fmadd_ps(a, sv, zv));
                _mm256_storeu_ps(o + 16 * h + 8, _mm256_fmadd_ps(c, sv, zv));
            }
        }
    }
}

/* ---------------------------------------------------------------- RMSNorm */

/* out = x * rsqrt(mean(x^2) + eps) * w per row of x [m, k]; with `residual`, x + residual is
 * normalised and also written to `sum` (the decoder's residual stream). `out` is fp32, or with
 * `out_bf16` bf16 rounded to nearest even: the operand of a linear that multiplies bf16 pairs,
 * which would round it so itself. k % 8 == 0. */
static void rms_norm_rows(const float *x, const float *residual, int64_t m, int64_t k, const float *w,
                          float eps, float *sum, void *out, int out_bf16) {
#pragma omp parallel for if (m >= ROWWISE_PARALLEL_MIN)
    for (int64_t i = 0; i < m; i++) {
        const float *xr = x + i * k;
        float *src = (float *)xr;
        if (residual) {
            const float *rr = residual + i * k;
            src = sum + i * k;
            for (int64_t j = 0; j < k; j += 8)
                _mm256_storeu_ps(src + j, _mm256_add_ps(_mm256_loadu_ps(xr + j), _mm256_loadu_ps(rr + j)));
        }
        __m256 ss = _mm256_setzero_ps();
        for (int64_t j = 0; j < k; j += 8) {
            __m256 v = _mm256_loadu_ps(src + j);
            ss = _mm256_fmadd_ps(v, v, ss);
        }
        __m256 r = _mm256_set1_ps(1.f / sqrtf(hsum_ps(ss) / (float)k + eps));
        for (int64_t j = 0; j < k; j += 8) {
            const __m256 v = _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(src + j), r), _mm256_loadu_ps(w + j));
            if (out_bf16) store_bf16((uint16_t *)out + i * k + j, v);
            else _mm256_storeu_ps((float *)out + i * k + j, v);
        }
    }
}

void rms_norm(const float *x, const float *residual, int64_t m, int64_t k, const float *w,
              float eps, float *sum, float *out) {
    rms_norm_rows(x, residual, m, k, w, eps, sum, out, 0);
}

/* `rms_norm` on bf16 rows, rounding where torch's bf16 RMSNorm rounds (transformers' order):
 * sum = bf16(x + residual), normalised in fp32, bf16(sum * r), then bf16(that * w). Each value
 * is rounded to nearest even as `Tensor.to(torch.bfloat16)` rounds (finite values); only the
 * sum of squares' order differs from torch's. k % 8 == 0. */
void rms_norm_bf16(const uint16_t *x, const uint16_t *residual, int64_t m, int64_t k, const uint16_t *w,
                   float eps, uint16_t *sum, uint16_t *out) {
#pragma omp parallel for if (m >= ROWWISE_PARALLEL_MIN)
    for (int64_t i = 0; i < m; i++) {
        const uint16_t *src = x + i * k;
        if (residual) {
            for (int64_t j = 0; j < k; j += 8)
                store_bf16(sum + i * k + j, _mm256_add_ps(load_bf16(src + j), load_bf16(residual + i * k + j)));
            src = sum + i * k;
        }
        __m256 ss = _mm256_setzero_ps();
        for (int64_t j = 0; j < k; j += 8) {
            const __m256 v = load_bf16(src + j);
            ss = _mm256_fmadd_ps(v, v, ss);
        }
        const __m256 r = _mm256_set1_ps(1.f / sqrtf(hsum_ps(ss) / (float)k + eps));
        uint16_t normed[8];
        for (int64_t j = 0; j < k; j += 8) {
            store_bf16(normed, _mm256_mul_ps(load_bf16(src + j), r));
            store_bf16(out + i * k + j, _mm256_mul_ps(load_bf16(normed), load_bf16(w + j)));
        }
    }
}

/* ---------------------------------------------------------------- decode attention */

/* softmax in place over p[0, len) */
#if defined(__AVX512F__)
/* `exp_ps` in 16 lanes: the same operations, so the same value per element. */
static inline __m512 exp512_ps(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(88.f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
    __m512 p = _mm512_set1_ps(1.3981999507e-3f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
    __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

/* In place, exact: p = exp(p - max) / sum, 16 lanes at a time, a masked last vector. */
static void softmax(float *p, int64_t len) {
    __m512 vmx = _mm512_set1_ps(-INFINITY);
    int64_t t = 0;
    for (; t + 16 <= len; t += 16) vmx = _mm512_max_ps(vmx, _mm512_loadu_ps(p + t));
    const __mmask16 rest = (__mmask16)((1u << (len - t)) - 1);
    vmx = _mm512_mask_max_ps(vmx, rest, vmx, _mm512_maskz_loadu_ps(rest, p + t));
    vmx = _mm512_set1_ps(_mm512_reduce_max_ps(vmx));
    __m512 vsum = _mm512_setzero_ps();
    for (t = 0; t + 16 <= len; t += 16) {
        const __m512 e = exp512_ps(_mm512_sub_ps(_mm512_loadu_ps(p + t), vmx));
        _mm512_storeu_ps(p + t, e);
        vsum = _mm512_add_ps(vsum, e);
    }
    if (rest) {
        const __m512 e = exp512_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(rest, p + t), vmx));
        _mm512_mask_storeu_ps(p + t, rest, e);
        vsum = _mm512_mask_add_ps(vsum, rest, vsum, e);
    }
    const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(vsum));
    for (t = 0; t + 16 <= len; t += 16) _mm512_storeu_ps(p + t, _mm512_mul_ps(_mm512_loadu_ps(p + t), inv));
    if (rest) _mm512_mask_storeu_ps(p + t, rest, _mm512_mul_ps(_mm512_maskz_loadu_ps(rest, p + t), inv));
}
#else
static void softmax(float *p, int64_t len) {
    __m256 vmx = _mm256_set1_ps(-INFINITY);
    int64_t t = 0;
    for (; t + 8 <= len; t += 8) vmx = _mm256_max_ps(vmx, _mm256_loadu_ps(p + t));
    float mx = -INFINITY, total = 0.f, lanes[8];
    _mm256_storeu_ps(lanes, vmx);
    for (int i = 0; i < 8; i++) mx = lanes[i] > mx ? lanes[i] : mx;
    for (; t < len; t++) mx = p[t] > mx ? p[t] : mx;
    vmx = _mm256_set1_ps(mx);
    __m256 vsum = _mm256_setzero_ps();
    for (t = 0; t + 8 <= len; t += 8) {
        __m256 e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(p + t), vmx));
        _mm256_storeu_ps(p + t, e);
        vsum = _mm256_add_ps(vsum, e);
    }
    for (; t < len; t++) total += (p[t] = expf(p[t] - mx));
    total += hsum_ps(vsum);
    __m256 inv = _mm256_set1_ps(1.f / total);
    for (t = 0; t + 8 <= len; t += 8) _mm256_storeu_ps(p + t, _mm256_mul_ps(_mm256_loadu_ps(p + t), inv));
    for (; t < len; t++) p[t] /= total;
}
#endif

/* 8 cache elements from element `i` of `base`, as floats: the cache holds fp32, or bf16 (BF). */
static inline __attribute__((always_inline)) __m256 load_cache(const char *base, int64_t i, const int BF) {
    return BF ? load_bf16((const uint16_t *)base + i) : _mm256_loadu_ps((const float *)base + i);
}

/* Scores of up to 3 query heads (G) against 4 consecutive cache rows, over d: 12 independent
 * accumulators, each K vector loaded once for the G heads. q: G heads d floats apart; k: 4 rows
 * `row` elements apart; out p[g * stride + i] = scale * q_g . k_i. */
#if defined(__AVX512F__)
/* 16 cache elements from element `i` of `base`, as floats. */
static inline __attribute__((always_inline)) __m512 load_cache16(const char *base, int64_t i, const int BF) {
    return BF ? load_bf16x16((const uint16_t *)base + i) : _mm512_loadu_ps((const float *)base + i);
}

/* `qk_tile` in 16 lanes: half the loads and FMAs; each accumulator's halves are added before
 * the 8-lane reduction. Its prefetches per step double, as its steps halve. */
static inline __attribute__((always_inline)) void qk_tile(const float *q, const char *k,
                                                         int64_t row, int64_t d, float scale,
                                                         float *p, int64_t stride, const int G,
                                                         const int BF, const char *pf, int npf) {
    __m512 a00 = _mm512_setzero_ps(), a01 = a00, a02 = a00, a03 = a00;
    __m512 a10 = a00, a11 = a00, a12 = a00, a13 = a00, a20 = a00, a21 = a00, a22 = a00, a23 = a00;
    for (int64_t j = 0; j < d; j += 16) {
        for (int f = 0; f < 2 * npf; f++, pf += 64) _mm_prefetch(pf, _MM_HINT_T0);
        const __m512 k0 = load_cache16(k, j, BF), k1 = load_cache16(k, row + j, BF);
        const __m512 k2 = load_cache16(k, 2 * row + j, BF), k3 = load_cache16(k, 3 * row + j, BF);
        __m512 qv = _mm512_loadu_ps(q + j);
        a00 = _mm512_fmadd_ps(qv, k0, a00); a01 = _mm512_fmadd_ps(qv, k1, a01);
        a02 = _mm512_fmadd_ps(qv, k2, a02); a03 = _mm512_fmadd_ps(qv, k3, a03);
        if (G > 1) {
            qv = _mm512_loadu_ps(q + d + j);
            a10 = _mm512_fmadd_ps(qv, k0, a10); a11 = _mm512_fmadd_ps(qv, k1, a11);
            a12 = _mm512_fmadd_ps(qv, k2, a12); a13 = _mm512_fmadd_ps(qv, k3, a13);
        }
        if (G > 2) {
            qv = _mm512_loadu_ps(q + 2 * d + j);
            a20 = _mm512_fmadd_ps(qv, k0, a20); a21 = _mm512_fmadd_ps(qv, k1, a21);
            a22 = _mm512_fmadd_ps(qv, k2, a22); a23 = _mm512_fmadd_ps(qv, k3, a23);
        }
    }
    const __m128 s = _mm_set1_ps(scale);
#define HALVES(a) _mm256_add_ps(_mm512_castps512_ps256(a), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)))
#define QK_REDUCE(g)                                                                              \
    {                                                                                           \
        __m256 h_ = _mm256_hadd_ps(_mm256_hadd_ps(HALVES(a##g##0), HALVES(a##g##1)),             \
                                   _mm256_hadd_ps(HALVES(a##g##2), HALVES(a##g##3)));            \
        _mm_storeu_ps(p + g * stride, _mm_mul_ps(s, _mm_add_ps(_mm256_castps256_ps128(h_),      \
                                                               _mm256_extractf128_ps(h_, 1)))); \
    }
    QK_REDUCE(0)
    if (G > 1) QK_REDUCE(1)
    if (G > 2) QK_REDUCE(2)
#undef QK_REDUCE
#undef HALVES
}

/* `pv_tile` in 16 lanes: NC 4 is 32 floats in two vectors, NC 2 is 16 in one. */
static inline __attribute__((always_inline)) void pv_tile(const float *p, int64_t stride,
                                                         const char *v, int64_t row, int64_t n,
                                                         float *o, int64_t d, const int G,
                                                         const int NC, const int BF, const char *pf,
                                                         int npf) {
    __m512 a00, a01, a10, a11, a20, a21;
#define PV_LOAD(g) a##g##0 = _mm512_loadu_ps(o + g * d); if (NC > 2) a##g##1 = _mm512_loadu_ps(o + g * d + 16);
#define PV_STORE(g) _mm512_storeu_ps(o + g * d, a##g##0); if (NC > 2) _mm512_storeu_ps(o + g * d + 16, a##g##1);
#define PV_FMA(g)                                                                                 \
    {                                                                                           \
        const __m512 w_ = _mm512_set1_ps(p[g * stride + i]);                                     \
        a##g##0 = _mm512_fmadd_ps(w_, v0, a##g##0);                                              \
        if (NC > 2) a##g##1 = _mm512_fmadd_ps(w_, v1, a##g##1);                                  \
    }
    PV_LOAD(0)
    if (G > 1) { PV_LOAD(1) }
    if (G > 2) { PV_LOAD(2) }
    for (int64_t i = 0; i < n; i++) {
        for (int f = 0; f < npf; f++, pf += 64) _mm_prefetch(pf, _MM_HINT_T0);
        const int64_t vr = i * row;
        const __m512 v0 = load_cache16(v, vr, BF);
        __m512 v1 = v0;
        if (NC > 2) v1 = load_cache16(v, vr + 16, BF);
        PV_FMA(0)
        if (G > 1) PV_FMA(1)
        if (G > 2) PV_FMA(2)
    }
    PV_STORE(0)
    if (G > 1) { PV_STORE(1) }
    if (G > 2) { PV_STORE(2) }
#undef PV_LOAD
#undef PV_STORE
#undef PV_FMA
}
#else
static inline __attribute__((always_inline)) void qk_tile(const float *q, const char *k,
                                                         int64_t row, int64_t d, float scale,
                                                         float *p, int64_t stride, const int G,
                                                         const int BF, const char *pf, int npf) {
    __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00;
    __m256 a10 = a00, a11 = a00, a12 = a00, a13 = a00, a20 = a00, a21 = a00, a22 = a00, a23 = a00;
    for (int64_t j = 0; j < d; j += 8) {
        for (int f = 0; f < npf; f++, pf += 64) _mm_prefetch(pf, _MM_HINT_T0);
        const __m256 k0 = load_cache(k, j, BF), k1 = load_cache(k, row + j, BF);
        const __m256 k2 = load_cache(k, 2 * row + j, BF), k3 = load_cache(k, 3 * row + j, BF);
        __m256 qv = _mm256_loadu_ps(q + j);
        a00 = _mm256_fmadd_ps(qv, k0, a00); a01 = _mm256_fmadd_ps(qv, k1, a01);
        a02 = _mm256_fmadd_ps(qv, k2, a02); a03 = _mm256_fmadd_ps(qv, k3, a03);
        if (G > 1) {
            qv = _mm256_loadu_ps(q + d + j);
            a10 = _mm256_fmadd_ps(qv, k0, a10); a11 = _mm256_fmadd_ps(qv, k1, a11);
            a12 = _mm256_fmadd_ps(qv, k2, a12); a13 = _mm256_fmadd_ps(qv, k3, a13);
        }
        if (G > 2) {
            qv = _mm256_loadu_ps(q + 2 * d + j);
            a20 = _mm256_fmadd_ps(qv, k0, a20); a21 = _mm256_fmadd_ps(qv, k1, a21);
            a22 = _mm256_fmadd_ps(qv, k2, a22); a23 = _mm256_fmadd_ps(qv, k3, a23);
        }
    }
    const __m128 s = _mm_set1_ps(scale);
#define QK_REDUCE(g)                                                                              \
    {                                                                                           \
        __m256 h_ = _mm256_hadd_ps(_mm256_hadd_ps(a##g##0, a##g##1), _mm256_hadd_ps(a##g##2, a##g##3)); \
        _mm_storeu_ps(p + g * stride, _mm_mul_ps(s, _mm_add_ps(_mm256_castps256_ps128(h_),      \
                                                               _mm256_extractf128_ps(h_, 1)))); \
    }
    QK_REDUCE(0)
    if (G > 1) QK_REDUCE(1)
    if (G > 2) QK_REDUCE(2)
#undef QK_REDUCE
}

/* o_g[0, 8 NC) += sum_i p[g * stride + i] v_i[0, 8 NC) over n rows `row` elements apart, for up
 * to 3 query heads (G): each V vector is loaded once for the G heads. */
static inline __attribute__((always_inline)) void pv_tile(const float *p, int64_t stride,
                                                         const char *v, int64_t row, int64_t n,
                                                         float *o, int64_t d, const int G,
                                                         const int NC, const int BF, const char *pf,
                                                         int npf) {
    __m256 a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23;
#define PV_LOAD(g) a##g##0 = _mm256_loadu_ps(o + g * d); a##g##1 = _mm256_loadu_ps(o + g * d + 8); \
    if (NC > 2) { a##g##2 = _mm256_loadu_ps(o + g * d + 16); a##g##3 = _mm256_loadu_ps(o + g * d + 24); }
#define PV_STORE(g) _mm256_storeu_ps(o + g * d, a##g##0); _mm256_storeu_ps(o + g * d + 8, a##g##1); \
    if (NC > 2) { _mm256_storeu_ps(o + g * d + 16, a##g##2); _mm256_storeu_ps(o + g * d + 24, a##g##3); }
#define PV_FMA(g)                                                                                 \
    {                                                                                           \
        const __m256 w_ = _mm256_broadcast_ss(p + g * stride + i);                               \
        a##g##0 = _mm256_fmadd_ps(w_, v0, a##g##0); a##g##1 = _mm256_fmadd_ps(w_, v1, a##g##1);  \
        if (NC > 2) { a##g##2 = _mm256_fmadd_ps(w_, v2, a##g##2); a##g##3 = _mm256_fmadd_ps(w_, v3, a##g##3); } \
    }
    PV_LOAD(0)
    if (G > 1) { PV_LOAD(1) }
    if (G > 2) { PV_LOAD(2) }
    for (int64_t i = 0; i < n; i++) {
        for (int f = 0; f < npf; f++, pf += 64) _mm_prefetch(pf, _MM_HINT_T0);
        const int64_t vr = i * row;
        const __m256 v0 = load_cache(v, vr, BF), v1 = load_cache(v, vr + 8, BF);
        __m256 v2 = v0, v3 = v0;
        if (NC > 2) { v2 = load_cache(v, vr + 16, BF); v3 = load_cache(v, vr + 24, BF); }
        PV_FMA(0)
        if (G > 1) PV_FMA(1)
        if (G > 2) PV_FMA(2)
    }
    PV_STORE(0)
    if (G > 1) { PV_STORE(1) }
    if (G > 2) { PV_STORE(2) }
#undef PV_LOAD
#undef PV_STORE
#undef PV_FMA
}
#endif

static inline void prefetch_rows(const float *x, int64_t floats) {
    for (int64_t c = 0; c < floats; c += 16) _mm_prefetch((const char *)(x + c), _MM_HINT_T0);
}

/* One query token per sequence against its paged K/V, read in place (no gather):
 * q, out [b, hq, d]; caches [num_blocks, block_size, hkv, d]; tables [b, max_blocks];
 * ctx [b] tokens to attend to. One sequence per task: all its K blocks, then all its V blocks,
 * each block's rows in address order with every head at once (in a row the heads lie side by
 * side), the next block prefetched a few lines per step of the current one: read head by head,
 * or without the prefetch, each block costs the core its latency. Query heads sharing a KV
 * head (GQA) share each load of it. The cache holds fp32, or bf16 (BF: widened as it is read,
 * the sums in fp32). d % 16 == 0; block_size % 4 == 0. */
static inline __attribute__((always_inline)) void paged_decode(
    const float *q, int64_t b, int64_t hq, int64_t hkv, int64_t d, const char *kc, const char *vc,
    int64_t block_size, const int64_t *tables, int64_t max_blocks, const int64_t *ctx, float scale,
    float *out, uint16_t *out_bf16, int nthreads, const int BF) {
    const int64_t group = hq / hkv, row = hkv * d, block_elems = block_size * row;
    const int64_t block_bytes = block_elems * (BF ? 2 : 4), block_lines = block_bytes / 64;
    const int64_t head_tiles = hkv * ((group + 2) / 3); /* (kv head, up to 3 query heads) */
    /* Lines to prefetch per inner step: the K pass takes d/8 steps per 4 rows and head tile,
     * the V pass a step per row, head tile and 32 dims. */
    const int qk_pf = (int)((block_lines + block_size / 4 * head_tiles * (d / 8) - 1) / (block_size / 4 * head_tiles * (d / 8)));
    const int pv_pf = (int)((block_lines + block_size * head_tiles * ((d + 31) / 32) - 1) / (block_size * head_tiles * ((d + 31) / 32)));
    int threads = b > 1 ? nthreads : 1;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t s = 0; s < b; s++) {
        const int64_t len = ctx[s], nblk = (len + block_size - 1) / block_size;
        const int64_t stride = nblk * block_size; /* p[head][t], t < stride */
        const int64_t *table = tables + s * max_blocks;
        float *p = malloc(hq * stride * sizeof(float));
        const float *qs = q + s * hq * d;
        float *os = out + s * hq * d;
        /* Scores of every row of each block, valid or not: a partial block's tail rows are in
         * the cache, and their scores are never read. */
        for (int64_t blk = 0; blk < nblk; blk++) {
            const char *kb = kc + table[blk] * block_bytes;
            const char *pf = kc + table[blk + 1 < nblk ? blk + 1 : blk] * block_bytes;
            const int npf = blk + 1 < nblk ? qk_pf : 0;
            for (int64_t i = 0; i < block_size; i += 4)
                for (int64_t h = 0; h < hkv; h++)
                    for (int64_t g = 0; g < group; g += 3) {
                        const float *qh = qs + (h * group + g) * d;
                        const char *kr = kb + (i * row + h * d) * (BF ? 2 : 4);
                        float *ph = p + (h * group + g) * stride + blk * block_size + i;
                        switch (group - g < 3 ? group - g : 3) {
                            case 1: qk_tile(qh, kr, row, d, scale, ph, stride, 1, BF, pf, npf); break;
                            case 2: qk_tile(qh, kr, row, d, scale, ph, stride, 2, BF, pf, npf); break;
                            default: qk_tile(qh, kr, row, d, scale, ph, stride, 3, BF, pf, npf); break;
                        }
                        pf += npf * (d / 8) * 64;
                    }
        }
        for (int64_t head = 0; head < hq; head++) softmax(p + head * stride, len);
        for (int64_t j = 0; j < hq * d; j++) os[j] = 0.f;
        /* Weighted values, over the valid rows only (a tail row may hold anything, NaN too). */
        for (int64_t blk = 0; blk < nblk; blk++) {
            const char *vb = vc + table[blk] * block_bytes;
            const int64_t n = len - blk * block_size < block_size ? len - blk * block_size : block_size;
            const char *pf = vc + table[blk + 1 < nblk ? blk + 1 : blk] * block_bytes;
            const int npf = blk + 1 < nblk ? pv_pf : 0;
            for (int64_t h = 0; h < hkv; h++)
                for (int64_t g = 0; g < group; g += 3) {
                    const int G = group - g < 3 ? (int)(group - g) : 3;
                    const int64_t head = h * group + g;
                    const float *pp = p + head * stride + blk * block_size;
                    for (int64_t c = 0; c < d; c += 32) {
                        const char *vr = vb + (h * d + c) * (BF ? 2 : 4);
                        float *o = os + head * d + c;
                        if (d - c >= 32) {
                            if (G == 3) pv_tile(pp, stride, vr, row, n, o, d, 3, 4, BF, pf, npf);
                            else if (G == 2) pv_tile(pp, stride, vr, row, n, o, d, 2, 4, BF, pf, npf);
                            else pv_tile(pp, stride, vr, row, n, o, d, 1, 4, BF, pf, npf);
                        } else {
                            if (G == 3) pv_tile(pp, stride, vr, row, n, o, d, 3, 2, BF, pf, npf);
                            else if (G == 2) pv_tile(pp, stride, vr, row, n, o, d, 2, 2, BF, pf, npf);
                            else pv_tile(pp, stride, vr, row, n, o, d, 1, 2, BF, pf, npf);
                        }
                        pf += npf * n * 64;
                    }
                }
        }
        if (out_bf16) /* rounded as a linear multiplying bf16 pairs would round it */
            for (int64_t j = 0; j < hq * d; j += 8) store_bf16(out_bf16 + s * hq * d + j, _mm256_loadu_ps(os + j));
        free(p);
    }
}

/* `bf` says the cache holds bf16 (else fp32); each case gets its own copy of the kernel, the
 * element type fixed. With `out_bf16`, each sequence's output is also rounded to bf16 there. */
static void paged_decode_rows(const float *q, int64_t b, int64_t hq, int64_t hkv, int64_t d, const void *kc,
                              const void *vc, int bf, int64_t block_size, const int64_t *tables,
                              int64_t max_blocks, const int64_t *ctx, float scale, float *out, uint16_t *out_bf16,
                              int nthreads) {
    const char *k = kc, *v = vc;
    if (bf) paged_decode(q, b, hq, hkv, d, k, v, block_size, tables, max_blocks, ctx, scale, out, out_bf16, nthreads, 1);
    else paged_decode(q, b, hq, hkv, d, k, v, block_size, tables, max_blocks, ctx, scale, out, out_bf16, nthreads, 0);
}

/* The entry point. */
void paged_decode_attention(const float *q, int64_t b, int64_t hq, int64_t hkv, int64_t d,
                            const void *kc, const void *vc, int bf, int64_t block_size,
                            const int64_t *tables, int64_t max_blocks, const int64_t *ctx,
                            float scale, float *out, int nthreads) {
    paged_decode_rows(q, b, hq, hkv, d, kc, vc, bf, block_size, tables, max_blocks, ctx, scale, out, NULL, nthreads);
}

/* ---------------------------------------------------------------- prefill attention */

#define ATTN_QUERY_ROWS 48 /* query rows per task: a multiple of ATTN_TILE_ROWS */
#define ATTN_TILE_ROWS PANEL_PAIR_ROWS /* the AVX-512 pair tile's 8 rows, or the AVX2 tile's 6 */

/* m <= ATTN_TILE_ROWS rows of x (ldx floats apart) times the first k steps of `panels`
 * neighbouring fp32 panels (`stride` floats apart) -> y, 16 outputs per panel (ldy apart):
 * two panels at a time where the AVX-512 tile runs, the AVX2 tile for the rest. */
static void attn_panels(const float *x, int64_t ldx, int m, int64_t k, const float *w, int64_t stride,
                        int64_t panels, float *y, int64_t ldy) {
    int64_t p = 0;
#if PANEL_PAIRS
    for (; p + 1 < panels; p += 2)
        panel_pair_rows(x, ldx, m, k, w + p * stride, w + (p + 1) * stride, y + p * PANEL, ldy,
                        y + (p + 1) * PANEL, ldy, 0, NULL, NULL, PANEL_F32);
#endif
    for (; p < panels; p++)
        for (int r = 0; r < m; r += PANEL_ROWS)
            panel_rows(x + r * ldx, ldx, m - r < PANEL_ROWS ? m - r : PANEL_ROWS, k, w + p * stride,
                       y + r * ldy + p * PANEL, ldy, 0, NULL, PANEL_F32);
}

#if PANEL_PAIRS && defined(__AVX512BF16__)
/* `attn_panels` on bf16 pair panels (`panels` even): x holds bf16 pairs, ldx and k count pairs,
 * `stride` counts bf16 values. */
static void attn_pair_panels(const float *x, int64_t ldx, int m, int64_t k, const uint16_t *w, int64_t stride,
                             int64_t panels, float *y, int64_t ldy) {
    for (int64_t p = 0; p < panels; p += 2)
        panel_pair_rows(x, ldx, m, k, w + p * stride, w + (p + 1) * stride, y + p * PANEL, ldy,
                        y + (p + 1) * PANEL, ldy, 0, NULL, NULL, PANEL_DOT_BF16);
}

/* p[0, len) fp32 -> bf16 at the start of the same row (len % 8 == 0). */
static inline void round_row_bf16(float *p, int64_t len) { store_rows_bf16(p, len, 1, len, (uint16_t *)p, len); }
#define ATTN_PAIRS 1
#else
#define ATTN_PAIRS 0
#endif

/* Keys rounded up to a whole pair of panels. */
static inline int64_t round32(int64_t len) { return (len + 2 * PANEL - 1) / (2 * PANEL) * (2 * PANEL); }

/* A task of `prefill_attention`: query head h (of KV head kh) over rows [r0, r0 + rows), the
 * blocks of rows that see more keys first. */
typedef struct {
    int64_t h, kh, r0, rows;
} AttnTask;

static inline AttnTask attn_task(int64_t task, int64_t n, int64_t hq, int64_t group) {
    const int64_t blocks = (n + ATTN_QUERY_ROWS - 1) / ATTN_QUERY_ROWS, h = task % hq;
    const int64_t r0 = (blocks - 1 - task / hq) * ATTN_QUERY_ROWS;
    return (AttnTask){h, h / group, r0, n - r0 < ATTN_QUERY_ROWS ? n - r0 : ATTN_QUERY_ROWS};
}

/* Floats of the workspace `prefill_attention` needs: packed K and V, then each thread's
 * query block and scores (the caller reuses it: fresh pages cost more than the copies). */
int64_t prefill_attention_workspace(int64_t len, int64_t hkv, int64_t d, int nthreads) {
    const int64_t len32 = round32(len);
    return 2 * hkv * len32 * d + (int64_t)nthreads * ATTN_QUERY_ROWS * (d + len32);
}

#if ATTN_PAIRS
/* `prefill_attention` with bf16 products (VDPBF16PS), for bf16 activations: q * scale, K, the
 * softmax's probabilities and V rounded to bf16 (to nearest even), every sum in fp32, as torch's
 * bf16 flash attention rounds them. K is packed per KV head into pair panels of 16 keys
 * ([len/16][d/2][32]: each key's two neighbouring dims side by side) and V into pair panels of
 * 16 output dims ([d/16][len/2][32]: two neighbouring keys side by side), keys zero-padded to
 * whole pairs of panels; d % 32 == 0. */
static void prefill_attention_pairs(const float *q, int64_t ldq, int64_t n, int64_t hq, int64_t hkv, int64_t d,
                                    const void *k, int64_t ldk, int k_bf16, const void *v, int64_t ldv, int v_bf16,
                                    int64_t len, float scale, float *out, float *work, int nthreads) {
    const int64_t group = hq / hkv, len32 = round32(len), offset = len - n, kv_size = len32 * d;
    uint16_t *kp = (uint16_t *)work, *vp = kp + hkv * kv_size;
    const int64_t blocks = (n + ATTN_QUERY_ROWS - 1) / ATTN_QUERY_ROWS, tasks = hq * blocks;
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for collapse(2) schedule(static)
        for (int64_t h = 0; h < hkv; h++)
            for (int64_t t = 0; t < len32; t += 2) { /* two keys: a V pair; keys past len are zeros */
                for (int e = 0; e < 2; e++) {
                    const int64_t key = t + e;
                    uint16_t *kd = kp + h * kv_size + (key / PANEL) * d * PANEL + (key % PANEL) * 2;
                    float row[d];
                    for (int64_t j = 0; j < d; j++) row[j] = key < len ? element(k, k_bf16, key * ldk + h * d + j) : 0.f;
                    round_row_bf16(row, d);
                    for (int64_t j = 0; j < d / 2; j++) memcpy(kd + j * 2 * PANEL, (uint16_t *)row + 2 * j, 4);
                }
                float vrow[2][d];
                for (int e = 0; e < 2; e++) {
                    for (int64_t j = 0; j < d; j++)
                        vrow[e][j] = t + e < len ? element(v, v_bf16, (t + e) * ldv + h * d + j) : 0.f;
                    round_row_bf16(vrow[e], d);
                }
                uint16_t *vd = vp + h * kv_size + (t / 2) * 2 * PANEL;
                for (int64_t j = 0; j < d; j++) {
                    uint16_t *dst = vd + (j / PANEL) * len32 * PANEL + (j % PANEL) * 2;
                    dst[0] = ((uint16_t *)vrow[0])[j];
                    dst[1] = ((uint16_t *)vrow[1])[j];
                }
            }
        float *qb = (float *)(vp + hkv * kv_size) + omp_get_thread_num() * ATTN_QUERY_ROWS * (d + len32);
        float *sc = qb + ATTN_QUERY_ROWS * d;
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < tasks; task++) {
            const AttnTask a = attn_task(task, n, hq, group);
            const int64_t h = a.h, kh = a.kh, r0 = a.r0, rows = a.rows, keys32 = round32(offset + r0 + rows);
            for (int64_t i = 0; i < rows; i++) { /* row i's bf16 pairs: d / 2 floats */
                float row[d];
                for (int64_t j = 0; j < d; j++) row[j] = q[(r0 + i) * ldq + h * d + j] * scale;
                round_row_bf16(row, d);
                memcpy(qb + i * d / 2, row, d * sizeof(uint16_t));
            }
            const uint16_t *kh_p = kp + kh * kv_size, *vh_p = vp + kh * kv_size;
            for (int64_t i = 0; i < rows; i += ATTN_TILE_ROWS) {
                const int m = rows - i < ATTN_TILE_ROWS ? (int)(rows - i) : ATTN_TILE_ROWS;
                const int64_t seen32 = round32(offset + r0 + i + m);
                attn_pair_panels(qb + i * d / 2, d / 2, m, d / 2, kh_p, d * PANEL, seen32 / PANEL, sc + i * keys32,
                                 keys32);
                for (int64_t r = i; r < i + m; r++) { /* row r sees keys [0, offset + r0 + r] */
                    float *s = sc + r * keys32;
                    const int64_t seen = offset + r0 + r + 1;
                    softmax(s, seen);
                    for (int64_t t = seen; t < seen32; t++) s[t] = 0.f;
                    round_row_bf16(s, seen32);
                }
                attn_pair_panels(sc + i * keys32, keys32, m, seen32 / 2, vh_p, len32 * PANEL, d / PANEL,
                                 out + (r0 + i) * hq * d + h * d, hq * d);
            }
        }
    }
}
#endif

/* Causal attention of one prompt chunk, on the panel micro-kernel: q [n, hq, d] against
 * k, v [len, hkv, d] (len >= n: the chunk's own keys last, after `len - n` of earlier
 * context), so query i sees keys [0, len - n + i]. Tokens are ldq, ldk, ldv floats apart
 * (heads contiguous within a token); out [n, hq, d] contiguous; d % 16 == 0.
 * K is packed per KV head into panels of 16 keys ([len/16][d][16]) and V into panels of 16
 * output dims ([d/16][len][16]), zero-padded to whole panels. A task is one head's block of
 * query rows: its scores S = (q * scale) K^T over the keys it sees, an exact softmax per row,
 * then S V. Tasks with more keys go first. */
void prefill_attention(const float *q, int64_t ldq, int64_t n, int64_t hq, int64_t hkv, int64_t d,
                       const void *kx, int64_t ldk, int k_bf16, const void *vx, int64_t ldv, int v_bf16,
                       int64_t len, float scale, float *out, float *work, int bf16_dots, int nthreads) {
#if ATTN_PAIRS
    if (bf16_dots && d % (2 * PANEL) == 0) {
        prefill_attention_pairs(q, ldq, n, hq, hkv, d, kx, ldk, k_bf16, vx, ldv, v_bf16, len, scale, out, work,
                                nthreads);
        return;
    }
#endif
    const float *k = kx, *v = vx; /* fp32 here: k_bf16 and v_bf16 are for bf16 products only */
    const int64_t group = hq / hkv, len16 = (len + PANEL - 1) / PANEL * PANEL, offset = len - n;
    const int64_t kv_size = len16 * d;
    float *kp = work, *vp = kp + hkv * kv_size;
    const int64_t blocks = (n + ATTN_QUERY_ROWS - 1) / ATTN_QUERY_ROWS, tasks = hq * blocks;
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for collapse(2) schedule(static)
        for (int64_t h = 0; h < hkv; h++)
            for (int64_t t = 0; t < len16; t++) { /* keys past len: zeros, finite under weight 0 */
                const float *kr = k + t * ldk + h * d, *vr = v + t * ldv + h * d;
                float *kd = kp + h * kv_size + (t / PANEL) * d * PANEL + t % PANEL;
                float *vd = vp + h * kv_size + t * PANEL;
                for (int64_t j = 0; j < d; j++) kd[j * PANEL] = t < len ? kr[j] : 0.f;
                for (int64_t p = 0; p < d / PANEL; p++)
                    for (int c = 0; c < PANEL; c++) vd[p * len16 * PANEL + c] = t < len ? vr[p * PANEL + c] : 0.f;
            }
        float *qb = vp + hkv * kv_size + omp_get_thread_num() * ATTN_QUERY_ROWS * (d + len16);
        float *sc = qb + ATTN_QUERY_ROWS * d;
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < tasks; task++) {
            const AttnTask a = attn_task(task, n, hq, group);
            const int64_t h = a.h, kh = a.kh, r0 = a.r0, rows = a.rows;
            const int64_t keys16 = (offset + r0 + rows + PANEL - 1) / PANEL * PANEL;
            for (int64_t i = 0; i < rows; i++)
                for (int64_t j = 0; j < d; j++) qb[i * d + j] = q[(r0 + i) * ldq + h * d + j] * scale;
            const float *kh_p = kp + kh * kv_size, *vh_p = vp + kh * kv_size;
            /* A tile of ATTN_TILE_ROWS rows reads only the key panels its last row sees. */
            for (int64_t i = 0; i < rows; i += ATTN_TILE_ROWS) {
                const int m = rows - i < ATTN_TILE_ROWS ? (int)(rows - i) : ATTN_TILE_ROWS;
                const int64_t seen16 = (offset + r0 + i + m + PANEL - 1) / PANEL * PANEL;
                attn_panels(qb + i * d, d, m, d, kh_p, d * PANEL, seen16 / PANEL, sc + i * keys16, keys16);
                for (int64_t r = i; r < i + m; r++) { /* row r sees keys [0, offset + r0 + r] */
                    float *s = sc + r * keys16;
                    const int64_t seen = offset + r0 + r + 1;
                    softmax(s, seen);
                    for (int64_t t = seen; t < seen16; t++) s[t] = 0.f;
                }
                attn_panels(sc + i * keys16, keys16, m, seen16, vh_p, len16 * PANEL, d / PANEL,
                            out + (r0 + i) * hq * d + h * d, hq * d);
            }
        }
    }
}

/* ---------------------------------------------------------------- rotary embedding + cache write */

/* Rotate-half rotary on one head: out = x * cos + swap_halves(x) * sin (sin carries the sign). */
static inline void rope_head(const float *x, const float *cs, const float *sn, int64_t d, float *out) {
    const int64_t half = d / 2;
    for (int64_t j = 0; j < half; j += 8) {
        __m256 a = _mm256_loadu_ps(x + j), b = _mm256_loadu_ps(x + half + j);
        _mm256_storeu_ps(out + j, _mm256_fmadd_ps(b, _mm256_loadu_ps(sn + j), _mm256_mul_ps(a, _mm256_loadu_ps(cs + j))));
        _mm256_storeu_ps(out + half + j, _mm256_fmadd_ps(a, _mm256_loadu_ps(sn + half + j),
                                                         _mm256_mul_ps(b, _mm256_loadu_ps(cs + half + j))));
    }
}

/* Token i's row of qkv (fp32): its q and k heads rotated into q_out and k_out, k and v written
 * to the caches at element offset `at` (bf: the cache holds bf16). */
static void rope_token(const float *row, int64_t i, int64_t hq, int64_t hkv, int64_t d, const float *cs,
                       const float *sn, int64_t at, void *k_cache, void *v_cache, float *q_out, float *k_out,
                       int bf) {
    for (int64_t h = 0; h < hq; h++) rope_head(row + h * d, cs, sn, d, q_out + (i * hq + h) * d);
    for (int64_t h = 0; h < hkv; h++) {
        float *ko = k_out + (i * hkv + h) * d;
        const float *vi = row + (hq + hkv + h) * d;
        rope_head(row + (hq + h) * d, cs, sn, d, ko);
        for (int64_t j = 0; j < d; j += 8) {
            const int64_t e = at + h * d + j;
            if (bf) {
                store_bf16((uint16_t *)k_cache + e, _mm256_loadu_ps(ko + j));
                store_bf16((uint16_t *)v_cache + e, _mm256_loadu_ps(vi + j));
            } else {
                _mm256_storeu_ps((float *)k_cache + e, _mm256_loadu_ps(ko + j));
                _mm256_storeu_ps((float *)v_cache + e, _mm256_loadu_ps(vi + j));
            }
        }
    }
}

/* qkv [t, (hq + 2 hkv) d] (q heads, k heads, v heads; fp32, or bf16 with `qkv_bf16`: each row
 * widened as it is read) -> q_out [t, hq, d] and k_out [t, hkv, d] rotated, fp32; k_out and v
 * also written to the caches [slots, hkv, d] at `slots`. cos/sin [positions, d] full-width
 * tables. d % 16 == 0. */
void rope_and_cache(const void *qkv, int qkv_bf16, int64_t t, int64_t hq, int64_t hkv, int64_t d,
                    const float *cos, const float *sin, const int64_t *positions,
                    const int64_t *slots, void *k_cache, void *v_cache, float *q_out,
                    float *k_out, int bf) {
    const int64_t width = (hq + 2 * hkv) * d;
#pragma omp parallel if (t >= ROWWISE_PARALLEL_MIN)
    {
        float *wide = qkv_bf16 ? malloc(width * sizeof(float)) : NULL;
#pragma omp for
        for (int64_t i = 0; i < t; i++) {
            const float *row = (const float *)qkv + i * width;
            if (qkv_bf16) {
                for (int64_t j = 0; j < width; j += 8)
                    _mm256_storeu_ps(wide + j, load_bf16((const uint16_t *)qkv + i * width + j));
                row = wide;
            }
            rope_token(row, i, hq, hkv, d, cos + positions[i] * d, sin + positions[i] * d, slots[i] * hkv * d,
                       k_cache, v_cache, q_out, k_out, bf);
        }
        free(wide);
    }
}

/* ---------------------------------------------------------------- SwiGLU */

/* gate_up [m, 2 i] -> out [m, i] = silu(gate) * up. i % 8 == 0. */
void silu_and_mul(const float *gate_up, int64_t m, int64_t i, float *out) {
#pragma omp parallel for if (m >= ROWWISE_PARALLEL_MIN)
    for (int64_t r = 0; r < m; r++) {
        const float *g = gate_up + r * 2 * i, *u = g + i;
        for (int64_t j = 0; j < i; j += 8)
            _mm256_storeu_ps(out + r * i + j, swiglu8(_mm256_loadu_ps(g + j), _mm256_loadu_ps(u + j)));
    }
}

/* ---------------------------------------------------------------- greedy sampling */

/* out[i] = the index of row i's largest value, the first of equal ones, or of its first NaN:
 * torch.argmax's answer. x [m, n] fp32, rows in parallel. Each lane keeps the first index of
 * its strictly larger values, so ties between lanes go to the smaller index. */
void argmax_rows(const float *x, int64_t m, int64_t n, int64_t *out, int nthreads) {
#pragma omp parallel for num_threads(nthreads) if (m > 1)
    for (int64_t i = 0; i < m; i++) {
        const float *r = x + i * n;
        int64_t arg = 0, j = 0;
        float top = r[0];
        int nan = top != top;
        if (n >= 8) {
            __m256 best = _mm256_loadu_ps(r), unordered = _mm256_cmp_ps(best, best, _CMP_UNORD_Q);
            __m256i at = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), idx = at;
            const __m256i eight = _mm256_set1_epi32(8);
            for (j = 8; j + 8 <= n; j += 8) {
                const __m256 v = _mm256_loadu_ps(r + j), gt = _mm256_cmp_ps(v, best, _CMP_GT_OQ);
                idx = _mm256_add_epi32(idx, eight);
                unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
                best = _mm256_blendv_ps(best, v, gt);
                at = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(at), _mm256_castsi256_ps(idx), gt));
            }
            float bv[8];
            int32_t bi[8];
            _mm256_storeu_ps(bv, best);
            _mm256_storeu_si256((__m256i *)bi, at);
            nan = _mm256_movemask_ps(unordered) != 0;
            top = bv[0], arg = bi[0];
            for (int l = 1; l < 8; l++)
                if (bv[l] > top || (bv[l] == top && bi[l] < arg)) top = bv[l], arg = bi[l];
        } else {
            j = 1;
        }
        for (; j < n; j++) { /* the tail, past every index above */
            nan |= r[j] != r[j];
            if (r[j] > top) top = r[j], arg = j;
        }
        if (nan)
            for (arg = 0; r[arg] == r[arg]; arg++) {}
        out[i] = arg;
    }
}

/* ---------------------------------------------------------------- shared-memory all-reduce */

/* The tensor-parallel ranks of one machine all-reduce through a shared segment: per rank a
 * 64-byte line of flags (ready, done) and a buffer, `stride` bytes apart (parallel/shm.py lays
 * it out and runs the protocol; these are its steps). x86 keeps stores in order, and the flags
 * are written with release and read with acquire semantics, so a rank that sees a peer's flag
 * sees the data written before it. */

/* Spin until flag `which` of every rank's line holds at least `target`; 0 when it does, 1 when
 * `timeout_us` passed first (the caller checks that its peers are alive, then waits again). */
int shm_wait(const char *lines, int64_t stride, int world, int which, int64_t target, int64_t timeout_us) {
    struct timespec t0, t;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int r = 0; r < world; r++) {
        const int64_t *flag = (const int64_t *)(lines + r * stride) + which;
        for (int64_t spins = 0; __atomic_load_n(flag, __ATOMIC_ACQUIRE) < target; spins++) {
            _mm_pause();
            if ((spins & 1023) == 1023) {
                clock_gettime(CLOCK_MONOTONIC, &t);
                if ((t.tv_sec - t0.tv_sec) * 1000000 + (t.tv_nsec - t0.tv_nsec) / 1000 > timeout_us) return 1;
            }
        }
    }
    return 0;
}

void shm_publish(char *line, int which, int64_t value) {
    __atomic_store_n((int64_t *)line + which, value, __ATOMIC_RELEASE);
}

/* out[0, n) = the sum over ranks of the n values at `data` (offset `stride` bytes per rank), in
 * rank order on every rank, so all ranks hold the same bits: fp32, or bf16 (BF) summed in fp32
 * and rounded once (to nearest even). */
void shm_sum(const char *data, int64_t stride, int world, int64_t n, int bf, void *out) {
    int64_t i = 0;
    if (!bf) {
        float *o = out;
        for (; i + 8 <= n; i += 8) {
            __m256 acc = _mm256_loadu_ps((const float *)data + i);
            for (int r = 1; r < world; r++)
                acc = _mm256_add_ps(acc, _mm256_loadu_ps((const float *)(data + r * stride) + i));
            _mm256_storeu_ps(o + i, acc);
        }
        for (; i < n; i++) {
            float acc = ((const float *)data)[i];
            for (int r = 1; r < world; r++) acc += ((const float *)(data + r * stride))[i];
            o[i] = acc;
        }
        return;
    }
    uint16_t *o = out;
    const __m256i round = _mm256_set1_epi32(0x7fff), one = _mm256_set1_epi32(1);
    const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff), inf = _mm256_set1_epi32(0x7f800000);
    for (; i + 8 <= n; i += 8) {
        __m256 acc = load_bf16((const uint16_t *)data + i);
        for (int r = 1; r < world; r++) acc = _mm256_add_ps(acc, load_bf16((const uint16_t *)(data + r * stride) + i));
        const __m256i b = _mm256_castps_si256(acc);
        const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), one);
        __m256i h = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(round, lsb)), 16);
        const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(b, abs_mask), inf);
        h = _mm256_blendv_epi8(h, _mm256_or_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(0x40)), nan);
        _mm_storeu_si128((__m128i *)(o + i), _mm_packus_epi32(_mm256_castsi256_si128(h),
                                                               _mm256_extracti128_si256(h, 1)));
    }
    for (; i < n; i++) {
        float acc = 0.f;
        for (int r = 0; r < world; r++) acc += element(data + r * stride, 1, i);
        uint32_t bits;
        __builtin_memcpy(&bits, &acc, 4);
        if ((bits & 0x7fffffff) > 0x7f800000) o[i] = (uint16_t)((bits >> 16) | 0x40); /* NaN stays NaN */
        else o[i] = (uint16_t)((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
    }
}

/* ---------------------------------------------------------------- a whole decode step */

/* PANELS_SWIGLU_*: a gate-up weight in `pack_swiglu_panels` order (n = 2 * intermediate), whose
 * product is the SwiGLU activation itself. PAIR_*: `pack_pair_panels` (AVX-512 BF16 builds). */
enum { DENSE_F32 = 0, DENSE_BF16 = 1, INT8 = 2, INT4 = 3, PANELS_F32 = 4, PANELS_SWIGLU_F32 = 5, PANELS_BF16 = 6,
       PANELS_SWIGLU_BF16 = 7, PAIR_PANELS_BF16 = 8, PAIR_PANELS_SWIGLU_BF16 = 9 };

typedef struct {
    int32_t kind, pad;
    int64_t n, k, group;
    const void *w;
    const float *s, *z, *bias; /* scales and zero points of quantized kinds; bias or NULL */
} Linear;

typedef struct {
    Linear qkv, o, gate_up, down;
    const float *input_norm, *post_norm;
    void *k_cache, *v_cache; /* fp32, or bf16 with kv_bf16 */
} Layer;

typedef struct {
    int64_t hidden, hq, hkv, d, inter, block_size, num_layers, kv_bf16;
    float eps, scale;
    const float *cos, *sin, *final_norm;
    const Layer *layers;
} Decoder;

/* Whether `l` multiplies bf16 pairs: it takes x in bf16 (its operand as stored, no rounding
 * pass of its own) and can give a bf16 y. */
static int takes_bf16(const Linear *l) { return l->kind == PAIR_PANELS_BF16 || l->kind == PAIR_PANELS_SWIGLU_BF16; }

/* y = x W^T (+ bias): x and y fp32, or bf16 where `takes_bf16(l)` and `xbf16` / `ybf16` say so
 * (a bias needs an fp32 y). */
static void linear_forward(const Linear *l, const void *x, int xbf16, int64_t m, void *y, int ybf16, int nthreads) {
    switch (l->kind) {
        case DENSE_F32: matmul_f32(x, m, l->k, l->w, l->n, y, nthreads); break;
        case DENSE_BF16: matmul_bf16(x, m, l->k, l->w, l->n, y, nthreads); break;
        case INT8: matmul_int8(x, m, l->k, l->w, l->s, l->n, y, nthreads); break;
        case PANELS_F32: matmul_panels_f32(x, m, l->k, l->w, l->n, y, 0, nthreads); break;
        case PANELS_SWIGLU_F32: matmul_panels_f32(x, m, l->k, l->w, l->n, y, 1, nthreads); break;
        case PANELS_BF16: matmul_panels_bf16(x, m, l->k, l->w, l->n, y, 0, nthreads); break;
        case PANELS_SWIGLU_BF16: matmul_panels_bf16(x, m, l->k, l->w, l->n, y, 1, nthreads); break;
#if PANEL_PAIRS && defined(__AVX512BF16__)
        case PAIR_PANELS_BF16: matmul_pair_panels_bf16(x, xbf16, m, l->k, l->w, l->n, y, ybf16, 0, nthreads); break;
        case PAIR_PANELS_SWIGLU_BF16:
            matmul_pair_panels_bf16(x, xbf16, m, l->k, l->w, l->n, y, ybf16, 1, nthreads);
            break;
#endif
        case INT4: matmul_int4(x, m, l->k, l->group, l->w, l->s, l->z, l->n, y, nthreads); break;
    }
    if (l->bias)
        for (int64_t i = 0; i < m; i++)
            for (int64_t j = 0; j < l->n; j++) ((float *)y)[i * l->n + j] += l->bias[j];
}

/* Every decoder layer for m single-token decodes, then the final norm: x [m, hidden] (the
 * token embeddings) -> out [m, hidden]. The same math as the model's modules, without a
 * return to Python between them. The residual stream and the projections' outputs stay fp32;
 * a linear that multiplies bf16 pairs gets its input in bf16 from the op that makes it (norm,
 * attention, SwiGLU), rounded as the linear would round it itself. */
void decode_step(const Decoder *dec, const float *x, int64_t m, const int64_t *positions,
                 const int64_t *slots, const int64_t *tables, int64_t max_blocks,
                 const int64_t *ctx, float *out, int nthreads) {
    const int64_t hs = dec->hidden, qd = dec->hq * dec->d, kvd = dec->hkv * dec->d;
    /* h and act hold fp32 or bf16, as their linear takes them. */
    float *residual = malloc(m * hs * sizeof(float)), *h = malloc(m * hs * sizeof(float));
    float *tmp = malloc(m * hs * sizeof(float)), *qkv = malloc(m * (qd + 2 * kvd) * sizeof(float));
    float *q = malloc(m * qd * sizeof(float)), *k = malloc(m * kvd * sizeof(float));
    float *attn = malloc(m * qd * sizeof(float)), *gate_up = malloc(m * 2 * dec->inter * sizeof(float));
    float *act = malloc(m * dec->inter * sizeof(float));
    uint16_t *attn_bf16 = malloc(m * qd * sizeof(uint16_t));
    for (int64_t i = 0; i < m * hs; i++) residual[i] = x[i];
    for (int64_t l = 0; l < dec->num_layers; l++) {
        const Layer *L = dec->layers + l;
        const int32_t gk = L->gate_up.kind;
        const int swiglu = gk == PANELS_SWIGLU_F32 || gk == PANELS_SWIGLU_BF16 || gk == PAIR_PANELS_SWIGLU_BF16;
        const int qkv_b = takes_bf16(&L->qkv), o_b = takes_bf16(&L->o), gate_up_b = takes_bf16(&L->gate_up);
        const int act_b = swiglu && gate_up_b && takes_bf16(&L->down); /* SwiGLU gives bf16 itself */
        if (l == 0)
            rms_norm_rows(residual, NULL, m, hs, L->input_norm, dec->eps, NULL, h, qkv_b);
        else /* residual += previous layer's output, then normalise */
            rms_norm_rows(tmp, residual, m, hs, L->input_norm, dec->eps, residual, h, qkv_b);
        linear_forward(&L->qkv, h, qkv_b, m, qkv, 0, nthreads);
        rope_and_cache(qkv, 0, m, dec->hq, dec->hkv, dec->d, dec->cos, dec->sin, positions, slots,
                       L->k_cache, L->v_cache, q, k, (int)dec->kv_bf16);
        paged_decode_rows(q, m, dec->hq, dec->hkv, dec->d, L->k_cache, L->v_cache, (int)dec->kv_bf16,
                          dec->block_size, tables, max_blocks, ctx, dec->scale, attn, o_b ? attn_bf16 : NULL,
                          nthreads);
        linear_forward(&L->o, o_b ? (void *)attn_bf16 : attn, o_b, m, tmp, 0, nthreads);
        rms_norm_rows(tmp, residual, m, hs, L->post_norm, dec->eps, residual, h, gate_up_b);
        if (swiglu) {
            linear_forward(&L->gate_up, h, gate_up_b, m, act, act_b, nthreads);
        } else {
            linear_forward(&L->gate_up, h, gate_up_b, m, gate_up, 0, nthreads);
            silu_and_mul(gate_up, m, dec->inter, act);
        }
        linear_forward(&L->down, act, act_b, m, tmp, 0, nthreads);
    }
    rms_norm(tmp, residual, m, hs, dec->final_norm, dec->eps, residual, out);
    free(residual); free(h); free(tmp); free(qkv); free(q); free(k); free(attn); free(gate_up); free(act);
    free(attn_bf16);
}
