/*
 * The operators between a decoder layer's matrix products, for a step that adds one token per sequence
 * (qwen_asr_worker/decode_step.py, `DecodeLayer`). In torch they are about sixty small operators per layer, each
 * a few microseconds of dispatch for a few kilobytes of work; here they are three calls (the MLP's SiLU and
 * product stay two torch operators, which are as fast).
 *
 * Values are bfloat16 (`bf16` nonzero) or float32, as the model's. Each function rounds to that type where the
 * stock layer's torch operators do (after a norm's scaling, after the weight, after each rotary product and
 * their sum, after a residual sum, the attention's output), and computes in float32 between (built with
 * -ffp-contract=off, so a*b + c keeps both roundings). Results are the stock layer's within rounding, not to the
 * bit: float32 sums run in their own order, the softmax's exp is a polynomial within 2 ulp, and torch's bf16
 * attention rounds its weights to bf16, which here only the AVX-512 BF16 code does (`group_bf16`).
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

static inline float load(const void *p, int64_t i, int bf16) {
    if (!bf16) return ((const float *)p)[i];
    uint32_t u = (uint32_t)((const uint16_t *)p)[i] << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline float round_to(float f, int bf16) {
    if (!bf16) return f;
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return f; /* NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    u &= 0xffff0000u;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline void store(void *p, int64_t i, float f, int bf16) {
    if (!bf16) {
        ((float *)p)[i] = f;
        return;
    }
    uint32_t u;
    f = round_to(f, 1);
    memcpy(&u, &f, sizeof u);
    ((uint16_t *)p)[i] = (uint16_t)(u >> 16);
}

/* sum_i q[i] * row[at + i] and acc[i] += p * row[at + i], for one cached key or value row (dim a multiple of
 * the vector width in practice; the tail is scalar). */
#if defined(__AVX512F__)
#include <immintrin.h>
static inline __m512 load16(const void *p, int64_t i, int bf16) {
    if (!bf16) return _mm512_loadu_ps((const float *)p + i);
    __m256i half = _mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}
static inline float dot_row(const float *q, const void *row, int64_t at, int64_t dim, int bf16) {
    __m512 acc = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= dim; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), load16(row, at + i, bf16), acc);
    float sum = _mm512_reduce_add_ps(acc);
    for (; i < dim; i++) sum += q[i] * load(row, at + i, bf16);
    return sum;
}
static inline void axpy_row(float *acc, float p, const void *row, int64_t at, int64_t dim, int bf16) {
    __m512 scale = _mm512_set1_ps(p);
    int64_t i = 0;
    for (; i + 16 <= dim; i += 16)
        _mm512_storeu_ps(acc + i, _mm512_fmadd_ps(scale, load16(row, at + i, bf16), _mm512_loadu_ps(acc + i)));
    for (; i < dim; i++) acc[i] += p * load(row, at + i, bf16);
}
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
static inline __m256 load8(const void *p, int64_t i, int bf16) {
    if (!bf16) return _mm256_loadu_ps((const float *)p + i);
    __m128i half = _mm_loadu_si128((const __m128i *)((const uint16_t *)p + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}
static inline float dot_row(const float *q, const void *row, int64_t at, int64_t dim, int bf16) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= dim; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8(row, at + i, bf16), acc);
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    float sum = _mm_cvtss_f32(s);
    for (; i < dim; i++) sum += q[i] * load(row, at + i, bf16);
    return sum;
}
static inline void axpy_row(float *acc, float p, const void *row, int64_t at, int64_t dim, int bf16) {
    __m256 scale = _mm256_set1_ps(p);
    int64_t i = 0;
    for (; i + 8 <= dim; i += 8)
        _mm256_storeu_ps(acc + i, _mm256_fmadd_ps(scale, load8(row, at + i, bf16), _mm256_loadu_ps(acc + i)));
    for (; i < dim; i++) acc[i] += p * load(row, at + i, bf16);
}
#else
static inline float dot_row(const float *q, const void *row, int64_t at, int64_t dim, int bf16) {
    float sum = 0.0f;
    for (int64_t i = 0; i < dim; i++) sum += q[i] * load(row, at + i, bf16);
    return sum;
}
static inline void axpy_row(float *acc, float p, const void *row, int64_t at, int64_t dim, int bf16) {
    for (int64_t i = 0; i < dim; i++) acc[i] += p * load(row, at + i, bf16);
}
#endif

/* exp(x) for x <= 0 (softmax after subtracting the maximum): Cephes' single-precision polynomial, within 2 ulp
 * of expf; arguments below -87 give exp(-87), about 1.6e-38, which no softmax sum notices. */
