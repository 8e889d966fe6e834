// CPU kernels of PackedLinear (pbs2p_core/format/kernel.py builds this file with the system C++ compiler and
// loads it with ctypes; docs/artifact-format.md defines every bit read here).
//
// decode_rows: rows [r0, r1) of W_hat in float32, bit-exactly BlockCode.dense() (same float operations, no
//   fused multiply-add): the prefill path decodes a tile into a reused buffer and calls the BLAS matmul.
// gemv: y = x W_hat^T for a few rows of x straight from the packed bits: per row of W and column block, the
//   sums of x over the kept columns with stored sign +1 and with -1, then y += (alpha + mu) S+ + (-alpha + mu) S-
//   (ARB-RC: x pre-scaled by alpha_col, mu = 0); salient columns are added with their exact decoded value.
//   Equal to x W_hat^T up to float rounding (the order of the additions differs). Two ways:
//   - the decode path (m = 8 rank codes, the project's layouts; what decoding a token runs): 4 groups' (rank,
//     signs) codes at a time become their 32 columns' kept-positive / kept-negative bits through one 64-bit
//     table (pdep spreads the codes where BMI2 exists), which mask the adds of x (AVX-512 masked adds, else
//     256-entry lane tables with GCC vector extensions: AVX2 or SSE); no per-call tables, no row buffer;
//     rows run on a small pool of threads (Pool in the header) that never waits for a thread the OS runs late.
//   - the table path (other layouts): a row's mask and signs expanded to positional bits, then per 8 columns
//     subset-sum tables of x (256 sums a chunk) looked up, on OpenMP threads.
//
// decode_rows (and the table path) first expand one row's mask and signs to positional bit rows K (kept) and S
// (sign, 1 = +1), C bits each, then work on 8 columns at a time with lane masks from 256-entry tables.
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

// The table path (any other layout): NB rows of x dotted with row r of W_hat: per block, the chunk sums of the
// kept-positive and kept-negative inputs from the subset-sum tables (tab[t] + chunk * 256: the 256 sums of a
// chunk's 8 inputs), times the block's values for B = +1 and -1; then the salient columns one by one (xsal: x
// at the salient columns, per input). w.v comes from row_codes.
template <int NB>
static void row_dot(const Lin& L, const Row& w, int64_t r, BitReader& s2_, const SalientPos& sp, const float* tab,
                    int64_t ldt, const float* xsal, int64_t nsal, float* out) {
    BitReader s2 = s2_;  // a local copy: the compiler keeps it in registers (no stores through the reference)
    float acc[NB], sa[NB], sb[NB];
    for (int t = 0; t < NB; t++) acc[t] = sa[t] = sb[t] = 0.0f;
    for (int64_t bl = 0; bl < L.nblocks; bl++) {
        const RowBlock q = row_block(L, bl, r);
        float p0[NB], p1[NB], n0[NB], n1[NB];
        for (int t = 0; t < NB; t++) p0[t] = p1[t] = n0[t] = n1[t] = 0.0f;
        int64_t g = L.chunk_off[bl];
        const int64_t c1 = L.chunk_off[bl + 1];
        for (; g + 2 <= c1; g += 2) {
            const uint32_t u = w.v[g], v = w.v[g + 1];
            for (int t = 0; t < NB; t++) {
                const float* T = tab + t * ldt + g * 256;
                p0[t] += T[u & 0xFFu];
                n0[t] += T[u >> 8];
                p1[t] += T[256 + (v & 0xFFu)];
                n1[t] += T[256 + (v >> 8)];
            }
        }
        for (; g < c1; g++) {
            const uint32_t u = w.v[g];
            for (int t = 0; t < NB; t++) {
                p0[t] += tab[t * ldt + g * 256 + (u & 0xFFu)];
                n0[t] += tab[t * ldt + g * 256 + (u >> 8)];
            }
        }
        for (int t = 0; t < NB; t++) acc[t] += q.vp * (p0[t] + p1[t]) + q.vn * (n0[t] + n1[t]);
        int64_t j = L.sal_off[bl];
        const int64_t j1 = L.sal_off[bl + 1];
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

static inline float hsum(v8f v) {
    return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

static inline v8f lane_and(v8f x, uint32_t bits8) {  // x in the lanes of bits8's ones, +0 elsewhere
    v8u u;
    memcpy(&u, &x, 32);
    u &= LANES[bits8];
    v8f r;
    memcpy(&r, &u, 32);
    return r;
}

// 32 partial sums, one per column of 4 groups: add(x, m) adds x[i] to sum i where bit i of m is set
struct Sum32 {
#ifdef __AVX512F__  // masked adds straight from the bits
    __m512 lo = _mm512_setzero_ps(), hi = _mm512_setzero_ps();
    inline void add(const float* x, uint32_t m) {
        lo = _mm512_mask_add_ps(lo, (__mmask16)m, lo, _mm512_loadu_ps(x));
        hi = _mm512_mask_add_ps(hi, (__mmask16)(m >> 16), hi, _mm512_loadu_ps(x + 16));
    }
    inline v8f fold() const {  // the 8 sums of columns i, i + 8, i + 16, i + 24
        const __m512 s = _mm512_add_ps(lo, hi);
        const __m256 a = _mm512_castps512_ps256(s);
        const __m256 b = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s), 1));
        return (v8f)a + (v8f)b;
    }
#else  // lane masks from the 256-entry table (AVX2 or SSE, as the compiler targets)
    v8f a[4] = {};
    inline void add(const float* x, uint32_t m) {
        for (int i = 0; i < 4; i++) {
            v8f v;
            memcpy(&v, x + 8 * i, 32);
            a[i] += lane_and(v, (m >> (8 * i)) & 0xFFu);
        }
    }
    inline v8f fold() const { return (a[0] + a[1]) + (a[2] + a[3]); }
#endif
};

