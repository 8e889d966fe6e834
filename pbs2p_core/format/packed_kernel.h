// Shared by packed_kernel.cpp: the descriptor, the bit streams, the scales and the decoding of one row's mask
// and signs into per-chunk kept-positive / kept-negative bits (docs/artifact-format.md defines every bit).
#pragma once
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>
#if defined(__BMI2__) || defined(__F16C__) || defined(__AVX512F__)
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

static inline uint64_t extract(uint64_t src, uint64_t mask) {  // the bits of src under mask, packed low
#ifdef __BMI2__
    return _pext_u64(src, mask);
#else
    uint64_t r = 0;
    for (uint64_t bit = 1; mask; mask &= mask - 1, bit <<= 1)
        if (src & mask & (0 - mask)) r |= bit;
    return r;
#endif
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

struct Row {  // one thread's scratch: per 8-column chunk of a row, kept-and-positive | kept-and-negative << 8
    std::vector<uint64_t> K, S;
    std::vector<uint16_t> v;
    explicit Row(const Lin& L)
        : K(words_of(L)), S(words_of(L)), v(L.nchunks() + 8) {}
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
                w.v[g + i] = L.dep2[((cw & cm) << n) | (sw & sm)];
                cw >>= b;
                sw >>= n;
            }
        }
        for (; g < G; g++) {
            uint64_t code = bits(L.mask, L.mask_len, (g0 + g) * b, (int)b);
            w.v[g] = L.dep2[(code << n) | bits(L.sign, L.sign_len, (g0 + g) * n, (int)n)];
        }
        return;
    }
    row_bits(L, r, w.K.data(), w.S.data(), words_of(L), spos);
    for (int64_t bl = 0; bl < L.nblocks; bl++) {
        const int64_t o = L.block_off[bl], e = L.block_off[bl + 1];
        for (int64_t c = o, ch = L.chunk_off[bl]; c < e; c += 8, ch++) {
            uint32_t k = get8(w.K.data(), c), sg = get8(w.S.data(), c);
            if (c + 8 > e) k &= (1u << (e - c)) - 1;
            w.v[ch] = (uint16_t)((k & sg) | ((k & ~sg & 0xFFu) << 8));
        }
    }
}

struct BitReader {  // an LSB-first stream read in order, 56 bits a load
    const uint8_t* p;
    int64_t len, pos;
    uint64_t buf = 0;
    int left = 0;
    BitReader(const uint8_t* p_, int64_t len_, int64_t pos_) : p(p_), len(len_), pos(pos_) { refill(); }
    inline void refill() {
        buf = bits(p, len, pos, 56);
        left = 56;
    }
    inline uint32_t peek() const { return (uint32_t)(buf & 1); }
    inline uint64_t take(int k) {  // the next k <= 48 bits
        if (left < k) refill();
        const uint64_t r = buf & ((1ull << k) - 1);
        buf >>= k;
        left -= k;
        pos += k;
        return r;
    }
    inline void skip(uint32_t k) {  // k = 0 or 1
        buf >>= k;
        left -= (int)k;
        pos += k;
        if (!left) refill();
    }
};

// where the salient columns sit in a row's chunks: chunk index and bit, per salient column (global order)
struct SalientPos {
    std::vector<int64_t> ch;
    std::vector<int> sh;
    // the decode path (gemv, m = 8): per block, its salient columns as bits of 64-column windows of the block
    // (rel, from rel0[block]; window k = the block's columns [64 k, 64 k + 64)), and its first 8-lane group of
    // salient values (tab0); usable when every block has <= 48, in ascending order (the sign2 stream's order)
    std::vector<int64_t> rel0, tab0;
    std::vector<uint64_t> rel;
    bool words = true;
    explicit SalientPos(const Lin& L)
        : ch(L.sal_off[L.nblocks] + 1), sh(L.sal_off[L.nblocks] + 1), rel0(L.nblocks + 1, 0), tab0(L.nblocks + 1, 0) {
        for (int64_t bl = 0; bl < L.nblocks; bl++) {
            rel0[bl] = (int64_t)rel.size();
            rel.resize(rel.size() + (L.block_off[bl + 1] - L.block_off[bl] + 63) / 64 + 1, 0);
            tab0[bl + 1] = tab0[bl] + (L.sal_off[bl + 1] - L.sal_off[bl] + 7) / 8;
            words = words && L.sal_off[bl + 1] - L.sal_off[bl] <= 48;
            for (int64_t j = L.sal_off[bl]; j < L.sal_off[bl + 1]; j++) {
                const int64_t rc = L.sal_cols[j] - L.block_off[bl];
                ch[j] = L.chunk_off[bl] + rc / 8;
                sh[j] = (int)(rc & 7);
                words = words && (j == L.sal_off[bl] || L.sal_cols[j] > L.sal_cols[j - 1]);
                rel[rel0[bl] + rc / 64] |= 1ull << (rc & 63);
            }
        }
        rel0[L.nblocks] = (int64_t)rel.size();
    }
};

