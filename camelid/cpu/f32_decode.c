/* y = x @ w^T for a few rows of float32 with AVX2 and FMA: decode's products (camelid/cpu/f32_decode.py).
 *
 * x (R x K, row stride ldx), w (N x K, contiguous), y (R x N, row stride ldy), all float32;
 * 1 <= R <= 16, any N and K >= 1.
 *
 * A decode step multiplies every weight by a few rows, so its cost is reading the weights from
 * memory; MKL's product reads them at a third to a half of the machine's memory rate at 1-16 rows.
 * Here each thread walks its share of the weight's rows in blocks of three consecutive rows (one
 * contiguous run of memory), each block against up to four x rows at a time: twelve 8-lane
 * accumulators, seven loads per twelve FMAs, the block's three rows held in L1 for the next four
 * x rows. The hardware prefetcher loses the block's three interleaved streams, so the first pass
 * over a block prefetches the block PREFETCH_AHEAD blocks ahead, evenly over its k loop. Each
 * output is one row's dot product summed in 8 lanes in k order, the lanes added at the end (so not
 * bit-for-bit MKL's sums, which block k differently; both are float32 sums of the same products).
 * The thread team is OpenMP's: torch's own libgomp, already loaded, so torch.get_num_threads()
 * threads and no second pool.
 */
#include <immintrin.h>
#include <stdint.h>

#define PREFETCH_AHEAD 2

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* y[r][i] for i < NW weight rows (w, w + K, ...) and r < NR x rows; `ahead` is prefetched (or NULL).
 * NW and NR are constants at every call, so each combination compiles to its own unrolled loop. */
static inline __attribute__((always_inline)) void block(const float *x, int64_t ldx, const float *w, int64_t K,
                                                        float *y, int64_t ldy, const int NW, const int NR,
                                                        const char *ahead) {
    __m256 acc[3][4];
    for (int i = 0; i < NW; i++)
        for (int r = 0; r < NR; r++) acc[i][r] = _mm256_setzero_ps();
    const int64_t stride = 4 * NW;  /* bytes of the block per k: NW rows of 4-byte floats */
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        if (ahead) {
            _mm_prefetch(ahead + stride * k, _MM_HINT_T0);
            if (NW > 1) _mm_prefetch(ahead + stride * k + 64, _MM_HINT_T0);
        }
        __m256 v[3];
        for (int i = 0; i < NW; i++) v[i] = _mm256_loadu_ps(w + i * K + k);
        for (int r = 0; r < NR; r++) {
            const __m256 b = _mm256_loadu_ps(x + r * ldx + k);
            for (int i = 0; i < NW; i++) acc[i][r] = _mm256_fmadd_ps(v[i], b, acc[i][r]);
        }
    }
    for (int i = 0; i < NW; i++)
        for (int r = 0; r < NR; r++) {
            float s = hsum(acc[i][r]);
            for (int64_t j = k; j < K; j++) s += w[i * K + j] * x[r * ldx + j];
            y[r * ldy + i] = s;
        }
}

/* NW weight rows against all R x rows, four at a time. */
static inline __attribute__((always_inline)) void rows_block(const float *x, int64_t ldx, const float *w, int64_t K,
                                                             float *y, int64_t ldy, int R, const int NW,
                                                             const char *ahead) {
    int r = 0;
    for (; r + 4 <= R; r += 4, ahead = 0) block(x + r * ldx, ldx, w, K, y + r * ldy, ldy, NW, 4, ahead);
    switch (R - r) {
        case 3: block(x + r * ldx, ldx, w, K, y + r * ldy, ldy, NW, 3, ahead); break;
        case 2: block(x + r * ldx, ldx, w, K, y + r * ldy, ldy, NW, 2, ahead); break;
        case 1: block(x + r * ldx, ldx, w, K, y + r * ldy, ldy, NW, 1, ahead); break;
    }
}

int camelid_f32_linear(const float *x, int64_t ldx, const float *w, float *y, int64_t ldy, int R, int64_t N, int64_t K) {
    if (R < 1 || R > 16 || N < 1 || K < 1) return 1;
    const int64_t blocks = N / 3;
    #pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        const char *ahead = b + PREFETCH_AHEAD < blocks ? (const char *)(w + 3 * (b + PREFETCH_AHEAD) * K) : 0;
        rows_block(x, ldx, w + 3 * b * K, K, y + 3 * b, ldy, R, 3, ahead);
    }
    for (int64_t n = 3 * blocks; n < N; n++)  /* the last one or two weight rows */
        rows_block(x, ldx, w + n * K, K, y + n, ldy, R, 1, 0);
    return 0;
}
