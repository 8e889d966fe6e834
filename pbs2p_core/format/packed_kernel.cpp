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
#if defined(__BMI2__) || defined(__F16C__)
#include <immintrin.h>
#endif

typedef float v8f __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));

enum {
    P_R, P_C, P_N, P_M, P_MASK_KIND, P_RANK_BITS, P_NBLOCKS, P_CHUNK,
    P_MASK, P_SIGN, P_SIGN2, P_DEP, P_BITMAP_OF, P_BLOCK_OFF, P_SAL_OFF, P_SAL_COLS,
    P_SIGN_START, P_SIGN2_START, P_MASK_LEN, P_SIGN_LEN, P_SIGN2_LEN, P_NTHREADS, P_DEP2,
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
#ifdef __F16C__
    return _cvtsh_ss(h);
#endif
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
    const uint16_t *dep, *bitmap_of, *dep2;
    const int64_t *block_off, *sal_off, *sal_cols, *sign_start, *sign2_start;
    int64_t mask_len, sign_len, sign2_len, nthreads;
    Scale sc[NROLES];
    std::vector<int64_t> chunk_off;  // per block, its first 8-column chunk (chunks are block-relative)
    bool fast;                       // an m = 8 rank code: a chunk is a group (blocks are multiples of 8)
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
        dep2 = (const uint16_t*)P[P_DEP2];
        chunk_off.assign(nblocks + 1, 0);
        for (int64_t bl = 0; bl < nblocks; bl++)
            chunk_off[bl + 1] = chunk_off[bl] + (block_off[bl + 1] - block_off[bl] + 7) / 8;
        fast = kind == MASK_RANK && m == 8 && dep2 != nullptr && n <= 7 && b <= 7;
    }
    int64_t nchunks() const { return chunk_off[nblocks]; }
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

struct Row {  // one thread's scratch: a row's kept-and-positive / kept-and-negative bits per 8-column chunk
    std::vector<uint64_t> K, S;
    std::vector<uint8_t> pos, neg;
    explicit Row(const Lin& L) : K(words_of(L)), S(words_of(L)), pos(L.nchunks() + 8), neg(L.nchunks() + 8) {}
};

static void row_codes(const Lin& L, int64_t r, Row& w, int64_t& spos) {
    if (L.fast) {  // 8 groups (8 rank codes, 8 x n signs) per read of each stream
        const int64_t G = L.C / 8, n = L.n, b = L.b, g0 = r * G;
        const uint64_t cm = (1ull << b) - 1, sm = (1ull << n) - 1;
        int64_t g = 0;
        for (; g + 8 <= G; g += 8) {
            uint64_t cw = bits(L.mask, L.mask_len, (g0 + g) * b, (int)(8 * b));
            uint64_t sw = bits(L.sign, L.sign_len, (g0 + g) * n, (int)(8 * n));
            for (int i = 0; i < 8; i++) {
                uint16_t v = L.dep2[((cw & cm) << n) | (sw & sm)];
                cw >>= b;
                sw >>= n;
                w.pos[g + i] = (uint8_t)v;
                w.neg[g + i] = (uint8_t)(v >> 8);
            }
        }
        for (; g < G; g++) {
            uint64_t code = bits(L.mask, L.mask_len, (g0 + g) * b, (int)b);
            uint16_t v = L.dep2[(code << n) | bits(L.sign, L.sign_len, (g0 + g) * n, (int)n)];
            w.pos[g] = (uint8_t)v;
            w.neg[g] = (uint8_t)(v >> 8);
        }
        return;
    }
    row_bits(L, r, w.K.data(), w.S.data(), words_of(L), spos);
    for (int64_t bl = 0; bl < L.nblocks; bl++) {
        const int64_t o = L.block_off[bl], e = L.block_off[bl + 1];
        for (int64_t c = o, ch = L.chunk_off[bl]; c < e; c += 8, ch++) {
            uint32_t k = get8(w.K.data(), c), sg = get8(w.S.data(), c);
            if (c + 8 > e) k &= (1u << (e - c)) - 1;
            w.pos[ch] = (uint8_t)(k & sg);
            w.neg[ch] = (uint8_t)(k & ~sg);
        }
    }
}