#if defined(__AVX512F__)
static inline __m512 exp_nonpositive(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 y = _mm512_set1_ps(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(y, n);
}
#elif defined(__AVX2__) && defined(__FMA__)
static inline __m256 exp_nonpositive(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(scale));
}
#endif

/* score[l] = exp(score[l] - top), 0 where score[l] is -inf (a masked position); returns their sum. */
static float exp_shifted(float *score, int64_t length, float top) {
    float total = 0.0f;
    int64_t l = 0;
    if (top == -INFINITY) { /* every position masked */
        for (; l < length; l++) score[l] = 0.0f;
        return 0.0f;
    }
#if defined(__AVX512F__)
    __m512 sum = _mm512_setzero_ps(), shift = _mm512_set1_ps(top), none = _mm512_set1_ps(-INFINITY);
    for (; l + 16 <= length; l += 16) {
        __m512 v = _mm512_loadu_ps(score + l);
        __mmask16 kept = _mm512_cmp_ps_mask(v, none, _CMP_NEQ_OQ);
        __m512 e = _mm512_maskz_mov_ps(kept, exp_nonpositive(_mm512_sub_ps(v, shift)));
        _mm512_storeu_ps(score + l, e);
        sum = _mm512_add_ps(sum, e);
    }
    total = _mm512_reduce_add_ps(sum);
#elif defined(__AVX2__) && defined(__FMA__)
    __m256 sum = _mm256_setzero_ps(), shift = _mm256_set1_ps(top), none = _mm256_set1_ps(-INFINITY);
    for (; l + 8 <= length; l += 8) {
        __m256 v = _mm256_loadu_ps(score + l);
        __m256 kept = _mm256_cmp_ps(v, none, _CMP_NEQ_OQ);
        __m256 e = _mm256_and_ps(kept, exp_nonpositive(_mm256_sub_ps(v, shift)));
        _mm256_storeu_ps(score + l, e);
        sum = _mm256_add_ps(sum, e);
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, sum);
    for (int i = 0; i < 8; i++) total += lanes[i];
#endif
    for (; l < length; l++) {
        score[l] = score[l] == -INFINITY ? 0.0f : expf(score[l] - top);
        total += score[l];
    }
    return total;
}

/* qwen-asr's RMSNorm of one row of `dim` values: float32 statistics, the scaled value rounded, then the weight.
 * Written to `out` at `oo`, or as (rounded) floats to `out_float` when that is not NULL. */
static void norm_row(const void *x, int64_t xo, const void *w, int64_t wo, void *out, int64_t oo, int64_t dim,
                     float eps, int bf16, float *out_float) {
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < dim; i++) {
        float v = load(x, xo + i, bf16);
        sum += v * v;
    }
    float inv = 1.0f / sqrtf(sum / (float)dim + eps);
    for (int64_t i = 0; i < dim; i++) {
        float h = round_to(load(x, xo + i, bf16) * inv, bf16);
        float v = load(w, wo + i, bf16) * h;
        if (out_float != NULL)
            out_float[i] = round_to(v, bf16);
        else
            store(out, oo + i, v, bf16);
    }
}

/* out[r] = RMSNorm(x[r]) with weight row r % weight_rows (one weight for all rows, or one per head). */
void qa_rms_norm(const void *x, const void *w, void *out, int64_t rows, int64_t dim, int64_t weight_rows, float eps,
                 int bf16) {
    for (int64_t r = 0; r < rows; r++) norm_row(x, r * dim, w, (r % weight_rows) * dim, out, r * dim, dim, eps, bf16, NULL);
}

/* residual_out = residual + delta (rounded), normed = RMSNorm(residual_out): a layer's middle. */
void qa_add_rms_norm(const void *residual, const void *delta, void *residual_out, void *normed, const void *w,
                     int64_t rows, int64_t dim, float eps, int bf16) {
    for (int64_t i = 0; i < rows * dim; i++)
        store(residual_out, i, load(residual, i, bf16) + load(delta, i, bf16), bf16);
    for (int64_t r = 0; r < rows; r++) norm_row(residual_out, r * dim, w, 0, normed, r * dim, dim, eps, bf16, NULL);
}

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define HAVE_BF16_DOT 1
/*
 * One key/value head's attention for its `group` query heads, for bf16 caches with dim a multiple of 32, on CPUs
 * with AVX-512 BF16: scores with `vdpbf16ps` (32 exact bf16 products per instruction, float32 sums), and the
 * weighted sum of values two positions at a time (the two rows interleaved, the two weights rounded to bf16, as
 * torch's bf16 attention rounds them). Writes acc (group x dim floats, unnormalized), the scores as weights, their
 * maxima and sums, and which query heads met a NaN.
 */
