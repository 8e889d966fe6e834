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
#include "packed_kernel.h"

// the scales of one row of one block, read once: the first plane's values for B = +1 / -1 (ARB-RC: +-alpha,
// the column factor applies to x or to the decoded value), and the salient columns' codes: full layout
// (alpha_s) sal[s1 * 2 + s2] = (alpha_s B1 + mu_s) + (alpha_r B2 + mu_r), the column's whole value; otherwise
// sal[s2] = alpha_r B2 + mu_r, added to the first plane's value. Same float operations as BlockCode.dense.
struct RowBlock {
    bool rc, full;
    float a, vp, vn, sal[5];
};

static inline RowBlock row_block(const Lin& L, int64_t bl, int64_t r) {
    RowBlock q;
    q.sal[4] = 0.0f;
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

static void decode_row(const Lin& L, int64_t r, const Row& w, const SalientPos& sp, BitReader& s2,
                       const float* acol, float* out) {
    for (int64_t bl = 0; bl < L.nblocks; bl++) {
        const int64_t o = L.block_off[bl], e = L.block_off[bl + 1];
        const RowBlock q = row_block(L, bl, r);
        const bool rc = q.rc;
        const float a = q.a, vp = q.vp, vn = q.vn;
        const v8u up = bcast(vp), un = bcast(vn);
        for (int64_t c = o, ch = L.chunk_off[bl]; c < e; c += 8, ch++) {
            const uint32_t p = w.v[ch] & 0xFFu, n = w.v[ch] >> 8;
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
        for (int64_t j = L.sal_off[bl]; j < L.sal_off[bl + 1]; j++) {  // pruned: sal[4] = 0, out stays +0
            const int64_t col = L.sal_cols[j];
            const uint32_t k = salient_index(w, sp, j, s2);
            out[col] = q.full ? q.sal[k] : out[col] + q.sal[k];
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
    const SalientPos sp(L);
    const int64_t nch = (r1 - r0 + L.chunk - 1) / L.chunk;
#pragma omp parallel num_threads((int)L.nthreads)
    {
        Row w(L);
#pragma omp for schedule(static) nowait
        for (int64_t ch = 0; ch < nch; ch++) {
            const int64_t a = r0 + ch * L.chunk, z = a + L.chunk < r1 ? a + L.chunk : r1;
            int64_t spos = L.sign_start[a / L.chunk];
            BitReader s2(L.sign2, L.sign2_len, L.sign2_start[a / L.chunk]);
            for (int64_t r = a; r < z; r++) {
                row_codes(L, r, w, spos);
                decode_row(L, r, w, sp, s2, ac, out + (r - r0) * ldo);
            }
        }
    }
    return 0;
}

// NB rows of x dotted with row r of W_hat: per block, the chunk sums of the kept-positive and kept-negative
// inputs from the subset-sum tables (tab[t] + chunk * 256: the 256 sums of a chunk's 8 inputs), times the
// block's values for B = +1 and -1; then the salient columns (xsal: x at the salient columns, per input).
// FUSED (an m = 8 rank code): each group's (rank, signs) is decoded here, 8 groups per read of each stream,
// straight into the lookups (and into w.v for the salient columns); else w.v comes from row_codes.
template <int NB, bool FUSED>
static void row_dot(const Lin& L, Row& w, int64_t r, BitReader& s2_, const SalientPos& sp, const float* tab,
                    int64_t ldt, const float* xsal, int64_t nsal, float* out) {
    const int64_t nchunks = L.nchunks();
    BitReader s2 = s2_;  // a local copy: the compiler keeps it in registers (no stores through the reference)
    const int64_t n = L.n, b = L.b, g0 = r * (L.C / 8);
    const uint64_t cm = (1ull << b) - 1, sm = (1ull << n) - 1;
    float acc[NB], sa[NB], sb[NB];
    for (int t = 0; t < NB; t++) acc[t] = sa[t] = sb[t] = 0.0f;
    for (int64_t bl = 0; bl < L.nblocks; bl++) {
        const RowBlock q = row_block(L, bl, r);
        float p0[NB], p1[NB], n0[NB], n1[NB];
        for (int t = 0; t < NB; t++) p0[t] = p1[t] = n0[t] = n1[t] = 0.0f;
        int64_t g = L.chunk_off[bl];
        const int64_t c1 = L.chunk_off[bl + 1];
        for (; g + 8 <= c1; g += 8) {
            uint64_t cw = 0, sw = 0;
            if (FUSED) {
                cw = bits(L.mask, L.mask_len, (g0 + g) * b, (int)(8 * b));
                sw = bits(L.sign, L.sign_len, (g0 + g) * n, (int)(8 * n));
            }
            for (int i = 0; i < 8; i += 2) {
                uint32_t u, v;
                if (FUSED) {
                    u = L.dep2[((cw & cm) << n) | (sw & sm)];
                    cw >>= b, sw >>= n;
                    v = L.dep2[((cw & cm) << n) | (sw & sm)];
                    cw >>= b, sw >>= n;
                    w.kb[g + i] = (uint8_t)(u | u >> 8), w.kb[g + i + 1] = (uint8_t)(v | v >> 8);
                    w.pb[g + i] = (uint8_t)u, w.pb[g + i + 1] = (uint8_t)v;
                } else {
                    u = w.v[g + i], v = w.v[g + i + 1];
                }
                for (int t = 0; t < NB; t++) {
                    const float* T = tab + t * ldt + (g + i) * 256;
                    p0[t] += T[u & 0xFFu];
                    n0[t] += T[u >> 8];
                    p1[t] += T[256 + (v & 0xFFu)];
                    n1[t] += T[256 + (v >> 8)];
                }
            }
        }
        for (; g < c1; g++) {
            uint32_t u = w.v[g];
            if (FUSED) {
                const uint64_t code = bits(L.mask, L.mask_len, (g0 + g) * b, (int)b);
                u = L.dep2[(code << n) | bits(L.sign, L.sign_len, (g0 + g) * n, (int)n)];
                w.kb[g] = (uint8_t)(u | u >> 8), w.pb[g] = (uint8_t)u;
            }
            for (int t = 0; t < NB; t++) {
                p0[t] += tab[t * ldt + g * 256 + (u & 0xFFu)];
                n0[t] += tab[t * ldt + g * 256 + (u >> 8)];
            }
        }
        for (int t = 0; t < NB; t++) acc[t] += q.vp * (p0[t] + p1[t]) + q.vn * (n0[t] + n1[t]);
        int64_t j = L.sal_off[bl];
        const int64_t j1 = L.sal_off[bl + 1];
        if (FUSED && j < j1) {  // the block's salient columns at once: kept, B1 and B2 bits, 4 subset sums
            uint64_t kept = 0, s1 = 0;
            int at = 0;
            for (int64_t e = sp.w0[bl]; e < sp.w0[bl + 1]; e++) {
                uint64_t kw, pw;
                memcpy(&kw, &w.kb[8 * sp.word[e]], 8);
                memcpy(&pw, &w.pb[8 * sp.word[e]], 8);
                kept |= extract(kw, sp.mask[e]) << at;
                s1 |= extract(pw, sp.mask[e]) << at;
                at += __builtin_popcountll(sp.mask[e]);
            }
            const uint64_t b2 = deposit(s2.take(__builtin_popcountll(kept)), kept);
            const uint64_t m[4] = {kept & ~s1 & ~b2, kept & ~s1 & b2, s1 & ~b2, s1 & b2};  // = sal[0..3]
            const float* T = tab + (nchunks + sp.tab0[bl]) * 256;
            for (int c = 0; c < 4; c++)
                for (int t = 0; t < NB; t++) {
                    float sum = 0.0f;
                    for (int q8 = 0; q8 * 8 < j1 - j; q8++) sum += T[t * ldt + q8 * 256 + ((m[c] >> (8 * q8)) & 0xFFu)];
                    (c & 1 ? sb : sa)[t] += q.sal[c] * sum;
                }
            j = j1;
        }
        for (; j + 2 <= j1; j += 2) {  // full: the whole value (x is 0 in the table); two sums: no long chain
            const float v = q.sal[salient_index(w, sp, j, s2)], v2 = q.sal[salient_index(w, sp, j + 1, s2)];
            for (int t = 0; t < NB; t++) {
                sa[t] += xsal[t * nsal + j] * v;
                sb[t] += xsal[t * nsal + j + 1] * v2;
            }
        }
        if (j < j1) {
            const float v = q.sal[salient_index(w, sp, j, s2)];
            for (int t = 0; t < NB; t++) sa[t] += xsal[t * nsal + j] * v;
        }
    }
    for (int t = 0; t < NB; t++) out[t] = acc[t] + (sa[t] + sb[t]);
    s2_ = s2;
}

typedef void (*dot_fn)(const Lin&, Row&, int64_t, BitReader&, const SalientPos&, const float*, int64_t,
                       const float*, int64_t, float*);
static const dot_fn DOTS[2][5] = {
    {nullptr, row_dot<1, false>, row_dot<2, false>, row_dot<3, false>, row_dot<4, false>},
    {nullptr, row_dot<1, true>, row_dot<2, true>, row_dot<3, true>, row_dot<4, true>}};

// y (nb x R, row stride R) = x (nb x C, row stride ldx) W_hat^T
extern "C" int pbs2p_gemv(const int64_t* P, const float* x, int64_t nb, int64_t ldx, float* y) {
    init_lanes();
    const Lin L(P);
    const SalientPos sp(L);
    const int64_t C = L.C, nchunks = L.nchunks(), nsal = L.sal_off[L.nblocks];
    const int64_t ldt = (nchunks + sp.tab0[L.nblocks]) * 256;  // per input: the chunks' tables, the salient ones
    // the inputs each chunk's table sums: x, with the salient columns of blocks that give them their own
    // first plane (alpha_s) zeroed (their exact value is added one by one), times alpha_col in ARB-RC blocks
    std::vector<float> xs(nb * (C + 8), 0.0f), xsal(nb * nsal + 1);
    std::vector<float> acol = alpha_cols(L);
    for (int64_t t = 0; t < nb; t++) {
        float* row = &xs[t * (C + 8)];
        memcpy(row, x + t * ldx, C * 4);
        for (int64_t j = 0; j < nsal; j++) xsal[t * nsal + j] = row[L.sal_cols[j]];
        for (int64_t bl = 0; bl < L.nblocks; bl++) {
            if (L.sc[ALPHA_S].has(bl))
                for (int64_t j = L.sal_off[bl]; j < L.sal_off[bl + 1]; j++) row[L.sal_cols[j]] = 0.0f;
            if (L.sc[ALPHA_COL].has(bl))
                for (int64_t c = L.block_off[bl]; c < L.block_off[bl + 1]; c++) row[c] *= acol[c];
        }
    }
    const int64_t nch = (L.R + L.chunk - 1) / L.chunk;
    // one parallel loop and no barrier inside: every thread builds its own copy of the tables (a few hundred
    // KiB at most, in its own cache), so that a thread the OS runs late never holds the others up
#pragma omp parallel num_threads((int)L.nthreads)
    {
        std::vector<float> tab(nb * ldt);
        for (int64_t t = 0; t < nb; t++)  // subset sums: T[k] = sum of the inputs of k's bits
            for (int64_t bl = 0; bl < L.nblocks; bl++)
                for (int64_t ch = L.chunk_off[bl]; ch < L.chunk_off[bl + 1]; ch++) {
                    const int64_t c = L.block_off[bl] + (ch - L.chunk_off[bl]) * 8, e = L.block_off[bl + 1];
                    float* T = &tab[t * ldt + ch * 256];
                    const float* xv = &xs[t * (C + 8) + c];
                    T[0] = 0.0f;
                    for (int j = 0; j < 8; j++) {
                        const float v = c + j < e ? xv[j] : 0.0f;
                        for (int i = 0; i < (1 << j); i++) T[(1 << j) + i] = T[i] + v;
                    }
                }
        for (int64_t t = 0; t < nb && L.fast && sp.words; t++)  // the salient columns' sums, 8 columns a table
            for (int64_t bl = 0; bl < L.nblocks; bl++)
                for (int64_t j = L.sal_off[bl], q8 = 0; j < L.sal_off[bl + 1]; j += 8, q8++) {
                    float* T = &tab[t * ldt + (nchunks + sp.tab0[bl] + q8) * 256];
                    T[0] = 0.0f;
                    for (int i = 0; i < 8; i++) {
                        const float v = j + i < L.sal_off[bl + 1] ? xsal[t * nsal + j + i] : 0.0f;
                        for (int k = 0; k < (1 << i); k++) T[(1 << i) + k] = T[k] + v;
                    }
                }
        Row w(L);
        float out[4];
#pragma omp for schedule(static) nowait
        for (int64_t ch = 0; ch < nch; ch++) {
            const int64_t a = ch * L.chunk, z = a + L.chunk < L.R ? a + L.chunk : L.R;
            int64_t spos = L.sign_start[ch];
            BitReader s2(L.sign2, L.sign2_len, L.sign2_start[ch]);
            for (int64_t r = a; r < z; r++) {
                if (!(L.fast && sp.words)) row_codes(L, r, w, spos);
                const BitReader start = s2;
                for (int64_t t0 = 0; t0 < nb; t0 += 4) {  // every group of 4 inputs reads the row's sign2 again
                    const int64_t tn = nb - t0 < 4 ? nb - t0 : 4;
                    s2 = start;
                    DOTS[L.fast && sp.words][tn](L, w, r, s2, sp, &tab[t0 * ldt], ldt, &xsal[t0 * nsal], nsal, out);
                    for (int64_t t = 0; t < tn; t++) y[(t0 + t) * L.R + r] = out[t];
                }
            }
        }
    }
    return 0;
}
