// CPU kernels of PackedLinear (pbs2p_core/format/kernel.py builds this file with the system C++ compiler and
// loads it with ctypes; docs/artifact-format.md defines every bit read here).
//
// decode_rows: rows [r0, r1) of W_hat in float32, bit-exactly BlockCode.dense() (same float operations, no
//   fused multiply-add): the prefill path decodes a tile into a reused buffer and calls the BLAS matmul.
// gemv: y = x W_hat^T for a few rows of x straight from the packed bits: per row of W and column block, the
//   sums T = sum of x over kept columns and S = the same with the stored signs, then y += alpha S + mu T
//   (ARB-RC: x pre-scaled by alpha_col, y += alpha S); salient columns are added one by one with their exact
//   decoded value. Equal to x W_hat^T up to float rounding (the order of the additions differs).
//
// Both first expand one row's mask and signs to positional bit rows K (kept) and S (sign, 1 = +1), C bits
// each, then work on 8 columns at a time with lane masks from 256-entry tables (GCC vector extensions:
// AVX2/AVX-512 where the compiler targets them, SSE otherwise).
//
// The descriptor P (int64) is laid out as kernel.py's _P_* constants say; every pointer in it is an address.
#include <cstdint>
#include <cstring>
#include <vector>
#ifdef __BMI2__
#include <immintrin.h>
#endif

typedef float v8f __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));

enum {
    P_R, P_C, P_N, P_M, P_MASK_KIND, P_RANK_BITS, P_NBLOCKS, P_CHUNK,
    P_MASK, P_SIGN, P_SIGN2, P_DEP, P_BITMAP_OF, P_BLOCK_OFF, P_SAL_OFF, P_SAL_COLS,
    P_SIGN_START, P_SIGN2_START, P_MASK_LEN, P_SIGN_LEN, P_SIGN2_LEN, P_NTHREADS,
    P_SCALES,  // 7 roles x (pointer, dtype, per-block offsets)
    P_SIZE = P_SCALES + 21
};
enum { ALPHA, MU, ALPHA_S, MU_S, ALPHA_R, MU_R, ALPHA_COL, NROLES };
enum { MASK_NONE = 0, MASK_RANK = 1, MASK_BITMAP = 2 };

static v8u LANES[256];  // bit j of the index -> lane j all ones
static bool lanes_ready = false;

static void init_lanes() {
    if (lanes_ready) return;
    for (int i = 0; i < 256; i++)
        for (int j = 0; j < 8; j++) LANES[i][j] = (i >> j) & 1 ? 0xFFFFFFFFu : 0u;
    lanes_ready = true;
}

static inline float h2f(uint16_t h) {  // IEEE half -> float, exact (subnormals, inf, nan)
    uint32_t s = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff, u;
    if (e == 0) {
        float f = (float)m * (1.0f / 16777216.0f);
        memcpy(&u, &f, 4);
        u |= s;
    } else if (e == 31) {
        u = s | 0x7f800000u | (m << 13);
    } else {
        u = s | ((e + 112) << 23) | (m << 13);
    }
    float r;
    memcpy(&r, &u, 4);
    return r;
}

struct Scale {
    const void* p = nullptr;
    int dtype = 0;  // 0 float32, 1 float16, 2 bfloat16
    const int64_t* off = nullptr;
    bool has(int64_t b) const { return p != nullptr && off[b] >= 0; }
    float get(int64_t b, int64_t i) const {
        int64_t k = off[b] + i;
        if (dtype == 0) return ((const float*)p)[k];
        uint16_t h = ((const uint16_t*)p)[k];
        if (dtype == 1) return h2f(h);
        uint32_t u = (uint32_t)h << 16;
        float r;
        memcpy(&r, &u, 4);
        return r;
    }
};

