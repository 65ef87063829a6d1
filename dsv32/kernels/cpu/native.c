/* The lightning indexer's per-row work on CPU, fused where PyTorch would make one pass per op.
 *
 * Built on first use by dsv32/kernels/cpu/native.py (the system C compiler, -O3 -march=native) and called
 * through ctypes; the Python twins in indexer.py are the fallback and the parity reference.
 *
 *   dsv32_index_epilogue: bf16 logits [T, H, n] of one key tile -> fp32 scores
 *       out[t, s] = k_scale[s] * sum_h w[t, h] * ReLU(logit[t, h, s])
 *   dsv32_topk_rows: per row, the k largest scores among the visible keys [ks, ke), ties to the lower
 *       index (reference.select_topk's rule), written in ascending index order, -1 padded.
 *   dsv32_softmax_fwd_bf16 / dsv32_softmax_bwd_bf16: sparse attention's elementwise steps between its matmuls,
 *       one pass each where PyTorch makes several (masking, max, exp, sums, casts).
 *   dsv32_masked_softmax_bf16: masked MHA mode's softmax over each query's selected keys, in place on the
 *       [H, n, w] logits of a query block against its key window.
 *   dsv32_scatter_add_bf16: sparse attention's backward, the gathered latents' bf16 gradients summed into
 *       fp32 rows (index_add_ without the fp32 copy of the source; ~8x faster on CPU).
 *
 * The selection is exact: a strided sample of the row gives a threshold that leaves ~1.3 k candidates (checked
 * to leave at least k), one branch-free pass keeps them, and a radix select on the scores' order-preserving
 * 32-bit codes (11 + 11 + 10 bits) finds the k-th largest; the keys above it and the lowest-indexed keys
 * equal to it are the set. Rows are split over `threads` POSIX threads.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

typedef void (*row_fn)(void *args, int64_t r0, int64_t r1);

struct job {
    row_fn fn;
    void *args;
    int64_t r0, r1;
};

static void *run_job(void *p) {
    struct job *j = (struct job *)p;
    j->fn(j->args, j->r0, j->r1);
    return NULL;
}

/* fn over rows [0, n) in `threads` contiguous ranges, the calling thread taking the first. */
static void parallel_rows(row_fn fn, void *args, int64_t n, int threads) {
    if (threads > n) threads = (int)n;
    if (threads <= 1) {
        fn(args, 0, n);
        return;
    }
    struct job jobs[64];
    pthread_t tids[64];
    int started[64] = {0};
    if (threads > 64) threads = 64;
    for (int i = 0; i < threads; i++) {
        jobs[i] = (struct job){fn, args, n * i / threads, n * (i + 1) / threads};
    }
    for (int i = 1; i < threads; i++) started[i] = pthread_create(&tids[i], NULL, run_job, &jobs[i]) == 0;
    run_job(&jobs[0]);
    for (int i = 1; i < threads; i++) {
        if (started[i]) pthread_join(tids[i], NULL);
        else run_job(&jobs[i]); /* no thread to spare: do it here */
    }
}

/* ---- epilogue --------------------------------------------------------------------------------------- */

struct epilogue_args {
    const uint16_t *logits; /* bf16 bits [T, H, n] */
    const float *w;         /* [T, H] */
    const float *k_scale;   /* [n] or NULL */
    float *out;             /* [T, ld] */
    int64_t H, n, ld;
};

static inline float bf16_to_float(uint16_t b) {
    union { uint32_t u; float f; } v = {(uint32_t)b << 16};
    return v.f;
}

static void epilogue_rows(void *p, int64_t t0, int64_t t1) {
    const struct epilogue_args *a = (const struct epilogue_args *)p;
    const int64_t H = a->H, n = a->n;
    for (int64_t t = t0; t < t1; t++) {
        float *o = a->out + t * a->ld;
        const uint16_t *l = a->logits + t * H * n;
        const float *w = a->w + t * H;
        for (int64_t s = 0; s < n; s++) {
            float x = bf16_to_float(l[s]);
            o[s] = w[0] * (x > 0.0f ? x : 0.0f);
        }
        for (int64_t h = 1; h < H; h++) {
            const uint16_t *lh = l + h * n;
            const float wh = w[h];
            for (int64_t s = 0; s < n; s++) {
                float x = bf16_to_float(lh[s]);
                o[s] += wh * (x > 0.0f ? x : 0.0f);
            }
        }
        if (a->k_scale) {
            for (int64_t s = 0; s < n; s++) o[s] *= a->k_scale[s];
        }
    }
}