// the index into RowBlock::sal of salient column j of the row (4: not kept, value 0), without a branch; the
// residual sign is read from s2 only for a kept column
static inline uint32_t salient_index(const Row& w, const SalientPos& sp, int64_t j, BitReader& s2) {
    const uint32_t vv = (uint32_t)w.v[sp.ch[j]] >> sp.sh[j];
    const uint32_t pb = vv & 1, kept = pb | ((vv >> 8) & 1);
    const uint32_t b2 = s2.peek() & kept;
    s2.skip(kept);
    return (pb * 2 + b2) | ((kept ^ 1) << 2);
}



// A pool of helper threads for the decode path's short calls (tens of microseconds): the caller posts a job of
// `total` items and works on it itself; helpers that are awake claim items too. Items are claimed from one
// atomic ticket (job id | total | next item), so a helper the OS runs late finds nothing left and the caller
// never waits for it, only for items already claimed (a chunk of rows each): on a busy machine the call is at
// worst as fast as on one thread. Helpers spin a little after a job, then sleep.
class Pool {
    typedef void (*item_fn)(const void*, int64_t);
    std::atomic<uint64_t> ticket{0};  // id << 48 | total << 24 | next
    std::atomic<int64_t> done{0};
    std::atomic<int> sleepers{0};
    const void* arg = nullptr;
    item_fn fn = nullptr;
    std::mutex mu, busy;  // busy: one job at a time (a second caller meanwhile runs its job alone)
    std::condition_variable cv;
    std::vector<std::thread> helpers;
    uint64_t id = 0;

    static bool open(uint64_t t) { return (t & 0xFFFFFFull) < ((t >> 24) & 0xFFFFFFull); }
    bool claim_one() {  // claim and run one item of the current job; false when none is left
        uint64_t t = ticket.load(std::memory_order_acquire);
        while (open(t)) {
            if (ticket.compare_exchange_weak(t, t + 1, std::memory_order_acq_rel)) {
                fn(arg, (int64_t)(t & 0xFFFFFFull));  // the job lives until its last item is done
                done.fetch_add(1, std::memory_order_release);
                return true;
            }
        }
        return false;
    }
    void helper() {
        for (;;) {
            for (int spin = 0; spin < 4000; spin++) {  // ~ 100 microseconds: longer than the gap between two linears
                while (claim_one()) spin = 0;
#if defined(__x86_64__) || defined(__i386__)
                __builtin_ia32_pause();
#endif
            }
            std::unique_lock<std::mutex> lk(mu);
            sleepers.fetch_add(1);
            cv.wait(lk, [&] { return open(ticket.load()); });
            sleepers.fetch_sub(1);
        }
    }

  public:
    const pid_t pid = getpid();
    // run fn(arg, i) for i in [0, total) on up to `threads` threads (the caller one of them)
    void run(int64_t total, int64_t threads, item_fn f, const void* a) {
        std::unique_lock<std::mutex> mine(busy, std::try_to_lock);
        if (threads <= 1 || total <= 1 || total >= (1 << 24) || !mine.owns_lock()) {
            for (int64_t i = 0; i < total; i++) f(a, i);
            return;
        }
        {
            std::lock_guard<std::mutex> lk(mu);
            while ((int64_t)helpers.size() < threads - 1) {
                helpers.emplace_back(&Pool::helper, this);
                helpers.back().detach();
            }
        }
        fn = f, arg = a;
        done.store(0, std::memory_order_relaxed);
        id = (id + 1) & 0xFFFFu;
        ticket.store(id << 48 | (uint64_t)total << 24, std::memory_order_seq_cst);
        if (sleepers.load() > 0) {
            { std::lock_guard<std::mutex> lk(mu); }
            cv.notify_all();
        }
        while (claim_one()) {
        }
        while (done.load(std::memory_order_acquire) < total) {  // items the helpers are on
#if defined(__x86_64__) || defined(__i386__)
            __builtin_ia32_pause();
#endif
        }
    }
};

static Pool& pool() {  // one per process (a forked child makes its own: threads do not survive a fork)
    static Pool* p = new Pool();
    if (p->pid != getpid()) p = new Pool();
    return *p;
}
