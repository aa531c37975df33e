// Causal multi-head self-attention, flash-attention-2 style (Dao, 2023): no (T, T) matrix ever goes to
// HBM. Tensor cores (mma.sync m16n8k16, bf16 in, fp32 accumulate, llmc/mma.cuh) for all four products;
// scores, softmax statistics and every accumulator in fp32; the probabilities P (and in backward the
// score gradients dS) are rounded to bf16 only as the A operand of the next product, as FA2 does.
//
// Shapes: qkv (B, T, 3C) holds q, k, v each (NH, hs) per token, read in place (no permutes);
// out (B, T, C); lse (B, NH, T) fp32, the natural-log sum over t2 <= t of exp(scale * q_t . k_t2),
// saved by forward for backward. hs = C / NH: a multiple of 16 up to 128 (64 for GPT-2). scale: the
// softmax's logit scale, 1/sqrt(hs), or 8/hs under attn_scale "mup" (DESIGN section 2).
//
// Tiling: a block is 4 warps; each warp owns 16 rows (queries in forward and dq, keys in dk/dv) of the
// block's 64 and loops over tiles of the other side staged in shared memory, rows padded by 8 bf16 so
// ldmatrix's eight 16-byte rows fall in distinct bank groups. The tiles of the other side are double
// buffered: the next one is copied by cp.async while the warps work on the current one.
//   forward:   per 64 queries, over the key tiles up to the diagonal, online softmax (running max m and
//              sum l per row, O rescaled by exp(m_old - m_new)).
//   backward:  D = rowsum(dout * out) per query (= sum_t2 P dP, the softmax backward's dot product), then
//              two kernels, each the sole writer of what it produces: per 64 keys over the query tiles
//              from the diagonal on, dV = P^T dO and dK = scale dS^T Q; per 64 queries over the key tiles
//              up to the diagonal, dQ = scale dS K, where P = exp(scale S - lse), dS = P (dO V^T - D).
//              Both recompute S and P (7 products instead of FA2's 5) so that dQ needs no atomics: every
//              sum runs in a fixed order and a repeated run gives the same bits (--resume relies on it).
// Causality is exploited at tile granularity (tiles past the diagonal are never visited) and, on the
// diagonal tile, per 16-key slice of a warp. Blocks with the most tiles are launched first.
// dev/cuda/attention.cu checks these kernels against the CPU trainer's attention and times them against
// the materialized cuBLAS version they replaced; dev/cuda/emu_check.cpp runs them on the CPU emulation.
#ifndef LLMC_ATTENTION_CUH
#define LLMC_ATTENTION_CUH
#include "llmc/cuda_common.cuh"
#include "llmc/mma.cuh"

#define ATTN_THREADS 128   // 4 warps of 16 rows
#define ATTN_TILE 64       // rows per block, and per tile of the other side
#define ATTN_LOG2E 1.4426950408889634f
#define ATTN_LN2 0.6931471805599453f

// Blocks per SM the dq kernel is compiled for: 3 at hs 64 (at most 168 registers a thread; it needs
// ~165 and fits without spills, ptxas -v of nvcc 13), so 12 warps share an SM instead of 8. The dk/dv
// kernel gets 168 at hs 64 unbounded (3 blocks per SM too) but spills 8 bytes when bounded, so it is not.
#define ATTN_DQ_MIN_BLOCKS(HS) ((HS) == 64 ? 3 : 1)
// Query tile of the dk/dv kernel: 64, or 32 for hs > 64 to keep its two (16, hs) fp32 accumulators,
// S^T and dP^T in registers.
__host__ __device__ constexpr int attn_bwd_q_tile(int hs) { return hs > 64 ? 32 : 64; }