struct Lin {
    int64_t R, C, n, m, kind, b, nblocks, chunk;
    const uint8_t *mask, *sign, *sign2;
    const uint16_t *dep, *bitmap_of;
    const int64_t *block_off, *sal_off, *sal_cols, *sign_start, *sign2_start;
    int64_t mask_len, sign_len, sign2_len, nthreads;
    Scale sc[NROLES];
    explicit Lin(const int64_t* P) {
        R = P[P_R]; C = P[P_C]; n = P[P_N]; m = P[P_M]; kind = P[P_MASK_KIND]; b = P[P_RANK_BITS];
        nblocks = P[P_NBLOCKS]; chunk = P[P_CHUNK];
        mask = (const uint8_t*)P[P_MASK]; sign = (const uint8_t*)P[P_SIGN]; sign2 = (const uint8_t*)P[P_SIGN2];
        dep = (const uint16_t*)P[P_DEP]; bitmap_of = (const uint16_t*)P[P_BITMAP_OF];
        block_off = (const int64_t*)P[P_BLOCK_OFF]; sal_off = (const int64_t*)P[P_SAL_OFF];
        sal_cols = (const int64_t*)P[P_SAL_COLS]; sign_start = (const int64_t*)P[P_SIGN_START];
        sign2_start = (const int64_t*)P[P_SIGN2_START];
        mask_len = P[P_MASK_LEN]; sign_len = P[P_SIGN_LEN]; sign2_len = P[P_SIGN2_LEN]; nthreads = P[P_NTHREADS];
        for (int i = 0; i < NROLES; i++) {
            sc[i].p = (const void*)P[P_SCALES + 3 * i];
            sc[i].dtype = (int)P[P_SCALES + 3 * i + 1];
            sc[i].off = (const int64_t*)P[P_SCALES + 3 * i + 2];
        }
    }
};

// up to 57 bits of an LSB-first stream of `len` bytes, from bit `pos`
static inline uint64_t bits(const uint8_t* p, int64_t len, int64_t pos, int nb) {
    int64_t at = pos >> 3;
    uint64_t w = 0;
    if (at + 8 <= len) {
        memcpy(&w, p + at, 8);
    } else {
        for (int64_t i = at; i < len; i++) w |= (uint64_t)p[i] << (8 * (i - at));
    }
    return (w >> (pos & 7)) & ((nb >= 64) ? ~0ull : ((1ull << nb) - 1));
}

static inline uint64_t bits64(const uint8_t* p, int64_t len, int64_t pos, int nb) {
    if (nb <= 32) return bits(p, len, pos, nb);
    return bits(p, len, pos, 32) | (bits(p, len, pos + 32, nb - 32) << 32);
}

static inline uint64_t deposit(uint64_t src, uint64_t mask) {
#ifdef __BMI2__
    return _pdep_u64(src, mask);
#else
    uint64_t r = 0;
    for (uint64_t bit = 1; mask; mask &= mask - 1, bit <<= 1)
        if (src & bit) r |= mask & (0 - mask);
    return r;
#endif
}

static inline void put(uint64_t* a, int64_t pos, uint64_t v, int64_t nb) {
    int64_t w = pos >> 6, s = pos & 63;
    a[w] |= v << s;
    if (s && s + nb > 64) a[w + 1] |= v >> (64 - s);
}

static inline uint32_t get8(const uint64_t* a, int64_t pos) {  // 8 bits of a bit row from column pos
    uint64_t w;
    memcpy(&w, (const uint8_t*)a + (pos >> 3), 8);
    return (uint32_t)(w >> (pos & 7)) & 0xFFu;
}

static inline int bit(const uint64_t* a, int64_t pos) { return (int)((a[pos >> 6] >> (pos & 63)) & 1); }

