/* y = x @ w^T for a few rows of bfloat16 on Intel AMX: decode's products (camelid/models/amx.py).
 *
 * x (R x K, row stride ldx), w (N x K, contiguous), y (R x N, row stride ldy), all bfloat16;
 * 1 <= R <= 16, K % 32 == 0, N % 16 == 0. Float32 accumulation, rounded once to bfloat16 (to
 * nearest even).
 *
 * The weight is the tile multiply's left factor A as it lies in memory: 16 weight rows x 32 k
 * (64 bytes of each row) per tile load, so the kernel streams the weight once with no packing.
 * The right factor B is x in AMX's pair ("VNNI") layout, (k/2) x R x 2, made once per call (a few
 * kB). C is 16 outputs x R rows in float32. Each thread takes groups of G consecutive 16-output
 * blocks (G C tiles in flight, sharing each B load) of one weight; G is chosen so the groups split
 * evenly over the threads. The thread team is OpenMP's: torch's own libgomp, already loaded,
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

static inline uint16_t to_bf16(float s) {
    uint32_t u;
    memcpy(&u, &s, 4);
    u += 0x7fff + ((u >> 16) & 1);  /* round to nearest even (sums of finite products are finite) */
    return (uint16_t)(u >> 16);
}

/* Blocks of 16 outputs per group: 4, 2 or 1, the largest that splits evenly over the threads. */
static int64_t group_size(int64_t blocks, int threads) {
    for (int64_t g = 4; g > 1; g /= 2)
        if (blocks % (g * threads) == 0 || blocks / g >= 8 * (int64_t)threads) return g;
    return 1;
}

int camelid_amx_linear(const uint16_t *x, int64_t ldx, const uint16_t *w, uint16_t *y, int64_t ldy,
                       int R, int64_t N, int64_t K) {
    if (R < 1 || R > 16 || K % 32 || N % 16 || K <= 0 || N <= 0) return 1;
    const int64_t chunks = K / 32, blocks = N / 16;
    uint32_t *xp = aligned_alloc(64, (size_t)(chunks * 16 * R * 4 + 63) / 64 * 64);
    if (!xp) return 2;
    for (int64_t c = 0; c < chunks; c++)  /* B: row i of chunk c holds the k pair 32c+2i, 32c+2i+1 of each x row */
        for (int i = 0; i < 16; i++)
            for (int r = 0; r < R; r++) memcpy(&xp[(c * 16 + i) * R + r], x + r * ldx + 32 * c + 2 * i, 4);
    const int64_t g = group_size(blocks, omp_get_max_threads());
    const int64_t groups = (blocks + g - 1) / g;
    #pragma omp parallel
    {
        tile_config cfg;
        memset(&cfg, 0, sizeof cfg);
        cfg.palette_id = 1;
        for (int t = 0; t < 4; t++) { cfg.rows[t] = 16; cfg.colsb[t] = (uint16_t)(R * 4); }  /* C */
        cfg.rows[4] = 16; cfg.colsb[4] = (uint16_t)(R * 4);                                   /* B */
        for (int t = 5; t < 8; t++) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }                  /* A */
        _tile_loadconfig(&cfg);
        float c[4][16 * 16];
        #pragma omp for schedule(static)
        for (int64_t grp = 0; grp < groups; grp++) {
            const int64_t b = grp * g;
            const int nb = (int)(blocks - b < g ? blocks - b : g);
            _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
            for (int64_t k = 0; k < chunks; k++) {
                const uint16_t *wb = w + b * 16 * K + 32 * k;
                _tile_loadd(4, xp + k * 16 * R, R * 4);
                _tile_loadd(5, wb, K * 2);
                _tile_dpbf16ps(0, 5, 4);
                if (nb > 1) { _tile_loadd(6, wb + 16 * K, K * 2); _tile_dpbf16ps(1, 6, 4); }
                if (nb > 2) { _tile_loadd(7, wb + 32 * K, K * 2); _tile_dpbf16ps(2, 7, 4); }
                if (nb > 3) { _tile_loadd(5, wb + 48 * K, K * 2); _tile_dpbf16ps(3, 5, 4); }
            }
            _tile_stored(0, c[0], R * 4);
            if (nb > 1) _tile_stored(1, c[1], R * 4);
            if (nb > 2) _tile_stored(2, c[2], R * 4);
            if (nb > 3) _tile_stored(3, c[3], R * 4);
            for (int t = 0; t < nb; t++)
                for (int m = 0; m < 16; m++)
                    for (int r = 0; r < R; r++) y[r * ldy + (b + t) * 16 + m] = to_bf16(c[t][m * R + r]);
        }
        _tile_release();
    }
    free(xp);
    return 0;
}