// Starts copying rows [t0, t0 + R) of a row-major matrix (row stride ld elements, HS columns from src)
// into shared memory (R, HS + 8), rows at or past T as zeros: 16-byte cp.async (HS and ld are multiples
// of 8). The caller commits the group and waits for it (cp_async_wait, then __syncthreads).
template <int HS, int R>
__device__ __forceinline__ void attn_load_tile(bf16 *dst, const bf16 *src, size_t ld, int t0, int T) {
    constexpr int CHUNKS = HS / 8;
    for (int i = threadIdx.x; i < R * CHUNKS; i += ATTN_THREADS) {
        int r = i / CHUNKS, c = (i % CHUNKS) * 8;
        cp_async16(dst + r * (HS + 8) + c, src + (size_t)min(t0 + r, T - 1) * ld + c, t0 + r < T);
    }
}

// ldmatrix row addresses of the fragments (lane l; tile row-major with stride HS + 8):
// A (16 rows from r0, 16 columns from c0)
__device__ __forceinline__ const bf16 *attn_a_addr(const bf16 *tile, int ld, int r0, int c0, int lane) {
    return tile + (r0 + lane % 16) * ld + c0 + (lane / 16) * 8;
}
// B = tile^T for two n-blocks: tile rows r0..r0+15 are the n index, columns c0..c0+15 the k index
// (registers 0, 1: n-block r0; 2, 3: n-block r0 + 8)
__device__ __forceinline__ const bf16 *attn_bt_addr(const bf16 *tile, int ld, int r0, int c0, int lane) {
    return tile + (r0 + (lane / 16) * 8 + lane % 8) * ld + c0 + ((lane / 8) % 2) * 8;
}
// B = tile (with ldmatrix .trans) for two n-blocks: tile rows r0..r0+15 are the k index, columns
// c0..c0+15 the n index (registers 0, 1: n-block c0; 2, 3: n-block c0 + 8)
__device__ __forceinline__ const bf16 *attn_b_addr(const bf16 *tile, int ld, int r0, int c0, int lane) {
    return tile + (r0 + ((lane / 8) % 2) * 8 + lane % 8) * ld + c0 + (lane / 16) * 8;
}
// the A fragment of k-step kk from fp32 accumulators (16 rows, n-blocks 2kk and 2kk + 1), rounded to bf16
__device__ __forceinline__ void attn_acc_to_a(uint32_t a[4], const float lo[4], const float hi[4]) {
    a[0] = pack_bf16x2(lo[0], lo[1]);
    a[1] = pack_bf16x2(lo[2], lo[3]);
    a[2] = pack_bf16x2(hi[0], hi[1]);
    a[3] = pack_bf16x2(hi[2], hi[3]);
}

// acc (16 rows, 16 NB columns: 2 NB n-blocks of 8) += A B^T over the head dimension (16 KD): A the rows
// ra..ra+15 of tile ta, B the rows 0..16 NB - 1 of tile tb (both row-major, stride ld). K Q^T and V dO^T.
template <int KD, int NB>
__device__ __forceinline__ void attn_mma_rows_bt(float acc[][4], const bf16 *ta, int ra, const bf16 *tb, int ld,
                                                 int lane) {
    for (int kd = 0; kd < KD; kd++) {
        uint32_t af[4];
        ldmatrix_x4(af, attn_a_addr(ta, ld, ra, kd * 16, lane));
        for (int jp = 0; jp < NB; jp++) {
            uint32_t bf[4];
            ldmatrix_x4(bf, attn_bt_addr(tb, ld, jp * 16, kd * 16, lane));
            mma_bf16_16816(acc[2 * jp], af, bf);
            mma_bf16_16816(acc[2 * jp + 1], af, bf + 2);
        }
    }
}
// acc (16 rows, 16 KD columns: 2 KD n-blocks of 8) += A B, one k-step of 16: A (16 rows, 16) from the
// fp32 accumulators lo, hi (n-blocks 2kk, 2kk + 1 of a previous product) rounded to bf16, B the tile's
// rows k0..k0+15 (all 16 KD columns). P V, P^T dO, dS^T Q and dS K are each a loop of these.
template <int KD>
__device__ __forceinline__ void attn_mma_acc_tile(float acc[][4], const float lo[4], const float hi[4], const bf16 *tile,
                                                  int ld, int k0, int lane) {
    uint32_t a[4];
    attn_acc_to_a(a, lo, hi);
    for (int dp = 0; dp < KD; dp++) {
        uint32_t bf[4];
        ldmatrix_x4_trans(bf, attn_b_addr(tile, ld, k0, dp * 16, lane));
        mma_bf16_16816(acc[2 * dp], a, bf);
        mma_bf16_16816(acc[2 * dp + 1], a, bf + 2);
    }
}

