/* Flash-decoding over KV blocks, dequantizing each block inside the attention loop.
 *
 * One call reads one part of the cache (a run of quantized blocks, or full-precision rows)
 * for every (batch row, KV head) and folds it into a running softmax state per query row:
 * m (max score), l (sum of exp(s - m)) and o (sum of exp(s - m) * v, not yet divided by l).
 * Calls chain: the caller passes the state of the parts before, so a decode step is one call
 * per part and one division at the end. Inside a call the part is cut into chunks of blocks
 * that threads work on independently; their states are merged in position order with the
 * log-sum-exp rule, so the result does not depend on the number of threads.
 *
 * A block is dequantized into a small float buffer right before its dot products, so the
 * cache is read once, in its packed form; nothing the size of the cache is ever written.
 * Vector code is GNU C vectors plus AVX2 / AVX-512 intrinsics where the compiler targets them,
 * with plain C fallbacks, so any machine gcc or clang builds for gets a working kernel.
 * The formulas match kvlab.quant (intq, ggml, blocks): code * scale + zero for kivi,
 * (nibble - 8) * d for q4_0, q * d for q8_0, table[code] * scale for fp8.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__F16C__) || defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

typedef float v16f __attribute__((vector_size(64)));

enum { RAW_F32 = 0, RAW_F16 = 1, RAW_BF16 = 2, KIVI = 3, Q8_0 = 4, Q4_0 = 5, FP8 = 6 };

typedef struct {
    int32_t scheme;
    int32_t bits;        /* kivi: 2, 4 or 8 */
    int32_t group;       /* kivi values: channels per scale; unused for keys */
    int32_t per_channel; /* kivi keys: one scale per channel per block ([blocks, d]) */
    const void *data;    /* per head: all blocks back to back */
    const uint16_t *scale; /* kivi: float16 */
    const uint16_t *zero;  /* kivi: float16 */
    const float *fscale;   /* fp8: one float32 per block */
    const float *table;    /* fp8: the value of each of the 256 codes */
} Role;

typedef struct {
    int64_t heads;        /* batch rows * KV heads */
    int64_t rows;         /* query rows per head (query heads per KV head * query length) */
    int64_t dim;          /* head_dim */
    int64_t tokens;       /* positions in this part */
    int64_t block;        /* positions per block (the last block of a raw part may be shorter) */
    int64_t chunk_blocks; /* blocks per unit of work */
    float scale;          /* softmax scale */
    int32_t threads;
} Shape;

static inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) { man <<= 1; exp--; }
            bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
#endif
}

static inline float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Bytes of `values` quantized values (raw rows are addressed as floats, not through this). */
static int64_t block_bytes(const Role *r, int64_t values) {
    switch (r->scheme) {
    case KIVI: return values * r->bits / 8;
    case Q8_0: return values / 32 * 34;
    case Q4_0: return values / 32 * 18;
    default: return values; /* FP8 */
    }
}

/* Codes per byte of a role whose rows are decoded in split order, 1 for natural order.
 *
 * A kivi row packs k = 8 / bits codes per byte, channel k*i + j at byte i, bits j*bits.
 * Unpacking in channel order interleaves, which compilers do not vectorise well; so kivi rows
 * are decoded in split order instead: position j*(d/k) + i holds channel k*i + j, and every
 * run of positions reads consecutive bytes at one shift. Dot products do not care about the
 * order as long as the query is permuted the same way, and value accumulators are put back
 * in channel order at the end of a chunk. */
static inline int64_t split_ways(const Role *r) { return r->scheme == KIVI ? 8 / r->bits : 1; }

static inline int64_t split_channel(int64_t pos, int64_t d, int64_t k) { return k * (pos % (d / k)) + pos / (d / k); }

/* out[i] = code_i * a[i] + z[i], code_i = (row[i] >> shift) & mask: one run of a split-order row,
 * 16 codes at a time in GNU C vectors (whatever the machine's vector width). */

static inline v16f codes16(const uint8_t *row, int shift, unsigned mask) {
    v16f out;
#if defined(__AVX512F__)
    __m512i codes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)row));
    codes = _mm512_and_si512(_mm512_srl_epi32(codes, _mm_cvtsi32_si128(shift)), _mm512_set1_epi32((int)mask));
    const __m512 f = _mm512_cvtepi32_ps(codes);
    memcpy(&out, &f, sizeof out);
