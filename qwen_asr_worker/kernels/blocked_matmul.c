/*
 * Matrix products for decoding with weights in a blocked layout: y = x @ W.T, with W int8 (one float scale per
 * output row, applied to the sum) or bfloat16, and x, y in bfloat16 or float32. Built on the machine that runs it
 * (qwen_asr_worker/cpu_kernels.py), with -march=native, so the vector width is the CPU's own.
 *
 * Why not torch's kernels: on a decode step (one to a few rows of x) torch's weight-only int8 kernel streams the
 * weights at about 0.8 of the memory bandwidth `torch.sum` reaches, because it reads four rows of W side by side,
 * four streams per thread; and oneDNN packs bfloat16 weights only on CPUs with AVX-512 or AVX-NE-CONVERT, so on an
 * AVX2-only CPU a bfloat16 product has no fast kernel at all. Here W is stored in blocks: four output rows, then for
 * each 16 input columns the four rows' 16 values one after another, so a block is one sequential stream. The int8
 * loop prefetches ahead of it; the bfloat16 stream (twice the bytes a step) measured faster without software
 * prefetch, 24.7 against 21.1 GB/s in one process, so it leaves that to the hardware. A bfloat16 weight is widened to float32 in registers (a shift: bfloat16 is the top
 * half of a float32), so the products and sums are float32 on any CPU with AVX2 and FMA.
 *
 * Layout of W (N rows, K columns, N % 4 == 0, K % 16 == 0): element (n, k) lives at
 *   (n / 4) * 4 * K + (k / 16) * 64 + (n % 4) * 16 + k % 16.
 * Products are accumulated with fused multiply-adds in float32 (one rounding per step; an int8 or bfloat16 weight
 * times a bfloat16 input is exact before it), sums are float32, and the result is rounded once to y's type (round
 * to nearest even, as torch does).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#define ROWS 4      /* output rows per block */
#define CHUNK 16    /* input columns per row in one run of values */
#define AHEAD 1024  /* bytes of the block stream prefetched ahead */

enum { W_INT8 = 0, W_BF16 = 1 }; /* the weight's kind: a compile-time constant wherever it is tested */

static inline float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* Which vector code this build has: 512 (AVX-512), 256 (AVX2) or 0 (none: the caller must not use it). */
int qa_int8_vector_bits(void) {
#if defined(__AVX512F__)
    return 512;
#elif defined(__AVX2__) && defined(__FMA__)
    return 256;
#else
    return 0;
#endif
}