// ----------------------------------------------------------------------------------------------
// Forward. Grid: B * NH * ceil(T / 64) blocks, query tiles from the last (most key tiles) down.
// Shared memory: Q (64, HS + 8) bf16, and two stages of K, V tiles (64, HS + 8): the next tile loads
// while this one is used. scale_log2 = scale * log2(e): exp2 of log2 units.
template <int HS>
__global__ void __launch_bounds__(ATTN_THREADS) attention_forward_kernel(bf16 *out, float *lse, const bf16 *qkv, int B,
                                                                         int T, int NH, float scale_log2) {
    constexpr int LD = HS + 8, KD = HS / 16, ND = HS / 8;
    int ntiles = (T + ATTN_TILE - 1) / ATTN_TILE, bh = blockIdx.x % (B * NH);
    int qt = ntiles - 1 - blockIdx.x / (B * NH), b = bh / NH, h = bh % NH, C = NH * HS;
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
    int q0 = qt * ATTN_TILE, row0 = q0 + warp * 16 + g;   // this thread's rows: row0, row0 + 8
    bf16 *sQ = (bf16 *)dyn_smem(), *sKV = sQ + ATTN_TILE * LD;   // stage st: K at sKV + 2 st 64 LD, V after K
    const bf16 *base = qkv + (size_t)b * T * 3 * C + h * HS;   // q of (b, t = 0, h); k at + C, v at + 2C

    attn_load_tile<HS, ATTN_TILE>(sQ, base, 3 * C, q0, T);
    attn_load_tile<HS, ATTN_TILE>(sKV, base + C, 3 * C, 0, T);
    attn_load_tile<HS, ATTN_TILE>(sKV + ATTN_TILE * LD, base + 2 * C, 3 * C, 0, T);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    uint32_t qf[KD][4];
    for (int kd = 0; kd < KD; kd++) ldmatrix_x4(qf[kd], attn_a_addr(sQ, LD, warp * 16, kd * 16, lane));
    float o[ND][4] = {}, m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};   // l: this thread's columns only

    for (int kt = 0; kt <= qt; kt++) {
        int k0 = kt * ATTN_TILE;
        bool diag = kt == qt;   // keys k0 + 16 * warp + 16 on are past every row of this warp
        const bf16 *sK = sKV + (kt & 1) * 2 * ATTN_TILE * LD, *sV = sK + ATTN_TILE * LD;
        if (kt < qt) {   // the next tile into the other stage (free since the end of the last iteration)
            bf16 *nK = sKV + ((kt + 1) & 1) * 2 * ATTN_TILE * LD;
            attn_load_tile<HS, ATTN_TILE>(nK, base + C, 3 * C, k0 + ATTN_TILE, T);
            attn_load_tile<HS, ATTN_TILE>(nK + ATTN_TILE * LD, base + 2 * C, 3 * C, k0 + ATTN_TILE, T);
        }
        cp_async_commit();   // possibly empty: the wait below always leaves exactly the newest group pending
        cp_async_wait<1>();  // this tile's copies (committed one iteration ago) are done
        __syncthreads();
        // S (16 rows, 64 keys) = Q K^T; n-block j holds keys k0 + 8j ..
        float s[8][4] = {};
        for (int kd = 0; kd < KD; kd++)
            for (int jp = 0; jp < 4; jp++) {
                if (diag && jp > warp) continue;
                uint32_t kf[4];
                ldmatrix_x4(kf, attn_bt_addr(sK, LD, jp * 16, kd * 16, lane));
                mma_bf16_16816(s[2 * jp], qf[kd], kf);
                mma_bf16_16816(s[2 * jp + 1], qf[kd], kf + 2);
            }
        // online softmax in log2 units: x = scale log2(e) s, masked to -inf above the diagonal
        float mx[2] = {m[0], m[1]};
        for (int j = 0; j < 8; j++)
            for (int i = 0; i < 4; i++) {
                float x = s[j][i] * scale_log2;
                if (diag && k0 + 8 * j + 2 * t4 + (i & 1) > row0 + (i >> 1) * 8) x = -INFINITY;
                s[j][i] = x;
                mx[i >> 1] = fmaxf(mx[i >> 1], x);
            }
        float alpha[2];
        for (int r = 0; r < 2; r++) {   // a row's 64 columns are spread over the 4 lanes of its quad
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
            alpha[r] = exp2f(m[r] - mx[r]);   // the first tile always has key 0 <= row: mx is finite
            m[r] = mx[r];
            l[r] *= alpha[r];
        }
        for (int j = 0; j < 8; j++)
            for (int i = 0; i < 4; i++) {
                s[j][i] = exp2f(s[j][i] - m[i >> 1]);
                l[i >> 1] += s[j][i];
            }
        for (int d = 0; d < ND; d++)
            for (int i = 0; i < 4; i++) o[d][i] *= alpha[i >> 1];
        // O (16 rows, HS) += P V, k-step kk over keys k0 + 16kk ..
        for (int kk = 0; kk < 4; kk++) {
            if (diag && kk > warp) continue;
            attn_mma_acc_tile<KD>(o, s[2 * kk], s[2 * kk + 1], sV, LD, kk * 16, lane);
        }
        __syncthreads();   // every warp is done with this stage before it is refilled
    }
    for (int r = 0; r < 2; r++) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
        int t = row0 + 8 * r;
        if (t >= T) continue;
        float inv = 1.0f / l[r];
        bf16 *dst = out + ((size_t)b * T + t) * C + h * HS + 2 * t4;
        for (int d = 0; d < ND; d++) *(uint32_t *)(dst + 8 * d) = pack_bf16x2(o[d][2 * r] * inv, o[d][2 * r + 1] * inv);
        if (t4 == 0) lse[((size_t)b * NH + h) * T + t] = (m[r] + log2f(l[r])) * ATTN_LN2;
    }
}