#elif defined(__AVX2__)
    const __m128i bytes = _mm_loadu_si128((const __m128i *)row);
    const __m128i count = _mm_cvtsi32_si128(shift);
    const __m256i keep = _mm256_set1_epi32((int)mask);
    const __m256i lo = _mm256_and_si256(_mm256_srl_epi32(_mm256_cvtepu8_epi32(bytes), count), keep);
    const __m256i hi = _mm256_and_si256(_mm256_srl_epi32(_mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8)), count), keep);
    const __m256 flo = _mm256_cvtepi32_ps(lo), fhi = _mm256_cvtepi32_ps(hi);
    memcpy(&out, &flo, sizeof flo);
    memcpy((float *)&out + 8, &fhi, sizeof fhi);
#else
    for (int i = 0; i < 16; i++) out[i] = (float)((row[i] >> shift) & mask);
#endif
    return out;
}

static inline void codes_scaled(const uint8_t *restrict row, int64_t n, int shift, unsigned mask,
                                const float *restrict a, const float *restrict z, float *restrict out) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        v16f va, vz;
        memcpy(&va, a + i, sizeof va);
        memcpy(&vz, z + i, sizeof vz);
        const v16f x = codes16(row + i, shift, mask) * va + vz;
        memcpy(out + i, &x, sizeof x);
    }
    for (; i < n; i++) out[i] = (float)((row[i] >> shift) & mask) * a[i] + z[i];
}

/* The same with one scale and zero for the whole run. */
static inline void codes_affine(const uint8_t *restrict row, int64_t n, int shift, unsigned mask, float a, float z,
                                float *restrict out) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const v16f x = codes16(row + i, shift, mask) * a + z;
        memcpy(out + i, &x, sizeof x);
    }
    for (; i < n; i++) out[i] = (float)((row[i] >> shift) & mask) * a + z;
}

/* Positions [first, first + n) of head `head` as floats `[n, dim]`; returns where they are. */
static const float *load_block(const Role *r, const Shape *s, int64_t head, int64_t blk, int64_t n,
                               float *buf, float *sbuf, float *zbuf) {
    const int64_t d = s->dim, full = s->block * d;
    const int64_t per_head_blocks = (s->tokens + s->block - 1) / s->block;
    const int64_t index = head * per_head_blocks + blk;
    if (r->scheme == RAW_F32)
        return (const float *)r->data + head * s->tokens * d + blk * full;
    if (r->scheme == RAW_F16 || r->scheme == RAW_BF16) {
        const uint16_t *src = (const uint16_t *)r->data + head * s->tokens * d + blk * full;
        if (r->scheme == RAW_F16)
            for (int64_t i = 0; i < n * d; i++) buf[i] = half_to_float(src[i]);
        else
            for (int64_t i = 0; i < n * d; i++) buf[i] = bf16_to_float(src[i]);
        return buf;
    }
    const uint8_t *src = (const uint8_t *)r->data + index * block_bytes(r, full);
    if (r->scheme == KIVI) { /* in split order, see split_ways */
        const int64_t k = 8 / r->bits, w = d / k;
        const unsigned mask = (1u << r->bits) - 1;
        if (r->per_channel) {
            const uint16_t *sc = r->scale + index * d, *ze = r->zero + index * d;
            for (int64_t pos = 0; pos < d; pos++) {
                const int64_t c = split_channel(pos, d, k);
                sbuf[pos] = half_to_float(sc[c]);
                zbuf[pos] = half_to_float(ze[c]);
            }
            for (int64_t t = 0; t < n; t++)
                for (int64_t j = 0; j < k; j++) {
                    codes_scaled(src + t * w, w, (int)(j * r->bits), mask, sbuf + j * w, zbuf + j * w,
                                 buf + t * d + j * w);
                }
        } else { /* groups of g channels: channel k*i + j lies in group i / (g / k) */
            const int64_t g = r->group, per_row = d / g, run = g / k;
            const uint16_t *sc = r->scale + index * s->block * per_row, *ze = r->zero + index * s->block * per_row;
            for (int64_t i = 0; i < n * per_row; i++) { sbuf[i] = half_to_float(sc[i]); zbuf[i] = half_to_float(ze[i]); }
            for (int64_t t = 0; t < n; t++)
                for (int64_t j = 0; j < k; j++)
                    for (int64_t gi = 0; gi < per_row; gi++) {
                        codes_affine(src + t * w + gi * run, run, (int)(j * r->bits), mask, sbuf[t * per_row + gi],
                                     zbuf[t * per_row + gi], buf + t * d + j * w + gi * run);
                    }
        }
        return buf;
    }
    if (r->scheme == Q8_0) {
        for (int64_t b = 0; b < n * d / 32; b++) {
            const uint8_t *blk32 = src + b * 34;
            const float a = half_to_float((uint16_t)(blk32[0] | (blk32[1] << 8)));
            const int8_t *q = (const int8_t *)(blk32 + 2);
            for (int c = 0; c < 32; c++) buf[b * 32 + c] = (float)q[c] * a;
        }
        return buf;
    }
    if (r->scheme == Q4_0) {
        for (int64_t b = 0; b < n * d / 32; b++) {
            const uint8_t *blk32 = src + b * 18, *q = blk32 + 2;
            const float a = half_to_float((uint16_t)(blk32[0] | (blk32[1] << 8)));
            float *out = buf + b * 32;
            for (int c = 0; c < 16; c++) {
                out[c] = (float)((int)(q[c] & 15) - 8) * a;
                out[c + 16] = (float)((int)(q[c] >> 4) - 8) * a;
            }
        }
        return buf;
    }
    /* FP8 */
    const float a = r->fscale[index];
    for (int64_t i = 0; i < n * d; i++) buf[i] = r->table[src[i]] * a;
    return buf;
}