void dsv32_index_epilogue(const uint16_t *logits, const float *w, const float *k_scale, float *out, int64_t T,
                          int64_t H, int64_t n, int64_t ld, int threads) {
    struct epilogue_args a = {logits, w, k_scale, out, H, n, ld};
    parallel_rows(epilogue_rows, &a, T, threads);
}

/* ---- top-k selection -------------------------------------------------------------------------------- */

/* fp32 -> uint32 with the same order (reference._orderable): -0.0 counts as +0.0. */
static inline uint32_t code(float x) {
    union { float f; uint32_t u; } v = {x + 0.0f};
    return v.u & 0x80000000u ? ~v.u : v.u | 0x80000000u;
}

struct topk_args {
    const float *scores; /* [T, ld], column j is key lo + j */
    int64_t ld, lo, hi;
    const int64_t *ks, *ke; /* [T] */
    int64_t k;              /* keys per row to select (<= width) */
    int64_t *out;           /* [T, width] */
    int64_t width;
    int64_t sample_hits;    /* expected top-k members in a row's strided sample; 0: no sample */
};

/* Bin of the k-th largest value in a histogram; *above = how many values lie in higher bins. */
static int kth_bin(const uint32_t *hist, int bins, int64_t k, int64_t *above) {
    int64_t acc = 0;
    for (int b = bins - 1; b > 0; b--) {
        if (acc + hist[b] >= k) {
            *above = acc;
            return b;
        }
        acc += hist[b];
    }
    *above = acc;
    return 0;
}

/* The k-th largest of the m codes (1 <= k <= m), by radix select on 11 + 11 + 10 bits; `buf` is m codes of
 * scratch. *ties = how many codes equal to it belong to the top k (the others are larger). */
static uint32_t kth_largest(const uint32_t *codes, int64_t m, int64_t k, uint32_t *buf, int64_t *ties) {
    static const int shift[3] = {21, 10, 0}, bins[3] = {2048, 2048, 1024};
    uint32_t hist[2048], prefix = 0;
    const uint32_t *src = codes;
    for (int level = 0; level < 3; level++) {
        const int sh = shift[level];
        const uint32_t mask = (uint32_t)bins[level] - 1;
        memset(hist, 0, sizeof(uint32_t) * (size_t)bins[level]);
        for (int64_t i = 0; i < m; i++) hist[(src[i] >> sh) & mask]++;
        int64_t above;
        uint32_t b = (uint32_t)kth_bin(hist, bins[level], k, &above);
        k -= above;
        prefix |= b << sh;
        if (level < 2) { /* keep the codes of that bin */
            int64_t j = 0;
            for (int64_t i = 0; i < m; i++) {
                buf[j] = src[i];
                j += ((src[i] >> sh) & mask) == b;
            }
            m = j;
            src = buf;
        }
    }
    *ties = k;
    return prefix;
}

/* The codes >= tau of row[0, n) and their offsets, in order, into code_buf / pos_buf (n + 16 entries each,
 * the vector path writes whole registers); returns how many. */