#if defined(__AVX512F__)
#define TILE 4 /* rows of x per pass over a block: 4 x 4 accumulators of 16 floats */
/* Sixteen weights of row j at chunk p (int8 or bfloat16) as float32. */
static inline __attribute__((always_inline)) __m512 load_w16(const void *p, int j, const int wk) {
    if (wk == W_BF16) {
        __m256i v = _mm256_loadu_si256((const __m256i *)((const uint16_t *)p + j * CHUNK));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
    }
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)((const int8_t *)p + j * CHUNK))));
}
/* Always inlined with constant `mt` and `wk`, so the accumulators stay in registers and the row loop unrolls. */
static inline __attribute__((always_inline)) void block_dot_n(const float *xf, const int mt, int64_t K,
                                                              const char *p, const int wk, float out[TILE][ROWS]) {
    const int64_t step = ROWS * CHUNK * (wk == W_BF16 ? 2 : 1); /* bytes of one chunk of the block */
    __m512 acc[TILE][ROWS];
    for (int m = 0; m < TILE; m++)
        for (int j = 0; j < ROWS; j++) acc[m][j] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += CHUNK, p += step) {
        if (wk == W_INT8) _mm_prefetch(p + AHEAD, _MM_HINT_T0);
        __m512 w[ROWS];
        for (int j = 0; j < ROWS; j++) w[j] = load_w16(p, j, wk);
        for (int m = 0; m < TILE; m++) {
            if (m < mt) {
                __m512 xv = _mm512_loadu_ps(xf + k * TILE + m * CHUNK);
                __asm__("" : "+v"(xv)); /* load x once per row, not once per product (the loads were the limit) */
                for (int j = 0; j < ROWS; j++) acc[m][j] = _mm512_fmadd_ps(w[j], xv, acc[m][j]);
            }
        }
    }
    for (int m = 0; m < mt; m++)
        for (int j = 0; j < ROWS; j++) out[m][j] = _mm512_reduce_add_ps(acc[m][j]);
}
#elif defined(__AVX2__) && defined(__FMA__)
#define TILE 2 /* 2 x 4 accumulators of 8 floats: AVX2 has 16 registers */
static float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
/* Eight weights of row j at chunk p, from column `half` (int8 or bfloat16), as float32. */
static inline __attribute__((always_inline)) __m256 load_w8(const void *p, int j, int half, const int wk) {
    if (wk == W_BF16) {
        __m128i v = _mm_loadu_si128((const __m128i *)((const uint16_t *)p + j * CHUNK + half));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
    }
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)p + j * CHUNK + half))));
}
static inline __attribute__((always_inline)) void block_dot_n(const float *xf, const int mt, int64_t K,
                                                              const char *p, const int wk, float out[TILE][ROWS]) {
    const int64_t step = ROWS * CHUNK * (wk == W_BF16 ? 2 : 1);
    __m256 acc[TILE][ROWS];
    for (int m = 0; m < TILE; m++)
        for (int j = 0; j < ROWS; j++) acc[m][j] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += CHUNK, p += step) {
        if (wk == W_INT8) _mm_prefetch(p + AHEAD, _MM_HINT_T0);
        for (int half = 0; half < CHUNK; half += 8) {
            __m256 w[ROWS];
            for (int j = 0; j < ROWS; j++) w[j] = load_w8(p, j, half, wk);
            for (int m = 0; m < TILE; m++) {
                if (m < mt) {
                    __m256 xv = _mm256_loadu_ps(xf + k * TILE + m * CHUNK + half);
                    __asm__("" : "+x"(xv));
                    for (int j = 0; j < ROWS; j++) acc[m][j] = _mm256_fmadd_ps(w[j], xv, acc[m][j]);
                }
            }
        }
    }
    for (int m = 0; m < mt; m++)
        for (int j = 0; j < ROWS; j++) out[m][j] = hsum256(acc[m][j]);
}
#endif

#if defined(TILE)
static inline __attribute__((always_inline)) void block_dot(const float *xf, int64_t mt, int64_t K, const char *p,
                                                            const int wk, float out[TILE][ROWS]) {
    switch (mt) {
    case 1: block_dot_n(xf, 1, K, p, wk, out); break;
    case 2: block_dot_n(xf, 2, K, p, wk, out); break;
#if TILE == 4
    case 3: block_dot_n(xf, 3, K, p, wk, out); break;
    case 4: block_dot_n(xf, 4, K, p, wk, out); break;
#endif
    }
}

/* y (M x N) = x (M x K) @ W.T, times `scale` per output row when it is not NULL; 0, or -1 if out of memory. */
static inline __attribute__((always_inline)) int blocked_matmul(const void *x, int bf16, const void *w, const int wk,
                                                                const float *scale, void *y, int64_t M, int64_t N,
                                                                int64_t K, int threads) {
    /* x as float32, a tile of TILE rows at a time, interleaved by CHUNK columns: (tile, k / CHUNK, row, k % CHUNK),
     * so the tile's values for one chunk are one run of memory, read in the order the loop uses them. */
    int64_t tiles = (M + TILE - 1) / TILE;
    float *xf = malloc(sizeof(float) * (size_t)(tiles * TILE * K));
    if (xf == NULL) return -1;
    for (int64_t m = 0; m < M; m++) {
        float *row = xf + (m / TILE) * TILE * K + (m % TILE) * CHUNK;
        for (int64_t k = 0; k < K; k++) {
            int64_t i = m * K + k;
            float v = bf16 ? bf16_to_f32(((const uint16_t *)x)[i]) : ((const float *)x)[i];
            row[(k / CHUNK) * TILE * CHUNK + k % CHUNK] = v;
        }
    }
    const int64_t size = wk == W_BF16 ? 2 : 1;
    int64_t blocks = N / ROWS;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; b++) {
        const char *p = (const char *)w + b * ROWS * K * size;
        for (int64_t m0 = 0; m0 < M; m0 += TILE) {
            int64_t mt = M - m0 < TILE ? M - m0 : TILE;
            float out[TILE][ROWS];
            block_dot(xf + m0 * K, mt, K, p, wk, out); /* m0 is a multiple of TILE */
            for (int64_t m = 0; m < mt; m++) {
                for (int j = 0; j < ROWS; j++) {
                    int64_t n = b * ROWS + j, at = (m0 + m) * N + n;
                    float v = scale ? out[m][j] * scale[n] : out[m][j];
                    if (bf16)
                        ((uint16_t *)y)[at] = f32_to_bf16(v);
                    else
                        ((float *)y)[at] = v;
                }
            }
        }
    }
    free(xf);
    return 0;
}
#endif