/* q . k over d channels: 16 lanes (one vector register, or two or four on narrower machines)
 * accumulated across the channels, then summed by halving; the order is fixed, so the result
 * does not depend on anything but the inputs. */
typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));

static inline __attribute__((always_inline)) float dot(const float *restrict a, const float *restrict b,
                                                        const int64_t d) {
    v16f acc = {0};
    int64_t c = 0;
    for (; c + 16 <= d; c += 16) {
        v16f x, y;
        memcpy(&x, a + c, sizeof x);
        memcpy(&y, b + c, sizeof y);
        acc += x * y;
    }
#if defined(__clang__) || __GNUC__ >= 12
    v8f h8 = __builtin_shufflevector(acc, acc, 0, 1, 2, 3, 4, 5, 6, 7) +
             __builtin_shufflevector(acc, acc, 8, 9, 10, 11, 12, 13, 14, 15);
    v4f h4 = __builtin_shufflevector(h8, h8, 0, 1, 2, 3) + __builtin_shufflevector(h8, h8, 4, 5, 6, 7);
#else
    v4f h4;
    for (int j = 0; j < 4; j++) h4[j] = (acc[j] + acc[j + 8]) + (acc[j + 4] + acc[j + 12]);
#endif
    float total = (h4[0] + h4[2]) + (h4[1] + h4[3]);
    for (; c < d; c++) total += a[c] * b[c];
    return total;
}

/* The largest and the sum of x[0..n), in 16 lanes (so the loops vectorise). */
static inline float max_of(const float *restrict x, int64_t n) {
    float lane[16];
    for (int j = 0; j < 16; j++) lane[j] = -INFINITY;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++) lane[j] = x[i + j] > lane[j] ? x[i + j] : lane[j];
    float top = -INFINITY;
    for (; i < n; i++) top = x[i] > top ? x[i] : top;
    for (int j = 0; j < 16; j++) top = lane[j] > top ? lane[j] : top;
    return top;
}

static inline float sum_of(const float *restrict x, int64_t n) {
    float lane[16] = {0};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++) lane[j] += x[i + j];
    float total = 0.0f;
    for (; i < n; i++) total += x[i];
    for (int width = 8; width > 0; width /= 2)
        for (int j = 0; j < width; j++) lane[j] += lane[j + width];
    return lane[0] + total;
}