static int64_t keep_at_least(const float *row, int64_t n, uint32_t tau, uint32_t *code_buf, uint32_t *pos_buf) {
    int64_t m = 0, i = 0;
#ifdef __AVX512F__
    /* register compress + full store (a compress straight to memory is microcoded on some CPUs) */
    const __m512i sign = _mm512_set1_epi32((int)0x80000000u), ones = _mm512_set1_epi32(-1);
    const __m512i tau_v = _mm512_set1_epi32((int)tau), sixteen = _mm512_set1_epi32(16);
    __m512i pos = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (; i + 16 <= n; i += 16) {
        const __m512i u = _mm512_castps_si512(_mm512_add_ps(_mm512_loadu_ps(row + i), _mm512_setzero_ps()));
        const __mmask16 neg = _mm512_cmplt_epi32_mask(u, _mm512_setzero_si512());
        const __m512i c = _mm512_mask_xor_epi32(_mm512_or_si512(u, sign), neg, u, ones);
        const __mmask16 keep = _mm512_cmpge_epu32_mask(c, tau_v);
        _mm512_storeu_si512((void *)(code_buf + m), _mm512_maskz_compress_epi32(keep, c));
        _mm512_storeu_si512((void *)(pos_buf + m), _mm512_maskz_compress_epi32(keep, pos));
        pos = _mm512_add_epi32(pos, sixteen);
        m += __builtin_popcount((unsigned)keep);
    }
#endif
    for (; i < n; i++) { /* branch-free compaction */
        const uint32_t c = code(row[i]);
        code_buf[m] = c;
        pos_buf[m] = (uint32_t)i;
        m += c >= tau;
    }
    return m;
}

static void topk_rows(void *p, int64_t t0, int64_t t1) {
    const struct topk_args *a = (const struct topk_args *)p;
    const int64_t k = a->k, len = a->hi - a->lo;
    uint32_t *code_buf = (uint32_t *)malloc(sizeof(uint32_t) * (size_t)(2 * len + 32));
    uint32_t *scratch = code_buf + len + 16;
    uint32_t *pos_buf = (uint32_t *)malloc(sizeof(uint32_t) * (size_t)(len + 16));
    for (int64_t t = t0; t < t1; t++) {
        int64_t *o = a->out + t * a->width;
        const int64_t s0 = a->ks[t] > a->lo ? a->ks[t] : a->lo;
        const int64_t s1 = a->ke[t] < a->hi ? a->ke[t] : a->hi;
        const int64_t n = s1 > s0 ? s1 - s0 : 0;
        const float *row = a->scores + t * a->ld + (s0 - a->lo);
        int64_t w = 0;
        if (n <= k) { /* every visible key */
            for (int64_t s = s0; s < s1; s++) o[w++] = s;
            for (; w < a->width; w++) o[w] = -1;
            continue;
        }
        /* Candidates: the keys whose code is >= tau, kept as (code, offset) in index order. tau is the j-th
         * largest code of a strided sample, j a bit above the k/step top-k members the sample should hold;
         * every top-k key is >= tau when at least k keys are, which is checked (else tau = 0: all keys). */
        int64_t step = a->sample_hits > 0 ? k / a->sample_hits : 0, m = 0;
        uint32_t tau = 0;
        if (step >= 4 && n >= 4 * k) {
            int64_t ns = 0;
            for (int64_t i = 0; i < n; i += step) code_buf[ns++] = code(row[i]);
            double e = (double)k / (double)step;
            int64_t j = (int64_t)(e + 3.0 * __builtin_sqrt(e)) + 8, ties;
            if (j > ns) j = ns;
            tau = kth_largest(code_buf, ns, j, scratch, &ties);
        }
        for (;;) {
            m = keep_at_least(row, n, tau, code_buf, pos_buf);
            if (m >= k || tau == 0) break;
            tau = 0; /* the sample's threshold was too high for this row: take every key */
        }
        int64_t ties;
        const uint32_t kth = kth_largest(code_buf, m, k, scratch, &ties);
        int64_t kept = 0; /* above the k-th largest, and its ties by lowest index: compacted in place, branch-free */
        for (int64_t i = 0; i < m; i++) {
            const uint32_t c = code_buf[i];
            const int64_t tie = c == kth && ties > 0;
            pos_buf[kept] = pos_buf[i];
            kept += (c > kth) | tie;
            ties -= tie;
        }
        for (; w < kept; w++) o[w] = s0 + pos_buf[w];
        for (; w < a->width; w++) o[w] = -1;
    }
    free(code_buf);
    free(pos_buf);
}

void dsv32_topk_rows(const float *scores, int64_t ld, int64_t T, int64_t lo, int64_t hi, const int64_t *ks,
                     const int64_t *ke, int64_t k, int64_t *out, int64_t width, int64_t sample_hits, int threads) {
    struct topk_args a = {scores, ld, lo, hi, ks, ke, k, out, width, sample_hits};
    parallel_rows(topk_rows, &a, T, threads);
}