// positional kept bits K and sign bits S of row r (arrays of words() words); `spos` = the row's first bit in
// the sign stream (used by the bitmap mask, whose rows keep a varying number of weights; advanced past the row)
static void row_bits(const Lin& L, int64_t r, uint64_t* K, uint64_t* S, int64_t words, int64_t& spos) {
    memset(K, 0, words * 8);
    memset(S, 0, words * 8);
    const int64_t C = L.C;
    if (L.kind == MASK_RANK) {
        const int64_t G = C / L.m, n = L.n, m = L.m, b = L.b;
        const int64_t g0 = r * G;
        for (int64_t g = 0; g < G; g++) {
            uint64_t code = bits(L.mask, L.mask_len, (g0 + g) * b, (int)b);
            uint64_t sb = bits(L.sign, L.sign_len, (g0 + g) * n, (int)n);
            uint64_t bm = L.bitmap_of[code];
            uint64_t sp = L.dep ? L.dep[(code << n) | sb] : deposit(sb, bm);
            if (m == 8) {
                ((uint8_t*)K)[g] = (uint8_t)bm;
                ((uint8_t*)S)[g] = (uint8_t)sp;
            } else {
                put(K, g * m, bm, m);
                put(S, g * m, sp, m);
            }
        }
        return;
    }
    for (int64_t c0 = 0, w = 0; c0 < C; c0 += 64, w++) {
        int nb = (int)(C - c0 < 64 ? C - c0 : 64);
        uint64_t all = nb == 64 ? ~0ull : ((1ull << nb) - 1);
        if (L.kind == MASK_NONE) {
            K[w] = all;
            S[w] = bits64(L.sign, L.sign_len, r * C + c0, nb);
        } else {
            uint64_t kw = bits64(L.mask, L.mask_len, r * C + c0, nb);
            int cnt = __builtin_popcountll(kw);
            K[w] = kw;
            S[w] = deposit(bits64(L.sign, L.sign_len, spos, cnt), kw);
            spos += cnt;
        }
    }
}

static inline int64_t words_of(const Lin& L) { return L.C / 64 + 3; }

static inline float pm(float a, int s) { return s ? a : -a; }

// the exact value of salient column c of a row (kept), as BlockCode.dense computes it; `main` = its value
// without the salient code (alpha B + mu) for layouts whose salient columns share the block's first plane
static inline float salient_value(const Lin& L, int64_t bl, int64_t r, int s1, int s2, float main) {
    float q = main;
    if (L.sc[ALPHA_S].has(bl)) q = pm(L.sc[ALPHA_S].get(bl, r), s1) + L.sc[MU_S].get(bl, r);
    float mr = L.sc[MU_R].has(bl) ? L.sc[MU_R].get(bl, r) : 0.0f;
    return q + (pm(L.sc[ALPHA_R].get(bl, r), s2) + mr);
}

static void decode_row(const Lin& L, int64_t r, const uint64_t* K, const uint64_t* S, int64_t& s2pos,
                       const float* acol, float* out) {
    for (int64_t bl = 0; bl < L.nblocks; bl++) {
        const int64_t o = L.block_off[bl], e = L.block_off[bl + 1];
        const bool rc = L.sc[ALPHA_COL].has(bl);
        const float a = L.sc[ALPHA].get(bl, r);
        const float vp = rc ? 0.0f : a + L.sc[MU].get(bl, r);
        const float vn = rc ? 0.0f : -a + L.sc[MU].get(bl, r);
        int64_t c = o;
        for (; c + 8 <= e; c += 8) {
            uint32_t k = get8(K, c), s = get8(S, c);
            v8u res;
            if (rc) {
                v8f v;
                memcpy(&v, acol + c, 32);
                v8f av = a * v;  // fl(alpha * alpha_col), then the sign: exactly dense()'s alpha*alpha_col*B
                v8u au;
                memcpy(&au, &av, 32);
                res = (au ^ (LANES[k & ~s & 0xFF] & 0x80000000u)) & LANES[k];
            } else {
                v8u up, un;
                float fp = vp, fn = vn;
                uint32_t ip, in;
                memcpy(&ip, &fp, 4);
                memcpy(&in, &fn, 4);
                up = ip - (v8u){};
                un = in - (v8u){};
                res = (up & LANES[k & s]) | (un & LANES[k & ~s & 0xFF]);
            }
            memcpy(out + c, &res, 32);
        }
        for (; c < e; c++) {
            float v = rc ? a * acol[c] : 0.0f;
            float q = rc ? pm(v, bit(S, c)) : (bit(S, c) ? vp : vn);
            out[c] = bit(K, c) ? q : 0.0f;
        }
        for (int64_t j = L.sal_off[bl]; j < L.sal_off[bl + 1]; j++) {
            int64_t col = L.sal_cols[j];
            if (!bit(K, col)) continue;
            int s2 = (int)bits(L.sign2, L.sign2_len, s2pos++, 1);
            out[col] = salient_value(L, bl, r, bit(S, col), s2, out[col]);
        }
    }
}