/* x[i] = exp(x[i]) for x <= 0, written so that it vectorises: 2^k * p(r) with k = round(x / ln 2),
 * r = x - k ln 2 in two parts, p the degree-6 Taylor polynomial (relative error < 2e-7 on
 * |r| <= ln2 / 2); below -87 (and for -inf) the result is 0. */
static inline void exp_rows(float *restrict x, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        const float v = x[i] < -87.0f ? -87.0f : x[i];
        const float k = (v * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round to nearest */
        const float r = (v - k * 0.693145751953125f) - k * 1.428606765330187045e-06f;
        float poly = 1.0f / 720.0f;
        poly = poly * r + 1.0f / 120.0f;
        poly = poly * r + 1.0f / 24.0f;
        poly = poly * r + 1.0f / 6.0f;
        poly = poly * r + 0.5f;
        poly = poly * r + 1.0f;
        poly = poly * r + 1.0f;
        const int32_t bits = ((int32_t)k + 127) << 23;
        float two_k;
        memcpy(&two_k, &bits, sizeof two_k);
        x[i] = x[i] < -87.0f ? 0.0f : poly * two_k;
    }
}

/* Fold the state (m2, l2, o2) into (m, l, o): the log-sum-exp merge. */
static void merge_state(float *m, float *l, float *o, float m2, float l2, const float *o2, int64_t d) {
    if (m2 == -INFINITY) return;
    const float top = *m > m2 ? *m : m2;
    const float w1 = *m == -INFINITY ? 0.0f : expf(*m - top), w2 = expf(m2 - top);
    *l = *l * w1 + l2 * w2;
    for (int64_t c = 0; c < d; c++) o[c] = o[c] * w1 + o2[c] * w2;
    *m = top;
}

/* One chunk of blocks of one head, from an empty state into (m, l, o) `[rows]`, `[rows, dim]`.
 * Inlined with `d` a constant for the common head sizes, so the loops over channels unroll and
 * a row of o stays in registers. */
static inline __attribute__((always_inline)) void
attend_chunk_d(const Role *k, const Role *v, const Shape *s, const float *query, const float *mask, int64_t head,
               int64_t first_blk, int64_t last_blk, float *m, float *l, float *restrict o, volatile int *failed,
               const int64_t d) {
    const int64_t R = s->rows, T = s->block;
    /* keys, values, probabilities, and a scale and a zero per value of a block */
    float *kbuf = malloc(sizeof(float) * (4 * T * d + R * T));
    if (!kbuf) {
        *failed = 1;
        return;
    }
    float *vbuf = kbuf + T * d, *p = vbuf + T * d, *sbuf = p + R * T, *zbuf = sbuf + T * d;
    const int64_t kways = split_ways(k), vways = split_ways(v);
    const float *q = query + head * R * d;
    float *qsplit = NULL;
    if (kways > 1) { /* the query in the keys' split order */
        qsplit = malloc(sizeof(float) * R * d);
        if (!qsplit) {
            *failed = 1;
            free(kbuf);
            return;
        }
        for (int64_t r = 0; r < R; r++)
            for (int64_t pos = 0; pos < d; pos++) qsplit[r * d + pos] = q[r * d + split_channel(pos, d, kways)];
        q = qsplit;
    }
    for (int64_t r = 0; r < R; r++) { m[r] = -INFINITY; l[r] = 0.0f; }
    memset(o, 0, sizeof(float) * R * d);
    for (int64_t blk = first_blk; blk < last_blk; blk++) {
        const int64_t start = blk * T, n = (start + T <= s->tokens) ? T : s->tokens - start;
        const float *keys = load_block(k, s, head, blk, n, kbuf, sbuf, zbuf);
        int any = 0;
        for (int64_t r = 0; r < R; r++) {
            const float *restrict qr = q + r * d;
            const float *mr = mask ? mask + (head * R + r) * s->tokens + start : NULL;
            float *restrict pr = p + r * T;
            for (int64_t t = 0; t < n; t++) pr[t] = dot(qr, keys + t * d, d) * s->scale;
            if (mr)
                for (int64_t t = 0; t < n; t++) pr[t] += mr[t];
            const float top = max_of(pr, n);
            if (top == -INFINITY) { /* nothing to attend to in this block */
                for (int64_t t = 0; t < n; t++) pr[t] = 0.0f;
                continue;
            }
            any = 1;
            const float m_new = m[r] > top ? m[r] : top;
            const float w = m[r] == -INFINITY ? 0.0f : expf(m[r] - m_new);
            for (int64_t t = 0; t < n; t++) pr[t] = pr[t] - m_new;
            exp_rows(pr, n);
            const float sum = sum_of(pr, n);
            l[r] = l[r] * w + sum;
            if (w != 1.0f)
                for (int64_t c = 0; c < d; c++) o[r * d + c] *= w;
            m[r] = m_new;
        }
        if (!any) continue;
        const float *restrict values = load_block(v, s, head, blk, n, vbuf, sbuf, zbuf);
        for (int64_t r = 0; r < R; r++) {
            float *restrict orow = o + r * d;
            const float *pr = p + r * T;
            for (int64_t t = 0; t < n; t++) {
                const float w = pr[t];
                const float *restrict vt = values + t * d;
#pragma omp simd
                for (int64_t c = 0; c < d; c++) orow[c] += w * vt[c];
            }
        }
    }
    if (vways > 1) /* back to channel order; sbuf (T * d >= d floats) is free now */
        for (int64_t r = 0; r < R; r++) {
            for (int64_t pos = 0; pos < d; pos++) sbuf[split_channel(pos, d, vways)] = o[r * d + pos];
            memcpy(o + r * d, sbuf, sizeof(float) * d);
        }
    free(qsplit);
    free(kbuf);
}