// Per (rank << n | signs) code of an m = 8 group: its kept-positive bits | kept-negative bits << 32 (QUAD), so
// that 4 groups' codes give the 32 kept-positive and the 32 kept-negative bits of their columns in one word;
// and the pdep masks that spread 4 groups' ranks and signs into 16-bit code lanes
struct Quads {
    std::vector<uint64_t> q;
    uint64_t mc = 0, ms = 0;
    explicit Quads(const Lin& L) {
        if (!L.fast) return;
        q.resize((size_t)1 << (L.b + L.n));
        for (size_t i = 0; i < q.size(); i++) q[i] = (uint64_t)(L.dep2[i] & 0xFFu) | (uint64_t)(L.dep2[i] >> 8) << 32;
        for (int i = 0; i < 4; i++) {
            mc |= ((1ull << L.b) - 1) << (16 * i + L.n);
            ms |= ((1ull << L.n) - 1) << (16 * i);
        }
    }
    // the 4 groups of the low 4 b bits of cw (ranks) and 4 n bits of sw (signs)
    inline uint64_t get(uint64_t cw, uint64_t sw, int64_t b, int64_t n) const {
        const uint64_t* Q = q.data();
#ifdef __BMI2__
        const uint64_t idx = _pdep_u64(cw, mc) | _pdep_u64(sw, ms);
        const uint64_t i0 = idx & 0xFFFFu, i1 = (idx >> 16) & 0xFFFFu, i2 = (idx >> 32) & 0xFFFFu, i3 = idx >> 48;
#else
        const uint64_t cm = (1ull << b) - 1, sm = (1ull << n) - 1;
        const uint64_t i0 = ((cw & cm) << n) | (sw & sm), i1 = (((cw >> b) & cm) << n) | ((sw >> n) & sm);
        const uint64_t i2 = (((cw >> 2 * b) & cm) << n) | ((sw >> 2 * n) & sm);
        const uint64_t i3 = (((cw >> 3 * b) & cm) << n) | ((sw >> 3 * n) & sm);
#endif
        (void)b, (void)n;
        return Q[i0] | Q[i1] << 8 | Q[i2] << 16 | Q[i3] << 24;
    }
};