// (kept, first-plane sign) of column col of block bl in the row's chunks
static inline void kept_sign(const Lin& L, const Row& w, int64_t bl, int64_t col, int& kept, int& s1) {
    int64_t rel = col - L.block_off[bl], ch = L.chunk_off[bl] + rel / 8;
    int sh = (int)(rel & 7);
    s1 = (w.pos[ch] >> sh) & 1;
    kept = s1 | ((w.neg[ch] >> sh) & 1);
}


// the scales of one row of one block, read once: the first plane's values for B = +1 / -1 (ARB-RC: +-alpha,
// the column factor applies to x or to the decoded value), and the salient columns' codes: full layout
// (alpha_s) sal[s1 * 2 + s2] = (alpha_s B1 + mu_s) + (alpha_r B2 + mu_r), the column's whole value; otherwise
// sal[s2] = alpha_r B2 + mu_r, added to the first plane's value. Same float operations as BlockCode.dense.
struct RowBlock {
    bool rc, full;
    float a, vp, vn, sal[4];
};

static inline RowBlock row_block(const Lin& L, int64_t bl, int64_t r) {
    RowBlock q;
    q.rc = L.sc[ALPHA_COL].has(bl);
    q.a = L.sc[ALPHA].get(bl, r);
    const float mu = q.rc ? 0.0f : L.sc[MU].get(bl, r);
    q.vp = q.rc ? q.a : q.a + mu;  // alpha * (+-1) is exact
    q.vn = q.rc ? -q.a : -q.a + mu;
    q.full = L.sc[ALPHA_S].has(bl);
    if (L.sal_off[bl + 1] > L.sal_off[bl]) {
        const float ar = L.sc[ALPHA_R].get(bl, r), mr = L.sc[MU_R].has(bl) ? L.sc[MU_R].get(bl, r) : 0.0f;
        const float rp = ar + mr, rn = -ar + mr;
        if (q.full) {
            const float as = L.sc[ALPHA_S].get(bl, r), ms = L.sc[MU_S].get(bl, r);
            const float fp = as + ms, fn = -as + ms;
            q.sal[0] = fn + rn, q.sal[1] = fn + rp, q.sal[2] = fp + rn, q.sal[3] = fp + rp;
        } else {
            q.sal[0] = q.sal[2] = rn, q.sal[1] = q.sal[3] = rp;
        }
    }
    return q;
}

static inline v8u bcast(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return (v8u){} + u;
}