static void attend_chunk(const Role *k, const Role *v, const Shape *s, const float *query, const float *mask,
                         int64_t head, int64_t first_blk, int64_t last_blk, float *m, float *l, float *o,
                         volatile int *failed) {
    switch (s->dim) {
    case 64: attend_chunk_d(k, v, s, query, mask, head, first_blk, last_blk, m, l, o, failed, 64); break;
    case 128: attend_chunk_d(k, v, s, query, mask, head, first_blk, last_blk, m, l, o, failed, 128); break;
    default: attend_chunk_d(k, v, s, query, mask, head, first_blk, last_blk, m, l, o, failed, s->dim);
    }
}

/* Fold one part into the running state `m`, `l` `[heads, rows]`, `o` `[heads, rows, dim]`.
 * `query` `[heads, rows, dim]`; `mask` additive `[heads, rows, tokens]` or NULL. Returns 0, or
 * -1 when a buffer could not be allocated. */
int kvlab_split_k_part(const Role *k, const Role *v, const Shape *s, const float *query, const float *mask,
                       float *m, float *l, float *o) {
    const int64_t d = s->dim, R = s->rows;
    const int64_t blocks = (s->tokens + s->block - 1) / s->block;
    const int64_t per_chunk = s->chunk_blocks < 1 ? 1 : s->chunk_blocks;
    const int64_t chunks = (blocks + per_chunk - 1) / per_chunk;
    const int64_t tasks = s->heads * chunks;
    if (tasks == 0) return 0;
    float *cm = malloc(sizeof(float) * tasks * R * (2 + d));
    if (!cm) return -1;
    float *cl = cm + tasks * R, *co = cl + tasks * R;
    volatile int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(s->threads > 0 ? s->threads : 1)
    for (int64_t task = 0; task < tasks; task++) {
        const int64_t head = task / chunks, chunk = task % chunks;
        const int64_t first = chunk * per_chunk, last = first + per_chunk < blocks ? first + per_chunk : blocks;
        attend_chunk(k, v, s, query, mask, head, first, last, cm + task * R, cl + task * R, co + task * R * d, &failed);
    }
    if (failed) {
        free(cm);
        return -1;
    }
    for (int64_t head = 0; head < s->heads; head++)
        for (int64_t chunk = 0; chunk < chunks; chunk++) {
            const int64_t task = head * chunks + chunk;
            for (int64_t r = 0; r < R; r++)
                merge_state(m + head * R + r, l + head * R + r, o + (head * R + r) * d, cm[task * R + r],
                            cl[task * R + r], co + (task * R + r) * d, d);
        }
    free(cm);
    return 0;
}