static void group_bf16(const float *q, const uint16_t *keys, const uint16_t *values, int64_t length, int64_t dim,
                       int64_t group, const uint8_t *keep, float scaling, float *score, float *top, float *total,
                       float *acc, int *broken) {
    int64_t chunks = dim / 32;
    __m512bh qv[group * chunks];
    for (int64_t j = 0; j < group; j++)
        for (int64_t c = 0; c < chunks; c++)
            qv[j * chunks + c] = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(q + j * dim + c * 32 + 16),
                                                     _mm512_loadu_ps(q + j * dim + c * 32));
    for (int64_t j = 0; j < group; j++) top[j] = -INFINITY;
    for (int64_t l = 0; l < length; l++) {
        int kept = keep == NULL || keep[l];
        for (int64_t j = 0; j < group; j++) {
            float v = -INFINITY;
            if (kept) {
                __m512 sum = _mm512_setzero_ps();
                for (int64_t c = 0; c < chunks; c++) {
                    __m512bh k = (__m512bh)_mm512_loadu_si512((const void *)(keys + l * dim + c * 32));
                    sum = _mm512_dpbf16_ps(sum, k, qv[j * chunks + c]);
                }
                v = _mm512_reduce_add_ps(sum) * scaling;
            }
            score[j * length + l] = v;
            if (v > top[j]) top[j] = v;
            if (v != v) broken[j] = 1;
        }
    }
    for (int64_t j = 0; j < group; j++) total[j] = exp_shifted(score + j * length, length, top[j]);
    /* acc lanes: per 32-column chunk, `lo` holds columns 8k..8k+3 and `hi` 8k+4..8k+7 of each 8-column lane k */
    __m512 lo[group * chunks], hi[group * chunks];
    for (int64_t i = 0; i < group * chunks; i++) lo[i] = hi[i] = _mm512_setzero_ps();
    for (int64_t l = 0; l < length; l += 2) {
        int pair = l + 1 < length;
        const uint16_t *v0 = values + l * dim, *v1 = pair ? v0 + dim : v0;
        for (int64_t j = 0; j < group; j++) {
            float p0 = score[j * length + l], p1 = pair ? score[j * length + l + 1] : 0.0f;
            if (p0 == 0.0f && p1 == 0.0f) continue;
            uint32_t b0, b1;
            float r0 = round_to(p0, 1), r1 = round_to(p1, 1);
            memcpy(&b0, &r0, 4);
            memcpy(&b1, &r1, 4);
            __m512bh weights = (__m512bh)_mm512_set1_epi32((int)((b1 & 0xffff0000u) | (b0 >> 16)));
            for (int64_t c = 0; c < chunks; c++) {
                __m512i a = _mm512_loadu_si512((const void *)(v0 + c * 32));
                __m512i b = _mm512_loadu_si512((const void *)(v1 + c * 32));
                lo[j * chunks + c] = _mm512_dpbf16_ps(lo[j * chunks + c], (__m512bh)_mm512_unpacklo_epi16(a, b), weights);
                hi[j * chunks + c] = _mm512_dpbf16_ps(hi[j * chunks + c], (__m512bh)_mm512_unpackhi_epi16(a, b), weights);
            }
        }
    }
    for (int64_t j = 0; j < group; j++) {
        for (int64_t c = 0; c < chunks; c++) {
            float l16[16], h16[16];
            _mm512_storeu_ps(l16, lo[j * chunks + c]);
            _mm512_storeu_ps(h16, hi[j * chunks + c]);
            for (int i = 0; i < 16; i++) {
                int64_t column = c * 32 + 8 * (i / 4) + i % 4;
                acc[j * dim + column] = l16[i];
                acc[j * dim + column + 4] = h16[i];
            }
        }
    }
}
#endif

/*
 * One token's attention block after the q/k/v product, for `batch` sequences at cache position `pos`:
 *   - the query and key heads of `qkv` (heads + kv_heads heads of `dim`, then kv_heads value heads) are normed with
 *     `head_norm` (one weight row per head) and rotated with that sequence's `cos`/`sin` (rotate_half convention);
 *   - the rotated key and the value are written at `pos` in the caches, (batch, kv_heads, capacity, dim);
 *   - each query head attends over positions 0..pos of its group's key/value head (softmax in float32, `scaling`),
 *     where `keep` (batch, pos + 1; NULL: all) is nonzero;
 *   - out (batch, heads * dim) is the attention's output, rounded.
 * Work space: `queries` holds batch * heads * dim floats, `scores` threads * (heads / kv_heads) * (pos + 1).
 */