static void decode_row(const Lin& L, int64_t r, const Row& w, int64_t& s2pos, const float* acol, float* out) {
    for (int64_t bl = 0; bl < L.nblocks; bl++) {
        const int64_t o = L.block_off[bl], e = L.block_off[bl + 1];
        const RowBlock q = row_block(L, bl, r);
        const bool rc = q.rc;
        const float a = q.a, vp = q.vp, vn = q.vn;
        const v8u up = bcast(vp), un = bcast(vn);
        for (int64_t c = o, ch = L.chunk_off[bl]; c < e; c += 8, ch++) {
            const uint32_t p = w.pos[ch], n = w.neg[ch];
            if (c + 8 <= e) {
                v8u res;
                if (rc) {  // fl(alpha * alpha_col), then the sign: exactly dense()'s alpha * alpha_col * B
                    v8f v;
                    memcpy(&v, acol + c, 32);
                    v8f av = a * v;
                    v8u au;
                    memcpy(&au, &av, 32);
                    res = (au & LANES[p]) | ((au ^ 0x80000000u) & LANES[n]);
                } else {
                    res = (up & LANES[p]) | (un & LANES[n]);
                }
                memcpy(out + c, &res, 32);
            } else {
                for (int64_t i = 0; c + i < e; i++) {
                    float v = rc ? a * acol[c + i] : 0.0f;
                    out[c + i] = (p >> i) & 1 ? (rc ? v : vp) : (n >> i) & 1 ? (rc ? -v : vn) : 0.0f;
                }
            }
        }
        for (int64_t j = L.sal_off[bl]; j < L.sal_off[bl + 1]; j++) {
            int64_t col = L.sal_cols[j];
            int kept, s1;
            kept_sign(L, w, bl, col, kept, s1);
            if (!kept) continue;
            const int s2 = (int)bits(L.sign2, L.sign2_len, s2pos++, 1);
            out[col] = q.full ? q.sal[s1 * 2 + s2] : out[col] + q.sal[s2];
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
        Row w(L);
#pragma omp for schedule(dynamic, 1)
        for (int64_t ch = 0; ch < nch; ch++) {
            const int64_t a = r0 + ch * L.chunk, z = a + L.chunk < r1 ? a + L.chunk : r1;
            int64_t spos = L.sign_start[a / L.chunk], s2pos = L.sign2_start[a / L.chunk];
            for (int64_t r = a; r < z; r++) {
                row_codes(L, r, w, spos);
                decode_row(L, r, w, s2pos, ac, out + (r - r0) * ldo);
            }
        }
    }
    return 0;
}

struct BitReader {  // one bit at a time from an LSB-first stream, 56 bits a read
    const uint8_t* p;
    int64_t len, pos;
    uint64_t buf = 0;
    int left = 0;
    inline int get() {
        if (!left) {
            buf = bits(p, len, pos, 56);
            left = 56;
        }
        int b = (int)(buf & 1);
        buf >>= 1;
        left--;
        pos++;
        return b;
    }
};

// NB rows of x dotted with row r of W_hat: per block, the chunk sums of the kept-positive and kept-negative
// inputs from the subset-sum tables (tab[t] + chunk * 256, 256 sums of a chunk's 8 inputs), times the
// block's values for B = +1 and -1; then the salient columns one by one. Returns the advanced sign2 position.
template <int NB>
static int64_t row_dot(const Lin& L, const Row& w, int64_t r, int64_t s2pos, const float* tab, int64_t ldt,
                       const float* x, int64_t ldx, const int64_t* sal_ch, const int* sal_sh, float* out) {
    float acc[NB];
    for (int t = 0; t < NB; t++) acc[t] = 0.0f;
    BitReader s2{L.sign2, L.sign2_len, s2pos};
    for (int64_t bl = 0; bl < L.nblocks; bl++) {
        const RowBlock q = row_block(L, bl, r);
        float p0[NB], p1[NB], n0[NB], n1[NB];
        for (int t = 0; t < NB; t++) p0[t] = p1[t] = n0[t] = n1[t] = 0.0f;
        int64_t ch = L.chunk_off[bl];
        const int64_t c1 = L.chunk_off[bl + 1];
        for (; ch + 2 <= c1; ch += 2) {
            const uint32_t a = w.pos[ch], b = w.neg[ch], c = w.pos[ch + 1], d = w.neg[ch + 1];
            for (int t = 0; t < NB; t++) {
                const float* T = tab + t * ldt + ch * 256;
                p0[t] += T[a];
                n0[t] += T[b];
                p1[t] += T[256 + c];
                n1[t] += T[256 + d];
            }
        }
        if (ch < c1) {
            const uint32_t a = w.pos[ch], b = w.neg[ch];
            for (int t = 0; t < NB; t++) {
                p0[t] += tab[t * ldt + ch * 256 + a];
                n0[t] += tab[t * ldt + ch * 256 + b];
            }
        }
        for (int t = 0; t < NB; t++) acc[t] += q.vp * (p0[t] + p1[t]) + q.vn * (n0[t] + n1[t]);
        for (int64_t j = L.sal_off[bl]; j < L.sal_off[bl + 1]; j++) {
            const uint32_t pb = (w.pos[sal_ch[j]] >> sal_sh[j]) & 1, nb_ = (w.neg[sal_ch[j]] >> sal_sh[j]) & 1;
            if (!(pb | nb_)) continue;
            const float v = q.sal[pb * 2 + s2.get()];  // full: the whole value (x is 0 in the table)
            const int64_t col = L.sal_cols[j];
            for (int t = 0; t < NB; t++) acc[t] += x[t * ldx + col] * v;
        }
    }
    for (int t = 0; t < NB; t++) out[t] = acc[t];
    return s2.pos;
}

typedef int64_t (*dot_fn)(const Lin&, const Row&, int64_t, int64_t, const float*, int64_t, const float*, int64_t,
                          const int64_t*, const int*, float*);
static const dot_fn DOTS[5] = {nullptr, row_dot<1>, row_dot<2>, row_dot<3>, row_dot<4>};

// y (nb x R, row stride R) = x (nb x C, row stride ldx) W_hat^T
extern "C" int pbs2p_gemv(const int64_t* P, const float* x, int64_t nb, int64_t ldx, float* y) {
    init_lanes();
    const Lin L(P);
    const int64_t C = L.C, nchunks = L.nchunks(), ldt = nchunks * 256, nsal = L.sal_off[L.nblocks];
    // the inputs each chunk's table sums: x, with the salient columns of blocks that give them their own
    // first plane (alpha_s) zeroed (their exact value is added one by one), times alpha_col in ARB-RC blocks
    std::vector<float> xs(nb * (C + 8), 0.0f), tab(nb * ldt);
    std::vector<float> acol = alpha_cols(L);
    for (int64_t t = 0; t < nb; t++) {
        float* row = &xs[t * (C + 8)];
        memcpy(row, x + t * ldx, C * 4);
        for (int64_t bl = 0; bl < L.nblocks; bl++) {
            if (L.sc[ALPHA_S].has(bl))
                for (int64_t j = L.sal_off[bl]; j < L.sal_off[bl + 1]; j++) row[L.sal_cols[j]] = 0.0f;
            if (L.sc[ALPHA_COL].has(bl))
                for (int64_t c = L.block_off[bl]; c < L.block_off[bl + 1]; c++) row[c] *= acol[c];
        }
    }
    std::vector<int64_t> sal_ch(nsal + 1);  // chunk and bit of every salient column
    std::vector<int> sal_sh(nsal + 1);
    for (int64_t bl = 0; bl < L.nblocks; bl++)
        for (int64_t j = L.sal_off[bl]; j < L.sal_off[bl + 1]; j++) {
            const int64_t rel = L.sal_cols[j] - L.block_off[bl];
            sal_ch[j] = L.chunk_off[bl] + rel / 8;
            sal_sh[j] = (int)(rel & 7);
        }
    const int64_t nch = (L.R + L.chunk - 1) / L.chunk;
#pragma omp parallel num_threads((int)L.nthreads)
    {
#pragma omp for schedule(static)
        for (int64_t tc = 0; tc < nb * nchunks; tc++) {  // subset sums: T[k] = sum of the inputs of k's bits
            const int64_t t = tc / nchunks, ch = tc % nchunks;
            int64_t bl = 0;
            while (L.chunk_off[bl + 1] <= ch) bl++;
            const int64_t c = L.block_off[bl] + (ch - L.chunk_off[bl]) * 8, e = L.block_off[bl + 1];
            float* T = &tab[t * ldt + ch * 256];
            const float* xv = &xs[t * (C + 8) + c];
            T[0] = 0.0f;
            for (int j = 0; j < 8; j++) {
                const float v = c + j < e ? xv[j] : 0.0f;
                for (int i = 0; i < (1 << j); i++) T[(1 << j) + i] = T[i] + v;
            }
        }
        Row w(L);
        float out[4];
#pragma omp for schedule(dynamic, 1)
        for (int64_t ch = 0; ch < nch; ch++) {
            const int64_t a = ch * L.chunk, z = a + L.chunk < L.R ? a + L.chunk : L.R;
            int64_t spos = L.sign_start[ch], s2pos = L.sign2_start[ch];
            for (int64_t r = a; r < z; r++) {
                row_codes(L, r, w, spos);
                int64_t next = s2pos;
                for (int64_t t0 = 0; t0 < nb; t0 += 4) {
                    const int64_t tn = nb - t0 < 4 ? nb - t0 : 4;
                    next = DOTS[tn](L, w, r, s2pos, &tab[t0 * ldt], ldt, x + t0 * ldx, ldx, sal_ch.data(),
                                    sal_sh.data(), out);
                    for (int64_t t = 0; t < tn; t++) y[(t0 + t) * L.R + r] = out[t];
                }
                s2pos = next;
            }
        }
    }
    return 0;
}