/*
 * y (M x N) = (x (M x K) @ W.T) * scale, W int8. x and y are bfloat16 when `bf16` is nonzero, else float32; scale
 * is float32. Returns 0, or -1 when this build has no vector code or memory ran out (y untouched then).
 */
int qa_int8_matmul(const void *x, int bf16, const int8_t *w, const float *scale, void *y, int64_t M, int64_t N,
                   int64_t K, int threads) {
#if defined(TILE)
    return blocked_matmul(x, bf16, w, W_INT8, scale, y, M, N, K, threads);
#else
    (void)x, (void)bf16, (void)w, (void)scale, (void)y, (void)M, (void)N, (void)K, (void)threads;
    return -1;
#endif
}

/*
 * y (M x N) = x (M x K) @ W.T, W bfloat16 (its bits as uint16). x and y are bfloat16 when `bf16` is nonzero, else
 * float32. Returns 0, or -1 when this build has no vector code or memory ran out (y untouched then).
 */
int qa_bf16_matmul(const void *x, int bf16, const uint16_t *w, void *y, int64_t M, int64_t N, int64_t K,
                   int threads) {
#if defined(TILE)
    return blocked_matmul(x, bf16, w, W_BF16, NULL, y, M, N, K, threads);
#else
    (void)x, (void)bf16, (void)w, (void)y, (void)M, (void)N, (void)K, (void)threads;
    return -1;
#endif
}

/*
 * Rows [row0, row0 + rows) of a blocked W (int8, or bfloat16 when `w_bf16`), row-major, in bfloat16 or float32
 * (`bf16`; both hold int8's -127..127 exactly, and float32 holds every bfloat16): for products with many rows of x,
 * which a general matrix product does better than the kernel, and for looking rows up (an embedding).
 */
void qa_blocked_unpack(const void *w, int w_bf16, int bf16, void *out, int64_t K, int64_t row0, int64_t rows,
                       int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
        int64_t n = row0 + r, first = (n / ROWS) * ROWS * K + (n % ROWS) * CHUNK;
        /* One loop per case, each simple enough to vectorize (a float32 copy of a prompt's weights is on the
         * prompt's critical path). */
        for (int64_t k = 0; k < K; k += CHUNK, first += ROWS * CHUNK) {
            if (w_bf16 && bf16) {
                memcpy((uint16_t *)out + r * K + k, (const uint16_t *)w + first, CHUNK * sizeof(uint16_t));
            } else if (w_bf16) {
                const uint16_t *src = (const uint16_t *)w + first;
                uint32_t *dst = (uint32_t *)out + r * K + k; /* float32 bits: bfloat16's, shifted up */
                for (int i = 0; i < CHUNK; i++) dst[i] = (uint32_t)src[i] << 16;
            } else if (bf16) {
                const int8_t *src = (const int8_t *)w + first;
                for (int i = 0; i < CHUNK; i++) ((uint16_t *)out)[r * K + k + i] = f32_to_bf16((float)src[i]);
            } else {
                const int8_t *src = (const int8_t *)w + first;
                float *dst = (float *)out + r * K + k;
                for (int i = 0; i < CHUNK; i++) dst[i] = (float)src[i];
            }
        }
    }
}