// The decode path (an m = 8 rank code, <= 48 salient columns a block): NB rows of x dotted with row r of W_hat
// without tables. The (rank, signs) codes of 4 groups give the kept-positive bits p and kept-negative bits n of
// their 32 columns; their inputs (xs: x with the salient columns of alpha_s blocks zeroed, times alpha_col in
// ARB-RC blocks) are added, masked by p and by n, into 32-lane sums; per block y += vp * sum_p + vn * sum_n. The
// block's salient columns: their kept, B1 and B2 bits give each one's value from RowBlock::sal (0 when pruned),
// a lane each, times x at those columns (xsal: per block, padded to a multiple of 8 with zeros). Equal to
// x W_hat^T up to float rounding.
template <int NB>
static void row_dot_lanes(const Lin& L, const Quads& Q, int64_t r, BitReader& s2_, const SalientPos& sp,
                          const float* xs, int64_t ldx, const float* xsal, int64_t lds, float* out) {
    BitReader s2 = s2_;
    const int64_t n = L.n, b = L.b, g0 = r * (L.C / 8);
    v8f acc[NB], sacc[NB];
    for (int t = 0; t < NB; t++) acc[t] = sacc[t] = (v8f){};
    for (int64_t bl = 0; bl < L.nblocks; bl++) {
        const RowBlock q = row_block(L, bl, r);
        Sum32 P[NB], N[NB];
        v8f tp[NB], tn[NB];  // groups past the last whole 8
        for (int t = 0; t < NB; t++) tp[t] = tn[t] = (v8f){};
        uint64_t kept = 0, s1 = 0;  // the block's salient columns in order: kept, B1 = +1
        int at = 0;
        const uint64_t* rel = &sp.rel[sp.rel0[bl]];
        int64_t g = L.chunk_off[bl];
        const int64_t c1 = L.chunk_off[bl + 1];
        for (; g + 8 <= c1; g += 8, rel++) {
            uint64_t cw = bits(L.mask, L.mask_len, (g0 + g) * b, (int)(8 * b));
            const uint64_t sw = bits(L.sign, L.sign_len, (g0 + g) * n, (int)(8 * n));
            const uint64_t lo = Q.get(cw, sw, b, n), hi = Q.get(cw >> 4 * b, sw >> 4 * n, b, n);
            const uint64_t p64 = (lo & 0xFFFFFFFFull) | hi << 32, n64 = lo >> 32 | (hi & ~0xFFFFFFFFull);
            for (int t = 0; t < NB; t++) {
                const float* xv = xs + t * ldx + 8 * g;
                P[t].add(xv, (uint32_t)p64);
                N[t].add(xv, (uint32_t)n64);
                P[t].add(xv + 32, (uint32_t)(p64 >> 32));
                N[t].add(xv + 32, (uint32_t)(n64 >> 32));
            }
            if (*rel) {
                kept |= extract(p64 | n64, *rel) << at;
                s1 |= extract(p64, *rel) << at;
                at += __builtin_popcountll(*rel);
            }
        }
        for (int sh = 0; g < c1; g++, sh += 8) {
            const uint64_t code = bits(L.mask, L.mask_len, (g0 + g) * b, (int)b);
            const uint32_t u = L.dep2[(code << n) | bits(L.sign, L.sign_len, (g0 + g) * n, (int)n)];
            for (int t = 0; t < NB; t++) {
                v8f xa;
                memcpy(&xa, xs + t * ldx + 8 * g, 32);
                tp[t] += lane_and(xa, u & 0xFFu);
                tn[t] += lane_and(xa, u >> 8);
            }
            const uint64_t m8 = (*rel >> sh) & 0xFFu;
            if (m8) {
                kept |= extract((u | u >> 8) & 0xFFu, m8) << at;
                s1 |= extract(u & 0xFFu, m8) << at;
                at += __builtin_popcountll(m8);
            }
        }
        for (int t = 0; t < NB; t++) acc[t] += q.vp * (P[t].fold() + tp[t]) + q.vn * (N[t].fold() + tn[t]);
        if (!at) continue;
        const uint64_t b2 = deposit(s2.take(__builtin_popcountll(kept)), kept);
        const uint64_t m[4] = {kept & ~s1 & ~b2, kept & ~s1 & b2, s1 & ~b2, s1 & b2};  // = sal[0..3]
        const v8u vals[4] = {bcast(q.sal[0]), bcast(q.sal[1]), bcast(q.sal[2]), bcast(q.sal[3])};
        for (int64_t q8 = sp.tab0[bl]; q8 < sp.tab0[bl + 1]; q8++) {
            const int sh = (int)(8 * (q8 - sp.tab0[bl]));
            v8u vu = (vals[0] & LANES[(m[0] >> sh) & 0xFFu]) | (vals[1] & LANES[(m[1] >> sh) & 0xFFu]) |
                     (vals[2] & LANES[(m[2] >> sh) & 0xFFu]) | (vals[3] & LANES[(m[3] >> sh) & 0xFFu]);
            v8f vf;
            memcpy(&vf, &vu, 32);
            for (int t = 0; t < NB; t++) {
                v8f xv;
                memcpy(&xv, xsal + t * lds + 8 * q8, 32);
                sacc[t] += vf * xv;
            }
        }
    }
    for (int t = 0; t < NB; t++) out[t] = hsum(acc[t]) + hsum(sacc[t]);
    s2_ = s2;
}