/* ---- sparse attention's backward: softmax gradient ----------------------------------------------------- */

static inline uint16_t float_to_bf16(float f) { /* round to nearest even, as PyTorch converts */
    union { float f; uint32_t u; } v = {f};
    return (uint16_t)((v.u + 0x7FFFu + ((v.u >> 16) & 1u)) >> 16);
}

/* e^x for x <= 0 (0 below -87): 2^n e^r with n = round(x / ln2) (the 1.5 * 2^23 trick: a float-to-int
 * conversion would stop the loops below from vectorising), |r| <= ln2 / 2, degree-6 Taylor polynomial (~1 ulp). */
static inline float exp_nonpos(float x) {
    const float xc = x < -87.0f ? -87.0f : x;
    union { float f; uint32_t u; } t = {xc * 1.44269504f + 12582912.0f}; /* n in the low mantissa bits */
    const float n = t.f - 12582912.0f;
    const float r = (xc - n * 0.693145752f) - n * 1.42860677e-6f;
    float e = 1.0f / 720.0f;
    e = e * r + 1.0f / 120.0f;
    e = e * r + 1.0f / 24.0f;
    e = e * r + 1.0f / 6.0f;
    e = e * r + 0.5f;
    e = e * r + 1.0f;
    e = e * r + 1.0f;
    union { uint32_t u; float f; } two_n = {(t.u - 0x4B400000u + 127u) << 23};
    return x < -87.0f ? 0.0f : e * two_n.f;
}

struct softmax_bwd_args {
    uint16_t *y;          /* bf16 [n, 2H, k]: [s ; dp] in, [p ; ds] out */
    const float *lse;     /* [n, H]; +inf where a row has no valid slot */
    const uint8_t *valid; /* [n, k]: slot j of query t holds a key */
    int64_t H, k;
};

static void softmax_bwd_rows(void *p, int64_t t0, int64_t t1) {
    const struct softmax_bwd_args *a = (const struct softmax_bwd_args *)p;
    const int64_t H = a->H, k = a->k;
    float *pr = (float *)malloc(sizeof(float) * (size_t)k);
    for (int64_t t = t0; t < t1; t++) {
        const uint8_t *valid = a->valid + t * k;
        for (int64_t h = 0; h < H; h++) {
            uint16_t *s = a->y + (t * 2 * H + h) * k, *dp = a->y + (t * 2 * H + H + h) * k;
            const float lse = a->lse[t * H + h];
            for (int64_t j = 0; j < k; j++) pr[j] = exp_nonpos(bf16_to_float(s[j]) - lse) * (float)valid[j];
            float delta = 0.0f;
#pragma omp simd reduction(+ : delta)
            for (int64_t j = 0; j < k; j++) delta += pr[j] * bf16_to_float(dp[j]);
#pragma omp simd
            for (int64_t j = 0; j < k; j++) {
                s[j] = float_to_bf16(pr[j]);
                dp[j] = float_to_bf16(pr[j] * (bf16_to_float(dp[j]) - delta));
            }
        }
    }
    free(pr);
}

/* In place on y = [s ; dp] (the recomputed scaled logits and do . v per slot): p = exp(s - lse) on the valid
 * slots, 0 elsewhere; delta = sum_j p dp (= do . o); ds = p (dp - delta). y becomes [p ; ds]. */
void dsv32_softmax_bwd_bf16(uint16_t *y, const float *lse, const uint8_t *valid, int64_t n, int64_t H, int64_t k,
                            int threads) {
    struct softmax_bwd_args a = {y, lse, valid, H, k};
    parallel_rows(softmax_bwd_rows, &a, n, threads);
}

/* ---- sparse attention's forward: softmax ------------------------------------------------------------- */

struct softmax_fwd_args {
    uint16_t *s;          /* bf16 [n, H, k]: scaled logits in, probabilities out */
    float *lse;           /* [n, H] out; -inf where no slot is valid */
    const uint8_t *valid; /* [n, k] */
    int64_t H, k;
};

/* One row in place: s (bf16 logits, times `scale`) -> the softmax over the slots with valid[j] != 0 (bf16, 0 on
 * the others); returns its log-sum-exp, -inf (and p = 0) when no slot is valid. e: k floats of scratch. */