static std::vector<float> alpha_cols(const Lin& L) {  // alpha_col of every column in float32 (ARB-RC)
    std::vector<float> acol;
    for (int64_t bl = 0; bl < L.nblocks; bl++) {
        if (!L.sc[ALPHA_COL].has(bl)) continue;
        if (acol.empty()) acol.assign(L.C + 8, 0.0f);
        for (int64_t c = L.block_off[bl]; c < L.block_off[bl + 1]; c++)
            acol[c] = L.sc[ALPHA_COL].get(bl, c - L.block_off[bl]);
    }
    return acol;
}

extern "C" int pbs2p_p_size() { return P_SIZE; }

// rows [r0, r1) of W_hat into out (row stride ldo floats); r0 must be a multiple of the chunk
extern "C" int pbs2p_decode_rows(const int64_t* P, int64_t r0, int64_t r1, float* out, int64_t ldo) {
    init_lanes();
    const Lin L(P);
    if (r0 % L.chunk) return 1;
    std::vector<float> acol = alpha_cols(L);
    const float* ac = acol.empty() ? nullptr : acol.data();
    const int64_t nch = (r1 - r0 + L.chunk - 1) / L.chunk;
#pragma omp parallel num_threads((int)L.nthreads)
    {
        const int64_t W = words_of(L);
        std::vector<uint64_t> K(W), S(W);
#pragma omp for schedule(dynamic, 1)
        for (int64_t ch = 0; ch < nch; ch++) {
            const int64_t a = r0 + ch * L.chunk, z = a + L.chunk < r1 ? a + L.chunk : r1;
            int64_t spos = L.sign_start[a / L.chunk], s2pos = L.sign2_start[a / L.chunk];
            for (int64_t r = a; r < z; r++) {
                row_bits(L, r, K.data(), S.data(), W, spos);
                decode_row(L, r, K.data(), S.data(), s2pos, ac, out + (r - r0) * ldo);
            }
        }
    }
    return 0;
}