// ----------------------------------------------------------------------------------------------
// Backward

// dsum (B, NH, T) = rowsum(dout * out) per (b, h, t): FA2's D. One thread per row, in dimension order.
__global__ void attention_dsum_kernel(float *dsum, const bf16 *dout, const bf16 *out, int B, int T, int NH, int hs) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;   // (b, t, h)
    if (i >= B * T * NH) return;
    int h = i % NH, bt = i / NH, b = bt / T, t = bt % T;
    const bf16 *x = dout + (size_t)i * hs, *y = out + (size_t)i * hs;
    float sum = 0.0f;
    for (int c = 0; c < hs; c += 8) {
        uint4 xv = *(const uint4 *)(x + c), yv = *(const uint4 *)(y + c);
        const bf16 *xe = (const bf16 *)&xv, *ye = (const bf16 *)&yv;
        for (int k = 0; k < 8; k++) sum += __bfloat162float(xe[k]) * __bfloat162float(ye[k]);
    }
    dsum[((size_t)b * NH + h) * T + t] = sum;
}

// dK, dV of 64 keys. Grid: B * NH * ceil(T / 64) blocks, key tile 0 (the most query tiles) first.
// Shared memory: K, V (64, HS + 8) bf16; two stages of Q, dO (BQ, HS + 8) bf16 and lse (log2 units), D
// of BQ queries (fp32): the next query tile loads while this one is used.
template <int HS>
__global__ void __launch_bounds__(ATTN_THREADS) attention_backward_dkdv_kernel(bf16 *dqkv, const bf16 *dout,
                                                                               const bf16 *qkv, const float *lse,
                                                                               const float *dsum, int B, int T, int NH,
                                                                               float scale, float scale_log2) {
    constexpr int LD = HS + 8, KD = HS / 16, ND = HS / 8, BQ = attn_bwd_q_tile(HS), NQ = BQ / 8;
    int bh = blockIdx.x % (B * NH), b = bh / NH, h = bh % NH, C = NH * HS;
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
    int k0 = (blockIdx.x / (B * NH)) * ATTN_TILE, key0 = k0 + warp * 16 + g;   // this thread's keys: key0, key0 + 8
    // stage st of the query side: Q, dO (BQ, LD) at sQdO + 2 st BQ LD; lse, D (BQ) at sLD + 2 st BQ
    bf16 *sK = (bf16 *)dyn_smem(), *sV = sK + ATTN_TILE * LD, *sQdO = sV + ATTN_TILE * LD;
    float *sLD = (float *)(sQdO + 4 * BQ * LD);
    const bf16 *base = qkv + (size_t)b * T * 3 * C + h * HS, *dbase = dout + (size_t)b * T * C + h * HS;
    const float *lrow = lse + ((size_t)b * NH + h) * T, *drow = dsum + ((size_t)b * NH + h) * T;

    // the query tile from q0 into stage st: Q and dO by cp.async, lse and D by plain stores (visible
    // after the next __syncthreads); queries past T get lse = +inf: P = exp2(x - inf) = 0, they add nothing
    auto load_queries = [&](int st, int q0) {
        bf16 *q = sQdO + st * 2 * BQ * LD;
        attn_load_tile<HS, BQ>(q, base, 3 * C, q0, T);
        attn_load_tile<HS, BQ>(q + BQ * LD, dbase, C, q0, T);
        for (int i = threadIdx.x; i < BQ; i += ATTN_THREADS) {
            sLD[st * 2 * BQ + i] = q0 + i < T ? lrow[q0 + i] * ATTN_LOG2E : INFINITY;
            sLD[st * 2 * BQ + BQ + i] = q0 + i < T ? drow[q0 + i] : 0.0f;
        }
    };
    attn_load_tile<HS, ATTN_TILE>(sK, base + C, 3 * C, k0, T);
    attn_load_tile<HS, ATTN_TILE>(sV, base + 2 * C, 3 * C, k0, T);
    load_queries(0, k0);   // queries before k0 see none of these keys
    cp_async_commit();
    float dk[ND][4] = {}, dv[ND][4] = {};
    for (int q0 = k0, it = 0; q0 < T; q0 += BQ, it++) {
        int st = it & 1;
        if (q0 + BQ < T) load_queries(st ^ 1, q0 + BQ);   // the other stage is free since the last iteration
        cp_async_commit();
        cp_async_wait<1>();   // this tile's copies (and K, V) are done
        __syncthreads();
        const bf16 *sQ = sQdO + st * 2 * BQ * LD, *sdO = sQ + BQ * LD;
        const float *sL = sLD + st * 2 * BQ, *sD = sL + BQ;
        bool diag = q0 < k0 + ATTN_TILE;   // some keys are past some queries: mask
        if (q0 + BQ > k0 + warp * 16) {    // else every query of the tile is before this warp's keys
            // S^T (16 keys, BQ queries) = K Q^T, then P^T = exp(scale S^T - lse)
            float p[NQ][4] = {}, dp[NQ][4] = {};
            attn_mma_rows_bt<KD, BQ / 16>(p, sK, warp * 16, sQ, LD, lane);
            for (int j = 0; j < NQ; j++)
                for (int i = 0; i < 4; i++) {
                    int c = 8 * j + 2 * t4 + (i & 1);   // query q0 + c
                    bool masked = diag && key0 + (i >> 1) * 8 > q0 + c;
                    p[j][i] = masked ? 0.0f : exp2f(p[j][i] * scale_log2 - sL[c]);
                }
            // dV (16 keys, HS) += P^T dO, k-steps over the queries
            for (int kq = 0; kq < BQ / 16; kq++)
                attn_mma_acc_tile<KD>(dv, p[2 * kq], p[2 * kq + 1], sdO, LD, kq * 16, lane);
            // dP^T (16 keys, BQ queries) = V dO^T
            attn_mma_rows_bt<KD, BQ / 16>(dp, sV, warp * 16, sdO, LD, lane);
            // dS^T = P^T (dP^T - D) (into p), then dK (16 keys, HS) += dS^T Q
            for (int j = 0; j < NQ; j++)
                for (int i = 0; i < 4; i++) p[j][i] *= dp[j][i] - sD[8 * j + 2 * t4 + (i & 1)];
            for (int kq = 0; kq < BQ / 16; kq++)
                attn_mma_acc_tile<KD>(dk, p[2 * kq], p[2 * kq + 1], sQ, LD, kq * 16, lane);
        }
        __syncthreads();   // every warp is done with this stage before it is refilled
    }
    for (int r = 0; r < 2; r++) {
        int t = key0 + 8 * r;
        if (t >= T) continue;
        bf16 *dst = dqkv + ((size_t)b * T + t) * 3 * C + h * HS + 2 * t4;
        for (int d = 0; d < ND; d++) {
            *(uint32_t *)(dst + C + 8 * d) = pack_bf16x2(dk[d][2 * r] * scale, dk[d][2 * r + 1] * scale);
            *(uint32_t *)(dst + 2 * C + 8 * d) = pack_bf16x2(dv[d][2 * r], dv[d][2 * r + 1]);
        }
    }
}