static float softmax_row_bf16(uint16_t *s, const uint8_t *valid, int64_t k, float scale, float *e) {
    float m = -__builtin_inff();
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < k; j++) {
        const float x = valid[j] ? bf16_to_float(s[j]) * scale : -__builtin_inff();
        m = x > m ? x : m;
    }
    if (m == -__builtin_inff()) { /* nothing visible */
        memset(s, 0, sizeof(uint16_t) * (size_t)k);
        return m;
    }
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < k; j++) {
        e[j] = exp_nonpos(bf16_to_float(s[j]) * scale - m) * (float)valid[j];
        sum += e[j];
    }
    const float inv = 1.0f / sum;
#pragma omp simd
    for (int64_t j = 0; j < k; j++) s[j] = float_to_bf16(e[j] * inv);
    return m + __builtin_logf(sum);
}

static void softmax_fwd_rows(void *p, int64_t t0, int64_t t1) {
    const struct softmax_fwd_args *a = (const struct softmax_fwd_args *)p;
    const int64_t H = a->H, k = a->k;
    float *e = (float *)malloc(sizeof(float) * (size_t)k);
    for (int64_t t = t0; t < t1; t++) {
        for (int64_t h = 0; h < H; h++) {
            a->lse[t * H + h] = softmax_row_bf16(a->s + (t * H + h) * k, a->valid + t * k, k, 1.0f, e);
        }
    }
    free(e);
}

/* In place on the scaled logits s (bf16 [n, H, k]): the softmax over each row's valid slots (bf16) and its
 * log-sum-exp (fp32 [n, H]); a row with no valid slot gives p = 0 and lse = -inf. */
void dsv32_softmax_fwd_bf16(uint16_t *s, float *lse, const uint8_t *valid, int64_t n, int64_t H, int64_t k,
                            int threads) {
    struct softmax_fwd_args a = {s, lse, valid, H, k};
    parallel_rows(softmax_fwd_rows, &a, n, threads);
}

/* ---- masked MHA mode: the softmax over each query's selected keys ------------------------------------ */

struct masked_args {
    uint16_t *s;          /* bf16 [H, n, w]: logits of n queries against the key window [lo, lo + w) */
    const int64_t *idx;   /* [n, k] selected absolute key positions, -1 padded */
    int64_t lo, n, H, k, w;
    float scale;
};

/* The selected slots of a row (bit c of sel: column c) to the front of v, in column order; returns how many.
 * v has room for the row's count + 32. */
static int64_t compress_row(const uint16_t *s, const uint32_t *sel, int64_t w, uint16_t *v) {
    int64_t m = 0;
#if defined(__AVX512BW__) && defined(__AVX512VBMI2__)
    for (int64_t c = 0; c < w; c += 32) {
        const __mmask32 in = c + 32 <= w ? 0xFFFFFFFFu : (1u << (w - c)) - 1u;
        const __mmask32 mk = sel[c / 32] & in;
        const __m512i x = _mm512_maskz_loadu_epi16(in, s + c);
        _mm512_storeu_si512(v + m, _mm512_maskz_compress_epi16(mk, x)); /* register form: fast on every core */
        m += __builtin_popcount(mk);
    }
#else
    for (int64_t c = 0; c < w; c++) {
        if (sel[c / 32] >> (c % 32) & 1u) v[m++] = s[c];
    }
#endif
    return m;
}

/* The inverse: the row becomes v's values at the selected columns, 0 elsewhere (v: count + 32 readable). */
static void expand_row(uint16_t *s, const uint32_t *sel, int64_t w, const uint16_t *v) {
    int64_t m = 0;
#if defined(__AVX512BW__) && defined(__AVX512VBMI2__)
    for (int64_t c = 0; c < w; c += 32) {
        const __mmask32 in = c + 32 <= w ? 0xFFFFFFFFu : (1u << (w - c)) - 1u;
        const __mmask32 mk = sel[c / 32] & in;
        _mm512_mask_storeu_epi16(s + c, in, _mm512_maskz_expand_epi16(mk, _mm512_loadu_si512(v + m)));
        m += __builtin_popcount(mk);
    }
#else
    for (int64_t c = 0; c < w; c++) s[c] = sel[c / 32] >> (c % 32) & 1u ? v[m++] : 0;
#endif
}