static inline float hsum(v8f v) {
    return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

template <int NB>
static void gemv_block(const uint64_t* K, const uint64_t* S, int64_t o, int64_t e, const float* x, int64_t ldx,
                       float* sumS, float* sumT) {
    v8f accS[NB], accT[NB];
    for (int t = 0; t < NB; t++) accS[t] = accT[t] = (v8f){};
    for (int64_t c = o; c < e; c += 8) {
        uint32_t k = get8(K, c), s = get8(S, c);
        if (c + 8 > e) k &= (1u << (e - c)) - 1;
        const v8u km = LANES[k], sm = LANES[k & ~s & 0xFF] & 0x80000000u;
        for (int t = 0; t < NB; t++) {
            v8u xv;
            memcpy(&xv, x + t * ldx + c, 32);
            v8u xm = xv & km;
            v8u xs = xm ^ sm;
            v8f fm, fs;
            memcpy(&fm, &xm, 32);
            memcpy(&fs, &xs, 32);
            accT[t] += fm;
            accS[t] += fs;
        }
    }
    for (int t = 0; t < NB; t++) {
        sumS[t] = hsum(accS[t]);
        sumT[t] = hsum(accT[t]);
    }
}

typedef void (*block_fn)(const uint64_t*, const uint64_t*, int64_t, int64_t, const float*, int64_t, float*, float*);
static const block_fn BLOCK_FNS[9] = {nullptr,           gemv_block<1>, gemv_block<2>, gemv_block<3>, gemv_block<4>,
                                      gemv_block<5>,     gemv_block<6>, gemv_block<7>, gemv_block<8>};

// y (nb x R, row stride R) = x (nb x C, row stride ldx) W_hat^T
extern "C" int pbs2p_gemv(const int64_t* P, const float* x, int64_t nb, int64_t ldx, float* y) {
    init_lanes();
    const Lin L(P);
    const int64_t C = L.C, Cp = C + 16;
    // xp: x padded (zeros past C), the salient columns of blocks with their own first plane (alpha_s) zeroed
    // (their exact value is added one by one); xc: xp times alpha_col for ARB-RC blocks
    std::vector<float> xp(nb * Cp, 0.0f), xc;
    for (int64_t t = 0; t < nb; t++) memcpy(&xp[t * Cp], x + t * ldx, C * 4);
    for (int64_t bl = 0; bl < L.nblocks; bl++)
        if (L.sc[ALPHA_S].has(bl))
            for (int64_t j = L.sal_off[bl]; j < L.sal_off[bl + 1]; j++)
                for (int64_t t = 0; t < nb; t++) xp[t * Cp + L.sal_cols[j]] = 0.0f;
    std::vector<float> acol = alpha_cols(L);
    if (!acol.empty()) {
        xc = xp;
        for (int64_t t = 0; t < nb; t++)
            for (int64_t c = 0; c < C; c++) xc[t * Cp + c] *= acol[c];
    }
    const int64_t nch = (L.R + L.chunk - 1) / L.chunk;
#pragma omp parallel num_threads((int)L.nthreads)
    {
        const int64_t W = words_of(L);
        std::vector<uint64_t> K(W), S(W);
        float sS[8], sT[8];
        std::vector<float> acc(nb);
#pragma omp for schedule(dynamic, 1)
        for (int64_t ch = 0; ch < nch; ch++) {
            const int64_t a = ch * L.chunk, z = a + L.chunk < L.R ? a + L.chunk : L.R;
            int64_t spos = L.sign_start[ch], s2pos = L.sign2_start[ch];
            for (int64_t r = a; r < z; r++) {
                row_bits(L, r, K.data(), S.data(), W, spos);
                for (int64_t t = 0; t < nb; t++) acc[t] = 0.0f;
                for (int64_t bl = 0; bl < L.nblocks; bl++) {
                    const int64_t o = L.block_off[bl], e = L.block_off[bl + 1];
                    const bool rc = L.sc[ALPHA_COL].has(bl);
                    const float* xs = rc ? xc.data() : xp.data();
                    const float al = L.sc[ALPHA].get(bl, r), mu = rc ? 0.0f : L.sc[MU].get(bl, r);
                    for (int64_t t0 = 0; t0 < nb; t0 += 8) {
                        const int64_t tn = nb - t0 < 8 ? nb - t0 : 8;
                        BLOCK_FNS[tn](K.data(), S.data(), o, e, xs + t0 * Cp, Cp, sS, sT);
                        for (int64_t t = 0; t < tn; t++) acc[t0 + t] += rc ? al * sS[t] : al * sS[t] + mu * sT[t];
                    }
                    for (int64_t j = L.sal_off[bl]; j < L.sal_off[bl + 1]; j++) {
                        const int64_t col = L.sal_cols[j];
                        if (!bit(K.data(), col)) continue;
                        const int s1 = bit(S.data(), col), s2 = (int)bits(L.sign2, L.sign2_len, s2pos++, 1);
                        float v;
                        if (L.sc[ALPHA_S].has(bl)) {
                            v = salient_value(L, bl, r, s1, s2, 0.0f);
                        } else {  // the first plane is in the block sum already: add the residual code only
                            float mr = L.sc[MU_R].has(bl) ? L.sc[MU_R].get(bl, r) : 0.0f;
                            v = pm(L.sc[ALPHA_R].get(bl, r), s2) + mr;
                        }
                        for (int64_t t = 0; t < nb; t++) acc[t] += x[t * ldx + col] * v;
                    }
                }
                for (int64_t t = 0; t < nb; t++) y[t * L.R + r] = acc[t];
            }
        }
    }
    return 0;
}