typedef void (*lanes_fn)(const Lin&, const Quads&, int64_t, BitReader&, const SalientPos&, const float*, int64_t,
                         const float*, int64_t, float*);
static const lanes_fn LANE_DOTS[5] = {nullptr, row_dot_lanes<1>, row_dot_lanes<2>, row_dot_lanes<3>,
                                      row_dot_lanes<4>};

typedef void (*dot_fn)(const Lin&, const Row&, int64_t, BitReader&, const SalientPos&, const float*, int64_t,
                       const float*, int64_t, float*);
static const dot_fn DOTS[5] = {nullptr, row_dot<1>, row_dot<2>, row_dot<3>, row_dot<4>};

// What gemv reads of a linear besides x, built once per plan (pbs2p_plan_new): the descriptor decoded, the
// salient columns' positions, alpha_col of every column
struct Plan {
    Lin L;
    SalientPos sp;
    std::vector<float> acol;
    Quads quads;
    bool lanes;  // the table-free decode path applies
    explicit Plan(const int64_t* P) : L(P), sp(L), acol(alpha_cols(L)), quads(L), lanes(L.fast && sp.words) {}
};

extern "C" void* pbs2p_plan_new(const int64_t* P) {
    init_lanes();
    return new Plan(P);
}

extern "C" void pbs2p_plan_free(void* h) { delete (Plan*)h; }

struct LanesJob {
    const Plan* pl;
    const float* xs;
    int64_t ldx;
    const float* xsal;
    int64_t lds, nb;
    float* y;
};

static void lanes_chunk(const void* arg, int64_t ch) {  // rows [16 ch, 16 ch + 16) of the decode path
    const LanesJob& j = *(const LanesJob*)arg;
    const Lin& L = j.pl->L;
    const int64_t a = ch * L.chunk, z = a + L.chunk < L.R ? a + L.chunk : L.R;
    BitReader s2(L.sign2, L.sign2_len, L.sign2_start[ch]);
    float out[4];
    for (int64_t r = a; r < z; r++) {
        const BitReader start = s2;
        for (int64_t t0 = 0; t0 < j.nb; t0 += 4) {  // every group of 4 inputs reads the row's sign2 again
            const int64_t tn = j.nb - t0 < 4 ? j.nb - t0 : 4;
            s2 = start;
            LANE_DOTS[tn](L, j.pl->quads, r, s2, j.pl->sp, j.xs + t0 * j.ldx, j.ldx, j.xsal + t0 * j.lds, j.lds, out);
            for (int64_t t = 0; t < tn; t++) j.y[(t0 + t) * L.R + r] = out[t];
        }
    }
}