// dQ of 64 queries. Grid and order as forward. Shared memory: Q, dO (64, HS + 8) bf16 and two stages
// of K, V tiles (64, HS + 8).
template <int HS>
__global__ void __launch_bounds__(ATTN_THREADS, ATTN_DQ_MIN_BLOCKS(HS)) attention_backward_dq_kernel(bf16 *dqkv, const bf16 *dout,
                                                                             const bf16 *qkv, const float *lse,
                                                                             const float *dsum, int B, int T, int NH,
                                                                             float scale, float scale_log2) {
    constexpr int LD = HS + 8, KD = HS / 16, ND = HS / 8;
    int ntiles = (T + ATTN_TILE - 1) / ATTN_TILE, bh = blockIdx.x % (B * NH);
    int qt = ntiles - 1 - blockIdx.x / (B * NH), b = bh / NH, h = bh % NH, C = NH * HS;
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
    int q0 = qt * ATTN_TILE, row0 = q0 + warp * 16 + g;   // this thread's rows: row0, row0 + 8
    bf16 *sQ = (bf16 *)dyn_smem(), *sdO = sQ + ATTN_TILE * LD, *sKV = sdO + ATTN_TILE * LD;   // stages as forward
    const bf16 *base = qkv + (size_t)b * T * 3 * C + h * HS;
    const float *lrow = lse + ((size_t)b * NH + h) * T, *drow = dsum + ((size_t)b * NH + h) * T;

    attn_load_tile<HS, ATTN_TILE>(sQ, base, 3 * C, q0, T);
    attn_load_tile<HS, ATTN_TILE>(sdO, dout + (size_t)b * T * C + h * HS, C, q0, T);
    attn_load_tile<HS, ATTN_TILE>(sKV, base + C, 3 * C, 0, T);
    attn_load_tile<HS, ATTN_TILE>(sKV + ATTN_TILE * LD, base + 2 * C, 3 * C, 0, T);
    cp_async_commit();
    float lse2[2], D[2];   // rows past T: lse = +inf makes their P, hence dS, zero
    for (int r = 0; r < 2; r++) {
        int t = row0 + 8 * r;
        lse2[r] = t < T ? lrow[t] * ATTN_LOG2E : INFINITY;
        D[r] = t < T ? drow[t] : 0.0f;
    }
    cp_async_wait<0>();
    __syncthreads();
    // Q's fragments stay in registers; dO's are read again per tile (ldmatrix is cheap, and holding both
    // would spill at 3 blocks per SM)
    uint32_t qf[KD][4];
    for (int kd = 0; kd < KD; kd++) ldmatrix_x4(qf[kd], attn_a_addr(sQ, LD, warp * 16, kd * 16, lane));
    float dq[ND][4] = {};
    for (int kt = 0; kt <= qt; kt++) {
        int k0 = kt * ATTN_TILE;
        bool diag = kt == qt;
        const bf16 *sK = sKV + (kt & 1) * 2 * ATTN_TILE * LD, *sV = sK + ATTN_TILE * LD;
        if (kt < qt) {
            bf16 *nK = sKV + ((kt + 1) & 1) * 2 * ATTN_TILE * LD;
            attn_load_tile<HS, ATTN_TILE>(nK, base + C, 3 * C, k0 + ATTN_TILE, T);
            attn_load_tile<HS, ATTN_TILE>(nK + ATTN_TILE * LD, base + 2 * C, 3 * C, k0 + ATTN_TILE, T);
        }
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        // S = Q K^T and dP = dO V^T (16 rows, 64 keys)
        float p[8][4] = {}, dp[8][4] = {};
        for (int kd = 0; kd < KD; kd++) {
            uint32_t of[4];
            ldmatrix_x4(of, attn_a_addr(sdO, LD, warp * 16, kd * 16, lane));
            for (int jp = 0; jp < 4; jp++) {
                if (diag && jp > warp) continue;
                uint32_t kf[4], vf[4];
                ldmatrix_x4(kf, attn_bt_addr(sK, LD, jp * 16, kd * 16, lane));
                ldmatrix_x4(vf, attn_bt_addr(sV, LD, jp * 16, kd * 16, lane));
                mma_bf16_16816(p[2 * jp], qf[kd], kf);
                mma_bf16_16816(p[2 * jp + 1], qf[kd], kf + 2);
                mma_bf16_16816(dp[2 * jp], of, vf);
                mma_bf16_16816(dp[2 * jp + 1], of, vf + 2);
            }
        }
        // dS = P (dP - D), P = exp(scale S - lse), 0 above the diagonal (into p)
        for (int j = 0; j < 8; j++)
            for (int i = 0; i < 4; i++) {
                bool masked = diag && k0 + 8 * j + 2 * t4 + (i & 1) > row0 + (i >> 1) * 8;
                float pr = masked ? 0.0f : exp2f(p[j][i] * scale_log2 - lse2[i >> 1]);
                p[j][i] = pr * (dp[j][i] - D[i >> 1]);
            }
        // dQ (16 rows, HS) += dS K, k-steps over the keys
        for (int kk = 0; kk < 4; kk++) {
            if (diag && kk > warp) continue;
            attn_mma_acc_tile<KD>(dq, p[2 * kk], p[2 * kk + 1], sK, LD, kk * 16, lane);
        }
        __syncthreads();
    }
    for (int r = 0; r < 2; r++) {
        int t = row0 + 8 * r;
        if (t >= T) continue;
        bf16 *dst = dqkv + ((size_t)b * T + t) * 3 * C + h * HS + 2 * t4;
        for (int d = 0; d < ND; d++) *(uint32_t *)(dst + 8 * d) = pack_bf16x2(dq[d][2 * r] * scale, dq[d][2 * r + 1] * scale);
    }
}

