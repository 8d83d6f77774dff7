/* y = x @ w^T for a few rows of bfloat16 on Intel AMX: decode's products (camelid/cpu/amx.py).
 *
 * x (R x K, row stride ldx), w (N x K, contiguous), y (R x N, row stride ldy), all bfloat16;
 * 1 <= R <= 32, K % 32 == 0, N % 16 == 0. Float32 accumulation, rounded once to bfloat16 (to
 * nearest even, with the instruction oneDNN uses).
 *
 * The weight is the tile multiply's left factor A as it lies in memory: 16 weight rows x 32 k
 * (64 bytes of each row) per tile load, so the kernel streams the weight once with no packing.
 * The right factor B is x in AMX's pair ("VNNI") layout, (k/2) x rows x 2, made once per call (a
 * few kB), one for rows 0-15 and one for rows 16-31. C is 16 outputs x up to 16 rows in float32.
 * Each thread takes groups of G consecutive 16-output blocks (G C tiles per row block in flight,
 * sharing each load) of one weight, which it reads once; G is chosen so the groups split evenly
 * over the threads. The thread team is OpenMP's: torch's own libgomp, already loaded,
 * so torch.get_num_threads() threads and no second pool.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <omp.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* Linux hands out AMX tile state only on request (once per process); 0 on success. */
int camelid_amx_init(void) {
    return (int)syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA);
}

typedef struct {
    uint8_t palette_id, start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* dst (16 x 16 dwords) = the transpose of src (16 rows of 16 dwords, row stride ld dwords). */
static inline void transpose16(const uint32_t *src, int64_t ld, uint32_t *dst) {
    __m512i r[16], t[16];
    for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_si512(src + i * ld);
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {
        r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 4; j++) {
            t[8 * i + j] = _mm512_shuffle_i32x4(r[8 * i + j], r[8 * i + j + 4], 0x88);
            t[8 * i + j + 4] = _mm512_shuffle_i32x4(r[8 * i + j], r[8 * i + j + 4], 0xdd);
        }
    for (int j = 0; j < 8; j++) {
        r[j] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0x88);
        r[j + 8] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0xdd);
    }
    for (int i = 0; i < 16; i++) _mm512_store_si512(dst + 16 * i, r[i]);
}

/* Blocks of 16 outputs per group: up to `most`, the largest that splits evenly over the threads. */
static int64_t group_size(int64_t blocks, int threads, int64_t most) {
    for (int64_t g = most; g > 1; g /= 2)
        if (blocks % (g * threads) == 0 || blocks / g >= 8 * (int64_t)threads) return g;
    return 1;
}

/* x rows [r0, r0 + n) in B's pair layout: row i of chunk c holds the k pair 32c+2i, 32c+2i+1 of each row */
static void pack_rows(const uint16_t *x, int64_t ldx, int r0, int n, int64_t chunks, uint32_t *xp) {
    for (int64_t c = 0; c < chunks; c++)
        for (int i = 0; i < 16; i++)
            for (int r = 0; r < n; r++) memcpy(&xp[(c * 16 + i) * n + r], x + (r0 + r) * ldx + 32 * c + 2 * i, 4);
}

/* A C tile stored with a 64-byte row stride (c[16m + r]: output m, row r < n) -> y[r][col + m]
 * in bfloat16, rounded to nearest even as oneDNN rounds (vcvtneps2bf16). */
static void store(const float *c, int n, uint16_t *y, int64_t ldy, int64_t col) {
    uint32_t t[256] __attribute__((aligned(64)));
    transpose16((const uint32_t *)c, 16, t);
    for (int r = 0; r < n; r++)
        _mm256_storeu_si256((__m256i *)(y + r * ldy + col), (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps((const float *)t + 16 * r)));
}