// y (nb x R, row stride R) = x (nb x C, row stride ldx) W_hat^T, on nthreads threads
extern "C" int pbs2p_gemv(const void* h, const float* x, int64_t nb, int64_t ldx, float* y, int64_t nthreads) {
    const Plan& pl = *(const Plan*)h;
    const Lin& L = pl.L;
    const SalientPos& sp = pl.sp;
    const int64_t C = L.C, nsal = L.sal_off[L.nblocks], nsal8 = sp.tab0[L.nblocks] * 8;
    const int64_t ldt = L.nchunks() * 256;  // per input: the chunks' subset-sum tables (table path)
    const int64_t ldx2 = C + 8;
    // the inputs the kept-column sums add: x, with the salient columns of blocks that give them their own
    // first plane (alpha_s) zeroed (their exact value is added one by one), times alpha_col in ARB-RC blocks;
    // xsal: x at the salient columns, one after the other (table path) or per block padded to 8 (lanes path)
    const int64_t lds = pl.lanes ? nsal8 : nsal;
    std::vector<float> xs(nb * ldx2, 0.0f), xsal(nb * lds + 8, 0.0f);
    for (int64_t t = 0; t < nb; t++) {
        float* row = &xs[t * ldx2];
        memcpy(row, x + t * ldx, C * 4);
        for (int64_t bl = 0; bl < L.nblocks; bl++) {
            for (int64_t j = L.sal_off[bl]; j < L.sal_off[bl + 1]; j++) {
                const int64_t at = pl.lanes ? 8 * sp.tab0[bl] + (j - L.sal_off[bl]) : j;
                xsal[t * lds + at] = row[L.sal_cols[j]];
                if (L.sc[ALPHA_S].has(bl)) row[L.sal_cols[j]] = 0.0f;
            }
            if (L.sc[ALPHA_COL].has(bl))
                for (int64_t c = L.block_off[bl]; c < L.block_off[bl + 1]; c++) row[c] *= pl.acol[c];
        }
    }
    const int64_t nch = (L.R + L.chunk - 1) / L.chunk;
    if (pl.lanes) {  // chunks of rows claimed from the pool: the caller never waits for a thread not yet run
        const LanesJob job{&pl, xs.data(), ldx2, xsal.data(), lds, nb, y};
        pool().run(nch, nthreads, lanes_chunk, &job);
        return 0;
    }
    // the table path: one parallel loop, chunks of rows handed out as threads come free; every thread builds
    // its own copy of the tables (a few hundred KiB at most)
#pragma omp parallel num_threads((int)nthreads)
    {
        std::vector<float> tab(nb * ldt);
        for (int64_t t = 0; t < nb; t++)  // subset sums: T[k] = sum of the inputs of k's bits
            for (int64_t bl = 0; bl < L.nblocks; bl++)
                for (int64_t ch = L.chunk_off[bl]; ch < L.chunk_off[bl + 1]; ch++) {
                    const int64_t c = L.block_off[bl] + (ch - L.chunk_off[bl]) * 8, e = L.block_off[bl + 1];
                    float* T = &tab[t * ldt + ch * 256];
                    const float* xv = &xs[t * ldx2 + c];
                    T[0] = 0.0f;
                    for (int j = 0; j < 8; j++) {
                        const float v = c + j < e ? xv[j] : 0.0f;
                        for (int i = 0; i < (1 << j); i++) T[(1 << j) + i] = T[i] + v;
                    }
                }
        Row w(L);
        float out[4];
#pragma omp for schedule(dynamic, 1) nowait
        for (int64_t ch = 0; ch < nch; ch++) {
            const int64_t a = ch * L.chunk, z = a + L.chunk < L.R ? a + L.chunk : L.R;
            int64_t spos = L.sign_start[ch];
            BitReader s2(L.sign2, L.sign2_len, L.sign2_start[ch]);
            for (int64_t r = a; r < z; r++) {
                row_codes(L, r, w, spos);
                const BitReader start = s2;
                for (int64_t t0 = 0; t0 < nb; t0 += 4) {  // every group of 4 inputs reads the row's sign2 again
                    const int64_t tn = nb - t0 < 4 ? nb - t0 : 4;
                    s2 = start;
                    DOTS[tn](L, w, r, s2, sp, &tab[t0 * ldt], ldt, &xsal[t0 * nsal], nsal, out);
                    for (int64_t t = 0; t < tn; t++) y[(t0 + t) * L.R + r] = out[t];
                }
            }
        }
    }
    return 0;
}