// ----------------------------------------------------------------------------------------------
// Host side. The kernels are instantiated for every supported head size.

static void attention_check_head_size(int hs) {
    if (hs % 16 != 0 || hs < 16 || hs > 128) {
        fprintf(stderr, "error: attention: head size C / NH = %d is not supported (the flash-attention kernels "
                "take a multiple of 16 up to 128)\n", hs);
        exit(1);
    }
}
#define ATTN_FOR_HEAD_SIZE(hs, F)                                                   \
    switch (hs) {                                                                   \
    case 16: F(16); break;   case 32: F(32); break;   case 48: F(48); break;        \
    case 64: F(64); break;   case 80: F(80); break;   case 96: F(96); break;        \
    case 112: F(112); break; case 128: F(128); break;                               \
    default: attention_check_head_size(hs);                                         \
    }

// Launches a kernel with `smem` bytes of dynamic shared memory, raising the kernel's limit past the
// default 48 KiB the first time (hs > 80 needs it).
#define ATTN_LAUNCH(nblocks, smem, stream, kernel, ...)                                                        \
    do {                                                                                                       \
        static int attr_set = 0;                                                                               \
        if (!attr_set) {                                                                                       \
            cudaCheck(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)(smem))); \
            attr_set = 1;                                                                                      \
        }                                                                                                      \
        LAUNCH(nblocks, ATTN_THREADS, smem, stream, kernel)(__VA_ARGS__);                                      \
        cudaCheck(cudaGetLastError());                                                                         \
    } while (0)