int camelid_amx_linear(const uint16_t *x, int64_t ldx, const uint16_t *w, uint16_t *y, int64_t ldy,
                       int R, int64_t N, int64_t K) {
    if (R < 1 || R > 32 || K % 32 || N % 16 || K <= 0 || N <= 0) return 1;
    const int64_t chunks = K / 32, blocks = N / 16;
    /* Rows 0-15 are one right factor, rows 16-31 (when there are more than 16) a second one. */
    const int r0 = R < 16 ? R : 16, r1 = R - r0;
    uint32_t *xp = aligned_alloc(64, (size_t)(chunks * 16 * R * 4 + 63) / 64 * 64);
    if (!xp) return 2;
    uint32_t *xp1 = xp + chunks * 16 * r0;
    pack_rows(x, ldx, 0, r0, chunks, xp);
    if (r1) pack_rows(x, ldx, 16, r1, chunks, xp1);
    /* one row block: up to 4 output blocks (C 0-3) share each B load; two: 2 output blocks x 2
       row blocks (C 0, 1 for rows 0-15, C 2, 3 for rows 16-31), each weight tile used twice */
    const int64_t g = group_size(blocks, omp_get_max_threads(), r1 ? 2 : 4);
    const int64_t groups = (blocks + g - 1) / g;
    #pragma omp parallel
    {
        tile_config cfg;
        memset(&cfg, 0, sizeof cfg);
        cfg.palette_id = 1;
        for (int t = 0; t < 8; t++) cfg.rows[t] = 16;
        if (!r1) {
            for (int t = 0; t < 5; t++) cfg.colsb[t] = (uint16_t)(r0 * 4);  /* C 0-3, B 4 */
            for (int t = 5; t < 8; t++) cfg.colsb[t] = 64;                   /* A 5-7 */
        } else {
            cfg.colsb[0] = cfg.colsb[1] = cfg.colsb[4] = 64;                                 /* C, B of rows 0-15 */
            cfg.colsb[2] = cfg.colsb[3] = cfg.colsb[5] = (uint16_t)(r1 * 4);               /* C, B of rows 16- */
            cfg.colsb[6] = cfg.colsb[7] = 64;                                                 /* A 6, 7 */
        }
        _tile_loadconfig(&cfg);
        float c[4][16 * 16] __attribute__((aligned(64)));
        #pragma omp for schedule(static)
        for (int64_t grp = 0; grp < groups; grp++) {
            const int64_t b = grp * g;
            const int nb = (int)(blocks - b < g ? blocks - b : g);
            _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
            if (!r1) {
                for (int64_t k = 0; k < chunks; k++) {
                    const uint16_t *wb = w + b * 16 * K + 32 * k;
                    _tile_loadd(4, xp + k * 16 * r0, r0 * 4);
                    _tile_loadd(5, wb, K * 2);
                    _tile_dpbf16ps(0, 5, 4);
                    if (nb > 1) { _tile_loadd(6, wb + 16 * K, K * 2); _tile_dpbf16ps(1, 6, 4); }
                    if (nb > 2) { _tile_loadd(7, wb + 32 * K, K * 2); _tile_dpbf16ps(2, 7, 4); }
                    if (nb > 3) { _tile_loadd(5, wb + 48 * K, K * 2); _tile_dpbf16ps(3, 5, 4); }
                }
                _tile_stored(0, c[0], 64);
                if (nb > 1) _tile_stored(1, c[1], 64);
                if (nb > 2) _tile_stored(2, c[2], 64);
                if (nb > 3) _tile_stored(3, c[3], 64);
                for (int t = 0; t < nb; t++) store(c[t], r0, y, ldy, (b + t) * 16);
            } else {
                for (int64_t k = 0; k < chunks; k++) {
                    const uint16_t *wb = w + b * 16 * K + 32 * k;
                    _tile_loadd(4, xp + k * 16 * r0, r0 * 4);
                    _tile_loadd(5, xp1 + k * 16 * r1, r1 * 4);
                    _tile_loadd(6, wb, K * 2);
                    _tile_dpbf16ps(0, 6, 4);
                    _tile_dpbf16ps(2, 6, 5);
                    if (nb > 1) {
                        _tile_loadd(7, wb + 16 * K, K * 2);
                        _tile_dpbf16ps(1, 7, 4);
                        _tile_dpbf16ps(3, 7, 5);
                    }
                }
                _tile_stored(0, c[0], 64);
                _tile_stored(2, c[2], 64);
                if (nb > 1) { _tile_stored(1, c[1], 64); _tile_stored(3, c[3], 64); }
                for (int t = 0; t < nb; t++) {
                    store(c[t], r0, y, ldy, (b + t) * 16);
                    store(c[2 + t], r1, y + 16 * ldy, ldy, (b + t) * 16);
                }
            }
        }
        _tile_release();
    }
    free(xp);
    return 0;
}