static void masked_softmax_rows(void *p, int64_t t0, int64_t t1) {
    const struct masked_args *a = (const struct masked_args *)p;
    const int64_t w = a->w, k = a->k, words = (w + 31) / 32;
    uint32_t *sel = (uint32_t *)malloc(sizeof(uint32_t) * (size_t)words);
    uint16_t *v = (uint16_t *)malloc(sizeof(uint16_t) * (size_t)(w + 32));
    float *e = (float *)malloc(sizeof(float) * (size_t)(w + 32));
    for (int64_t t = t0; t < t1; t++) {
        memset(sel, 0, sizeof(uint32_t) * (size_t)words); /* the query's selected keys as window columns */
        for (int64_t j = 0; j < k; j++) {
            const int64_t i = a->idx[t * k + j], c = i - a->lo;
            if (i >= 0 && c >= 0 && c < w) sel[c / 32] |= 1u << (c % 32);
        }
        for (int64_t h = 0; h < a->H; h++) {
            uint16_t *s = a->s + (h * a->n + t) * w;
            const int64_t m = compress_row(s, sel, w, v); /* only the selected logits are exponentiated */
            float mx = -__builtin_inff();
#pragma omp simd reduction(max : mx)
            for (int64_t j = 0; j < m; j++) {
                e[j] = bf16_to_float(v[j]) * a->scale;
                mx = e[j] > mx ? e[j] : mx;
            }
            float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
            for (int64_t j = 0; j < m; j++) {
                e[j] = exp_nonpos(e[j] - mx);
                sum += e[j];
            }
            const float inv = 1.0f / sum;
#pragma omp simd
            for (int64_t j = 0; j < m; j++) v[j] = float_to_bf16(e[j] * inv);
            expand_row(s, sel, w, v);
        }
    }
    free(e);
    free(v);
    free(sel);
}

/* In place on the unscaled logits s (bf16 [H, n, w]) of masked MHA mode: each query's softmax over its selected
 * keys (idx, absolute positions; the window starts at key lo), the logits times `scale` in fp32; 0 on the
 * keys it did not select (a query that selected none: all 0). The rows then multiply the values as they are. */
void dsv32_masked_softmax_bf16(uint16_t *s, const int64_t *idx, int64_t lo, int64_t n, int64_t H, int64_t k,
                               int64_t w, float scale, int threads) {
    struct masked_args a = {s, idx, lo, n, H, k, w, scale};
    parallel_rows(masked_softmax_rows, &a, n, threads);
}

/* ---- the latents' gradient: scatter-add ----------------------------------------------------------- */

struct scatter_args {
    const uint16_t *src; /* bf16 [n, C] */
    const int64_t *rows; /* [n]; < 0: skipped */
    float *dst;          /* [n_dst, C] */
    int64_t n, C, n_dst;
};

/* Thread r adds the source rows whose destination lies in its share of [0, n_dst): no two threads write
 * the same row, and each destination row gets its sources in index order (the same sums every run). */
static void scatter_share(void *p, int64_t r0, int64_t r1) {
    const struct scatter_args *a = (const struct scatter_args *)p;
    const int64_t C = a->C;
    for (int64_t i = 0; i < a->n; i++) {
        const int64_t r = a->rows[i];
        if (r < r0 || r >= r1) continue;
        float *d = a->dst + r * C;
        const uint16_t *s = a->src + i * C;
        for (int64_t c = 0; c < C; c++) d[c] += bf16_to_float(s[c]);
    }
}

/* dst[rows[i]] += float(src[i]) for every i with rows[i] >= 0: index_add_ of bf16 rows into fp32. */
void dsv32_scatter_add_bf16(const uint16_t *src, const int64_t *rows, float *dst, int64_t n, int64_t C,
                            int64_t n_dst, int threads) {
    struct scatter_args a = {src, rows, dst, n, C, n_dst};
    parallel_rows(scatter_share, &a, n_dst, threads);
}