// out (B, T, C) and lse (B, NH, T) from qkv (B, T, 3C).
static void attention_forward(bf16 *out, float *lse, const bf16 *qkv, int B, int T, int C, int NH, float scale,
                              cudaStream_t stream) {
    int hs = C / NH, nblocks = B * NH * ceil_div(T, ATTN_TILE);
    float scale_log2 = scale * ATTN_LOG2E;
#define ATTN_FWD(HS)                                                                                            \
    ATTN_LAUNCH(nblocks, (size_t)5 * ATTN_TILE * ((HS) + 8) * sizeof(bf16), stream, attention_forward_kernel<HS>, \
                out, lse, qkv, B, T, NH, scale_log2)
    ATTN_FOR_HEAD_SIZE(hs, ATTN_FWD)
#undef ATTN_FWD
}

// fp32 scratch of attention_backward: D (B, NH, T)
static size_t attention_scratch_floats(int B, int T, int NH) { return (size_t)B * NH * T; }

// dqkv (B, T, 3C), overwritten, from dout (B, T, C); qkv, out and lse as in and from the forward.
static void attention_backward(bf16 *dqkv, const bf16 *dout, const bf16 *qkv, const bf16 *out, const float *lse,
                               float *scratch, int B, int T, int C, int NH, float scale, cudaStream_t stream) {
    int hs = C / NH, nblocks = B * NH * ceil_div(T, ATTN_TILE), rows = B * T * NH;
    float scale_log2 = scale * ATTN_LOG2E;
    attention_check_head_size(hs);
    LAUNCH(ceil_div(rows, 256), 256, 0, stream, attention_dsum_kernel)(scratch, dout, out, B, T, NH, hs);
    cudaCheck(cudaGetLastError());
#define ATTN_BWD(HS)                                                                                               \
    {                                                                                                              \
        constexpr int BQ = attn_bwd_q_tile(HS);                                                                    \
        size_t smem_kv = (size_t)(2 * ATTN_TILE + 4 * BQ) * ((HS) + 8) * sizeof(bf16) + 4 * BQ * sizeof(float);   \
        ATTN_LAUNCH(nblocks, smem_kv, stream, attention_backward_dkdv_kernel<HS>, dqkv, dout, qkv, lse, scratch, \
                    B, T, NH, scale, scale_log2);                                                                  \
        ATTN_LAUNCH(nblocks, (size_t)6 * ATTN_TILE * ((HS) + 8) * sizeof(bf16), stream,                           \
                    attention_backward_dq_kernel<HS>, dqkv, dout, qkv, lse, scratch, B, T, NH, scale, scale_log2); \
    }
    ATTN_FOR_HEAD_SIZE(hs, ATTN_BWD)
#undef ATTN_BWD
}

#endif