void qa_attend(const void *qkv, const void *head_norm, float eps, const void *cos, const void *sin, void *key_cache,
               void *value_cache, int64_t capacity, int64_t pos, const uint8_t *keep, float scaling, void *out,
               int64_t batch, int64_t heads, int64_t kv_heads, int64_t dim, float *queries, float *scores,
               int threads, int bf16) {
    int64_t qk_heads = heads + kv_heads, width = (qk_heads + kv_heads) * dim, half = dim / 2, length = pos + 1;
    int64_t group = heads / kv_heads;
    /* Norm and rotate the new query and key heads, cache the key and value: little work, one thread. */
    for (int64_t b = 0; b < batch; b++) {
        for (int64_t h = 0; h < qk_heads; h++) {
            float normed[dim], rotated[dim];
            int64_t at = b * width + h * dim;
            norm_row(qkv, at, head_norm, h * dim, NULL, 0, dim, eps, bf16, normed);
            for (int64_t i = 0; i < dim; i++) {
                float c = load(cos, b * dim + i, bf16), s = load(sin, b * dim + i, bf16);
                float other = i < half ? -normed[i + half] : normed[i - half];
                rotated[i] = round_to(round_to(normed[i] * c, bf16) + round_to(other * s, bf16), bf16);
            }
            if (h < heads) {
                memcpy(queries + (b * heads + h) * dim, rotated, sizeof(float) * (size_t)dim);
            } else {
                int64_t g = h - heads, slot = ((b * kv_heads + g) * capacity + pos) * dim;
                for (int64_t i = 0; i < dim; i++) {
                    store(key_cache, slot + i, rotated[i], bf16);
                    store(value_cache, slot + i, load(qkv, b * width + (qk_heads + g) * dim + i, bf16), bf16);
                }
            }
        }
    }
    /* Each key/value head with its group of query heads: its cached rows are read once for the whole group. */
#pragma omp parallel for schedule(static) num_threads(threads) collapse(2)
    for (int64_t b = 0; b < batch; b++) {
        for (int64_t g = 0; g < kv_heads; g++) {
            float *score = scores + (size_t)omp_get_thread_num() * (size_t)(group * length);
            const float *q = queries + (b * heads + g * group) * dim;
            int64_t base = (b * kv_heads + g) * capacity * dim;
            float top[group], total[group], acc[group * dim];
            int broken[group]; /* a NaN score: the head's output is NaN, as torch's would be, not a silent 0 */
            for (int64_t j = 0; j < group; j++) top[j] = -INFINITY, total[j] = 0.0f, broken[j] = 0;
#if defined(HAVE_BF16_DOT)
            if (bf16 && dim % 32 == 0) {
                group_bf16(q, (const uint16_t *)key_cache + base, (const uint16_t *)value_cache + base, length, dim,
                           group, keep == NULL ? NULL : keep + b * length, scaling, score, top, total, acc, broken);
                goto normalize;
            }
#endif
            for (int64_t l = 0; l < length; l++) {
                int kept = keep == NULL || keep[b * length + l];
                for (int64_t j = 0; j < group; j++) {
                    float v = kept ? dot_row(q + j * dim, key_cache, base + l * dim, dim, bf16) * scaling : -INFINITY;
                    score[j * length + l] = v;
                    if (v > top[j]) top[j] = v;
                    if (v != v) broken[j] = 1;
                }
            }
            for (int64_t j = 0; j < group; j++) total[j] = exp_shifted(score + j * length, length, top[j]);
            for (int64_t i = 0; i < group * dim; i++) acc[i] = 0.0f;
            for (int64_t l = 0; l < length; l++) {
                for (int64_t j = 0; j < group; j++) {
                    float p = score[j * length + l];
                    if (p != 0.0f) axpy_row(acc + j * dim, p, value_cache, base + l * dim, dim, bf16);
                }
            }
#if defined(HAVE_BF16_DOT)
        normalize:
#endif
            for (int64_t j = 0; j < group; j++) {
                float inv = broken[j] ? NAN : total[j] > 0.0f ? 1.0f / total[j] : 0.0f;
                for (int64_t i = 0; i < dim; i++)
                    store(out, (b * heads + g * group + j) * dim + i, acc[j * dim + i] * inv, bf16);
            }
        }
    }
}
