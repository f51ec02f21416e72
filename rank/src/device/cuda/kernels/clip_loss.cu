// Fused tiled CLIP / InfoNCE loss on one GPU (ALGORITHMS.md section 2; the CPU version is
// rank/src/loss/ring.rs). 64 x 64 logit tiles, 256 threads per block. The logit tile is computed
// by fp32 FMA (clip_fwd, clip_bwd), by TF32 tensor cores (m16n8k8 mma; *_tf32), by 3xTF32
// (hi/lo split, near-fp32 accuracy; *_tf32x3) or by BF16 tensor cores (m16n8k16 mma on bf16
// copies of the features made by clip_to_bf16; *_bf16); the LSE statistics and G are fp32 in
// every version (G is rounded to the products' input type where they read it). The backward's
// gradient products (G T, G^T I) are fp32 FMA in clip_bwd, 3xTF32 tensor-core products in
// clip_bwd_tf32x3, TF32 ones in clip_bwd_tf32 and BF16 ones (G rounded to bf16, the features'
// bf16 copies) in clip_bwd_bf16, with fp32 accumulators.
//
//   x_ij = s * <I_i, T_j>,  l_i = log sum_j exp(x_ij),  k_j = log sum_i exp(x_ij)
//   L = 1/(2B) * [ sum_i (l_i - x_ii) + sum_j (k_j - x_jj) ]
//   G_ij = (exp(x_ij - l_i) + exp(x_ij - k_j) - 2 delta_ij) / (2B)
//   dI = s * G T,  dT = s * G^T I,  dL/dt = sum_ij G_ij x_ij
//
// Forward (clip_fwd): block (rc, cs) owns the consecutive row tiles of chunk rc and the column
// tiles of split cs; for each row tile, in order, and each of its column tiles it computes the
// logits into shared memory, folds them into the online (max, sum) of the tile's rows (kept in
// registers across column tiles; each tile's share taken by all threads, a quarter row and a
// quarter column each) and into the online (max, sum) of each column, kept in global
// scratch that this block alone owns (so no atomics). Logits never reach global memory. clip_lse
// then merges the partials in a fixed order, so the result is deterministic. Partial storage:
// (chunks + splits) * B * 2 floats, with chunks * splits about one wave of blocks (set by the
// host): linear in B.
//
// Backward (clip_bwd): block rt owns the rows of dA; for each column tile it recomputes the
// logits, forms s * G in shared memory and adds s * G * Bm_tile to its rows of dA, 64 feature
// columns at a time (no other block writes them: no atomics), the features staged through
// shared memory by cp.async, two stages in flight. Deterministic mode runs it twice, (I, T) ->
// dI then (T, I) -> dT (G is symmetric under the swap; clip_bwd_pair* runs both in one launch);
// fast mode runs it once and adds dT with atomicAdd. The bf16 versions read every tensor-core
// fragment with ldmatrix. When the row tiles are fewer than a wave of blocks (small batches,
// the blocks of a ring step), the host splits the column tiles among several blocks per row
// tile (grid z): fast mode's then add dA atomically too, deterministic mode's write shares that
// clip_fold_splits adds in a fixed order.
//
// SigLIP (siglip_bwd*, at the end): the backward's kernels with the pairwise sigmoid's G in
// place of the softmax's, G_ij = (sigma(x_ij + bias) - delta_ij) / B; no forward (no statistic
// normalises a row or a column), so one launch per block gives the loss terms, dL/dt, dL/dbias
// and both gradients.
//
// Rows and columns past B are masked (-inf in the forward, G = 0 in the backward), so any B
// and d are valid. The bf16 copies are zero-padded to multiples of 64 rows and 64 columns, so
// the bf16 kernels load whole 16-byte pieces without bounds tests. Indices are 64-bit.

// i64 and NEG_INF_* come from common.cuh (prepended by nvrtc.rs).

// The diagonal offset meaning "no positive pair in these logits" (i64 min, as the host passes).
#define NO_DIAG (-0x7fffffffffffffffLL - 1)

#define TM 64
#define TN 64
#define TK 16
#define NT 256

// Tuning knobs: the minimum blocks per multiprocessor that the launch bounds ask ptxas for, which
// sets the register budget per thread (65,536 / (NT * blocks), rounded down to a multiple of 8).
// nvrtc.rs (KNOBS) lists them with their ranges; `tessera cuda bench-loss --define NAME=VALUE`
// and the other GPU commands compile the kernels with another value, for timing the choice.
#ifndef CLIP_FWD_MIN_BLOCKS
#define CLIP_FWD_MIN_BLOCKS 4
#endif
#ifndef CLIP_BWD_MIN_BLOCKS
#define CLIP_BWD_MIN_BLOCKS 2
#endif
// Column tiles per G panel of the backward (clip_bwd*, clip_bwd_pair*): s * G of this many tiles
// is formed before the products, so that a dA job contracts over 64 x CLIP_BWD_PANEL columns and
// reads and writes its accumulators once per panel instead of once per tile. Above 1 the panel
// lives in dynamic shared memory (the host's bwd_shared_bytes).
#ifndef CLIP_BWD_PANEL
#define CLIP_BWD_PANEL 1
#endif

// Shared-memory operand tiles of the fp32 FMA version: [k][row], rows padded by 8 floats.
#define TPAD (TM + 8)

// bf16 operand tiles: [row][k] (k contiguous, as in the features), KB bf16 of k per stage, k
// pairs packed in 32-bit words as the m16n8k16 fragments hold them. Rows are KW = 20 words, so
// that a fragment load (8 rows x 4 consecutive words per warp) hits 32 different banks.
#define KB 32
#define KW (KB / 2 + 4)
// The bf16 tile's staging is double-buffered: As[0..64) and Bs[0..64) hold one stage, As and Bs
// BF16_BUF2 rows further on the other (a staging array of 4 x 64 rows: A, B, A', B').
#define BF16_BUF2 (2 * TM)

// fp32 operand tiles of the TF32 versions: [row][k] (k contiguous, as in the features), TK
// floats of k per stage; rows are KF = TK + 4 words, so that a fragment load (8 rows x 4
// consecutive words per warp) hits 32 different banks.
#define KF (TK + 4)

// The feature element type and the operand staging of each MODE (0 fp32 FMA, 1 3xTF32, 2 TF32,
// 3 BF16). bf16 values are kept as their bits (NVRTC builds without the CUDA headers).
template <int MODE>
struct Tiles {
    typedef float Feat;
    typedef float Row[KF];
    static constexpr int ROWS = TM;
};
template <>
struct Tiles<0> {
    typedef float Feat;
    typedef float Row[TPAD];
    static constexpr int ROWS = TK;
};
template <>
struct Tiles<3> {
    typedef unsigned short Feat;
    typedef unsigned Row[KW];
    static constexpr int ROWS = TM;
};

// acc[i][j] = <A[r0 + ty + 16i], Bm[c0 + tx + 16j]> over all d (fp32 FMA); rows of A past BR
// and of Bm past BC read as 0.
__device__ __forceinline__ void tile_dot(const float* __restrict__ A, const float* __restrict__ Bm,
                                         i64 BR, i64 BC, i64 d, i64 r0, i64 c0, float (*As)[TPAD],
                                         float (*Bs)[TPAD], float acc[4][4]) {
    const int t = threadIdx.x;
    const int tx = t % 16, ty = t / 16;
    const int lrow = t / 4, lk = (t % 4) * 4;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
    for (i64 k0 = 0; k0 < d; k0 += TK) {
        const i64 ra = r0 + lrow, rb = c0 + lrow;
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const i64 k = k0 + lk + q;
            As[lk + q][lrow] = (ra < BR && k < d) ? A[ra * d + k] : 0.0f;
            Bs[lk + q][lrow] = (rb < BC && k < d) ? Bm[rb * d + k] : 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (int k = 0; k < TK; ++k) {
            float a[4], b[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) a[i] = As[k][ty + 16 * i];
#pragma unroll
            for (int j = 0; j < 4; ++j) b[j] = Bs[k][tx + 16 * j];
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
        __syncthreads();
    }
}

__device__ __forceinline__ unsigned to_tf32(float f) {
#ifdef TESSERA_EMU
    return emu::cvt_rna_tf32(f);
#else
    unsigned r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(f));
    return r;
#endif
}

// D = A(16x8, row) * B(8x8, col) + D on the tensor cores, tf32 inputs, fp32 accumulators.
__device__ __forceinline__ void mma_tf32(float c[4], const unsigned a[4], const unsigned b[2]) {
#ifdef TESSERA_EMU
    emu::mma_m16n8k8_tf32(c, a, b);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// One k-step of 8 for a warp's 16 x 32 block: c[n] += A x B_n (n = 0..3, m16n8k8) from fp32
// values, rounded to TF32, or with SPLIT as 3xTF32 (x = hi + lo; hi*hi + hi*lo + lo*hi). af: the
// A fragment's values (rows g, g + 8 at k q4, then at k q4 + 4); bf(n, e): B_n's value at
// k = q4 + 4 e, column g.
// A_TF32: the A values are TF32 already (rounded when stored), so their bits go as they are.
template <bool SPLIT, typename BF, bool A_TF32 = false>
__device__ __forceinline__ void mma_tf32_row(float c[4][4], const float af[4], BF bf) {
    unsigned ah[4], al[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        ah[e] = A_TF32 ? __float_as_uint(af[e]) : to_tf32(af[e]);
        al[e] = SPLIT ? to_tf32(af[e] - __uint_as_float(ah[e])) : 0u;
    }
#pragma unroll
    for (int n = 0; n < 4; ++n) {
        unsigned bh[2], bl[2];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const float b = bf(n, e);
            bh[e] = to_tf32(b);
            bl[e] = SPLIT ? to_tf32(b - __uint_as_float(bh[e])) : 0u;
        }
        if (SPLIT) {
            mma_tf32(c[n], al, bh);
            mma_tf32(c[n], ah, bl);
        }
        mma_tf32(c[n], ah, bh);
    }
}

// Xs[row][col] = scale * c for the accumulator fragments of an m16n8 mma (rows g, g + 8, columns
// 2 q4, 2 q4 + 1 of each 16 x 8 block) of the warp's 16 x 32 block at (wm, wn); `fill` in rows
// past BR and columns past BC.
template <int XLD>
__device__ __forceinline__ void store_frags(const float c[4][4], int wm, int wn, int g, int q4,
                                            i64 BR, i64 BC, i64 r0, i64 c0, float (*Xs)[XLD],
                                            float scale, float fill) {
#pragma unroll
    for (int n = 0; n < 4; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int li = wm + g + 8 * (e / 2), lj = wn + 8 * n + 2 * q4 + (e % 2);
            const bool ok = (r0 + li < BR) && (c0 + lj < BC);
            Xs[li][lj] = ok ? scale * c[n][e] : fill;
        }
}

// Whether rows of d floats at A and Bm can be read in 16-byte pieces: d a multiple of 4 and both
// 16-byte aligned (else element loads with bounds tests).
__device__ __forceinline__ bool vec4_rows(i64 d, const void* A, const void* Bm) {
    return (d & 3) == 0 &&
           ((reinterpret_cast<unsigned long long>(A) | reinterpret_cast<unsigned long long>(Bm)) &
            15) == 0;
}

// Tensor-core tile: warp w (of 8) computes rows 16*(w/2).. +16, columns 32*(w%2).. +32 as four
// m16n8k8 products per k-step of 8. SPLIT: 3xTF32 (x = hi + lo, hi*hi + hi*lo + lo*hi), close to
// fp32 accuracy; else plain TF32 (10-bit mantissa inputs). Writes scale * <A_i, Bm_j> into
// Xs[row][col] (rows past BR or columns past BC get `fill`). Each thread stages one 16-byte
// piece (4 k) of one row of A and of Bm per stage: one vector load each when d is a multiple of
// 4 and A, Bm are 16-byte aligned, else four element loads with bounds tests. TF32 rounds the
// values once, as they are staged, and loads the next stage into registers while the tensor
// cores work on this one; 3xTF32 (three products per value, and short of registers in the
// backward) stages fp32 values just in time and splits them as they are read.
template <bool SPLIT, int XLD>
__device__ __forceinline__ void tile_tc(const float* __restrict__ A, const float* __restrict__ Bm,
                                        i64 BR, i64 BC, i64 d, i64 r0, i64 c0, float (*As)[KF],
                                        float (*Bs)[KF], float (*Xs)[XLD], float scale,
                                        float fill) {
    const int t = threadIdx.x;
    const int lane = t % 32, warp = t / 32;
    const int g = lane / 4, q4 = lane % 4;
    const int wm = 16 * (warp / 2), wn = 32 * (warp % 2);
    const int lrow = t / 4, lp = t % 4;
    float c[4][4];
#pragma unroll
    for (int n = 0; n < 4; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) c[n][e] = 0.0f;
    const i64 ra = r0 + lrow, rb = c0 + lrow;
    const bool vec = vec4_rows(d, A, Bm);
    uint4 na, nb;  // the staged piece's 4 values (as bits)
    auto piece = [&](const float* __restrict__ F, i64 r, i64 nrows, i64 k) {
        uint4 v = {0u, 0u, 0u, 0u};
        if (r < nrows && k < d) {
            if (vec) {
                v = *reinterpret_cast<const uint4*>(F + r * d + k);
            } else {
                v.x = __float_as_uint(F[r * d + k]);
                if (k + 1 < d) v.y = __float_as_uint(F[r * d + k + 1]);
                if (k + 2 < d) v.z = __float_as_uint(F[r * d + k + 2]);
                if (k + 3 < d) v.w = __float_as_uint(F[r * d + k + 3]);
            }
        }
        return v;
    };
    auto load = [&](i64 k0) {
        na = piece(A, ra, BR, k0 + 4 * lp);
        nb = piece(Bm, rb, BC, k0 + 4 * lp);
    };
    auto stage = [&](float* dst, uint4 v) {
        if (!SPLIT) {
            v.x = to_tf32(__uint_as_float(v.x));
            v.y = to_tf32(__uint_as_float(v.y));
            v.z = to_tf32(__uint_as_float(v.z));
            v.w = to_tf32(__uint_as_float(v.w));
        }
        *reinterpret_cast<uint4*>(dst) = v;
    };
    if (!SPLIT) load(0);
    for (i64 k0 = 0; k0 < d; k0 += TK) {
        if (SPLIT) load(k0);
        stage(&As[lrow][4 * lp], na);
        stage(&Bs[lrow][4 * lp], nb);
        __syncthreads();
        if (!SPLIT && k0 + TK < d) load(k0 + TK);
#pragma unroll
        for (int kk = 0; kk < TK; kk += 8) {
            if (SPLIT) {
                const float af[4] = {As[wm + g][kk + q4], As[wm + g + 8][kk + q4],
                                     As[wm + g][kk + q4 + 4], As[wm + g + 8][kk + q4 + 4]};
                mma_tf32_row<true>(
                    c, af, [&](int n, int e) { return Bs[wn + 8 * n + g][kk + q4 + 4 * e]; });
            } else {
                // Staged already rounded: the bits go to the tensor cores as they are.
                const unsigned a[4] = {__float_as_uint(As[wm + g][kk + q4]),
                                       __float_as_uint(As[wm + g + 8][kk + q4]),
                                       __float_as_uint(As[wm + g][kk + q4 + 4]),
                                       __float_as_uint(As[wm + g + 8][kk + q4 + 4])};
#pragma unroll
                for (int n = 0; n < 4; ++n) {
                    const unsigned bb[2] = {__float_as_uint(Bs[wn + 8 * n + g][kk + q4]),
                                            __float_as_uint(Bs[wn + 8 * n + g][kk + q4 + 4])};
                    mma_tf32(c[n], a, bb);
                }
            }
        }
        __syncthreads();
    }
    store_frags(c, wm, wn, g, q4, BR, BC, r0, c0, Xs, scale, fill);
}

__device__ __forceinline__ unsigned short to_bf16(float f) {
#ifdef TESSERA_EMU
    return emu::cvt_rn_bf16(f);
#else
    unsigned short h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
#endif
}

// D = A(16x16, row) * B(16x8, col) + D on the tensor cores, bf16 inputs, fp32 accumulators.
// Fragments (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"), with
// g = lane / 4, q = lane % 4, each register two bf16 with the lower k in the low half:
// a[0] = A[g][2q..2q+1], a[1] = A[g+8][2q..], a[2] = A[g][2q+8..], a[3] = A[g+8][2q+8..];
// b[0] = B[2q..2q+1][g], b[1] = B[2q+8..2q+9][g]; c as for m16n8k8 (rows g, g+8; cols 2q, 2q+1).
__device__ __forceinline__ void mma_bf16(float c[4], const unsigned a[4], const unsigned b[2]) {
#ifdef TESSERA_EMU
    emu::mma_m16n8k16_bf16(c, a, b);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// The shared-memory address of a generic pointer into shared memory (for cp.async, ldmatrix).
__device__ __forceinline__ unsigned smem_addr(const void* p) {
    unsigned a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

// ldmatrix.sync.aligned.m8n8.x4 (.trans with TRANS): lane 8 m + r gives `row`, the shared
// address of row r (8 b16, 16-byte aligned) of matrix m; register m of lane 4 r + w receives
// word w (elements 2 w, 2 w + 1, the lower in the low half) of row r of matrix m, or with TRANS
// of row r of its transpose. Warp-wide: all 32 lanes execute it.
template <bool TRANS>
__device__ __forceinline__ void ldsm_x4(unsigned r[4], const void* row) {
#ifdef TESSERA_EMU
    emu::ldmatrix_x4(r, row, TRANS);
#else
    if (TRANS)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(smem_addr(row)));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(smem_addr(row)));
#endif
}

// BF16 tensor-core tile, warps as in tile_tc (four m16n8k16 products per k-step of 16). A and
// Bm are the padded bf16 copies (row stride ld, a multiple of 64; rows up to a multiple of 64;
// zero padding), so every 16-byte load is aligned and in bounds and needs no test. Each thread
// stages one 16-byte piece of A and of Bm per stage (row t / 4, k offset 8 * (t % 4)) and loads
// the next stage's pieces into registers while the tensor cores work on this one. The staging
// is double-buffered (As and Bs each have a second buffer BF16_BUF2 rows further on): the next
// stage goes into the other buffer while this one is read, so one barrier a stage suffices.
template <int XLD>
__device__ __forceinline__ void tile_bf16(const unsigned short* __restrict__ A,
                                          const unsigned short* __restrict__ Bm, i64 BR, i64 BC,
                                          i64 ld,
                                          i64 r0, i64 c0, unsigned (*As)[KW], unsigned (*Bs)[KW],
                                          float (*Xs)[XLD], float scale, float fill) {
    const int t = threadIdx.x;
    const int lane = t % 32, warp = t / 32;
    const int g = lane / 4, q4 = lane % 4;
    const int wm = 16 * (warp / 2), wn = 32 * (warp % 2);
    const int lrow = t / 4, lp = t % 4;
    const uint4* __restrict__ pa = reinterpret_cast<const uint4*>(A + (r0 + lrow) * ld) + lp;
    const uint4* __restrict__ pb = reinterpret_cast<const uint4*>(Bm + (c0 + lrow) * ld) + lp;
    float c[4][4];
#pragma unroll
    for (int n = 0; n < 4; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) c[n][e] = 0.0f;
    uint4 na = pa[0], nb = pb[0];
    *reinterpret_cast<uint4*>(&As[lrow][4 * lp]) = na;
    *reinterpret_cast<uint4*>(&Bs[lrow][4 * lp]) = nb;
    __syncthreads();
    int cur = 0;  // the buffer holding this stage: rows cur * BF16_BUF2 on
    for (i64 k0 = 0; k0 < ld; k0 += KB) {
        const bool more = k0 + KB < ld;
        if (more) {
            na = pa[(k0 + KB) / 8];
            nb = pb[(k0 + KB) / 8];
        }
        const unsigned(*Ac)[KW] = As + cur * BF16_BUF2;
        const unsigned(*Bc)[KW] = Bs + cur * BF16_BUF2;
#pragma unroll
        for (int kw = 0; kw < KB / 2; kw += 8) {
            // ldmatrix: A's four 8 x 8 blocks (rows +0/+8, k +0/+8) in one load, B's two
            // n-tiles' (k +0/+8) in another each; lane 8 m + r addresses row r of block m.
            const int lr = lane % 8, lm = lane / 8;
            unsigned af[4];
            ldsm_x4<false>(af, &Ac[wm + lr + 8 * (lm % 2)][kw + 4 * (lm / 2)]);
#pragma unroll
            for (int np = 0; np < 2; ++np) {
                unsigned bf[4];
                ldsm_x4<false>(bf, &Bc[wn + 16 * np + 8 * (lm / 2) + lr][kw + 4 * (lm % 2)]);
                mma_bf16(c[2 * np], af, bf);
                mma_bf16(c[2 * np + 1], af, bf + 2);
            }
        }
        // The next stage into the other buffer: its last readers (the stage before this one)
        // finished before the previous barrier; this barrier publishes it, and ends this
        // stage's reads before its buffer is refilled.
        if (more) {
            cur ^= 1;
            *reinterpret_cast<uint4*>(&As[cur * BF16_BUF2 + lrow][4 * lp]) = na;
            *reinterpret_cast<uint4*>(&Bs[cur * BF16_BUF2 + lrow][4 * lp]) = nb;
        }
        __syncthreads();
    }
    store_frags(c, wm, wn, g, q4, BR, BC, r0, c0, Xs, scale, fill);
}

// Xs[row][col] = scale * <A_{r0+row}, Bm_{c0+col}> for the 64 x 64 tile (`fill` in rows past BR
// and columns past BC), by
// fp32 FMA (MODE 0), 3xTF32 (MODE 1), TF32 (MODE 2) or BF16 (MODE 3) tensor cores. d: the
// features' row stride (for MODE 3 that of the padded bf16 copies). Ends with a barrier.
template <int MODE, int XLD>
__device__ __forceinline__ void tile_to_shared(const typename Tiles<MODE>::Feat* __restrict__ A,
                                               const typename Tiles<MODE>::Feat* __restrict__ Bm,
                                               i64 BR, i64 BC, i64 d, i64 r0, i64 c0,
                                               typename Tiles<MODE>::Row* As,
                                               typename Tiles<MODE>::Row* Bs, float (*Xs)[XLD],
                                               float scale, float fill) {
    if constexpr (MODE == 3) {
        tile_bf16(A, Bm, BR, BC, d, r0, c0, As, Bs, Xs, scale, fill);
    } else if constexpr (MODE == 0) {
        const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
        float acc[4][4];
        tile_dot(A, Bm, BR, BC, d, r0, c0, As, Bs, acc);
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int li = ty + 16 * i, lj = tx + 16 * j;
                const bool ok = (r0 + li < BR) && (c0 + lj < BC);
                Xs[li][lj] = ok ? scale * acc[i][j] : fill;
            }
    } else {
        tile_tc<MODE == 1, XLD>(A, Bm, BR, BC, d, r0, c0, As, Bs, Xs, scale, fill);
    }
    __syncthreads();
}

// 2^x by the special-function unit (ex2.approx.ftz: about 2 ulp; results below 2^-126 flush to
// zero). exp(x) = ex2(x * LOG2E_F).
#define LOG2E_F 1.4426950408889634f
__device__ __forceinline__ float ex2(float x) {
#ifdef TESSERA_EMU
    return exp2f(x);
#else
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
#endif
}

// Online log-sum-exp step: fold a set with max `mx` and sum `zs` (relative to mx) into (m, z).
__device__ __forceinline__ void lse_merge(float& m, float& z, float mx, float zs) {
    if (mx == NEG_INF_F) return;
    if (m == NEG_INF_F) {
        m = mx;
        z = zs;
        return;
    }
    const float mn = fmaxf(m, mx);
    z = z * expf(m - mn) + zs * expf(mx - mn);
    m = mn;
}

// Grid (chunks, splits), 256 threads, over the BR x BC logits of img's rows against txt's rows
// (the whole batch on one GPU: BR = BC = B; one block of a ring: BC the block's rows). Row
// tiles [rc*tiles_per_chunk, ...) of chunk rc, column tiles [cs*tiles_per_split, ...) of split
// cs. Writes row partials row_m/row_z[cs * BR + i], column partials col_m/col_z[rc * BC + j],
// and the positive logits: pos[i] = x_{i, i + diag} for the rows whose positive column
// i + diag lies in 0..BC (diag = 0 for one GPU's batch; NO_DIAG: no positives here).
template <int MODE>
__device__ __forceinline__ void clip_fwd_impl(const typename Tiles<MODE>::Feat* __restrict__ img,
                                              const typename Tiles<MODE>::Feat* __restrict__ txt,
                                              i64 BR, i64 BC, i64 d, float scale, i64 diag,
                                              int tiles_per_chunk, int tiles_per_split,
                                              float* __restrict__ row_m,
                                              float* __restrict__ row_z, float* __restrict__ col_m,
                                              float* __restrict__ col_z, float* __restrict__ pos) {
    // The logit tile's operand staging: As, then Bs (bf16: twice, see BF16_BUF2).
    __shared__ __align__(16) typename Tiles<MODE>::Row AB[(MODE == 3 ? 4 : 2) * Tiles<MODE>::ROWS];
    typename Tiles<MODE>::Row* As = AB;
    typename Tiles<MODE>::Row* Bs = AB + Tiles<MODE>::ROWS;
    __shared__ float Xs[TM][TN + 1];
    // (max, sum) of each quarter of the tile's rows and columns (the LSE epilogue's partials).
    __shared__ float qrm[4][TM], qrz[4][TM], qcm[4][TN], qcz[4][TN];
    const int t = threadIdx.x;
    const i64 rc = blockIdx.x, cs = blockIdx.y;
    const i64 n_r = (BR + TM - 1) / TM, n_c = (BC + TN - 1) / TN;
    const i64 rt_begin = rc * (i64)tiles_per_chunk;
    i64 rt_end = rt_begin + tiles_per_chunk;
    if (rt_end > n_r) rt_end = n_r;
    const i64 ct_begin = cs * (i64)tiles_per_split;
    i64 ct_end = ct_begin + tiles_per_split;
    if (ct_end > n_c) ct_end = n_c;
    float* __restrict__ cm = col_m + rc * BC;  // this block's column partials (chunk rc)
    float* __restrict__ cz = col_z + rc * BC;
    if (rt_begin >= rt_end) {
        // Empty chunk (no rows, or a grid wider than the rows): neutral column partials.
        i64 c_end = ct_end * TN;
        if (c_end > BC) c_end = BC;
        for (i64 c = ct_begin * TN + t; c < c_end; c += NT) {
            cm[c] = NEG_INF_F;
            cz[c] = 0.0f;
        }
        return;
    }
    for (i64 rt = rt_begin; rt < rt_end; ++rt) {
        const i64 r0 = rt * TM;
        float m = NEG_INF_F, z = 0.0f;  // row stats of row r0 + t (threads t < 64)
        for (i64 ct = ct_begin; ct < ct_end; ++ct) {
            const i64 c0 = ct * TN;
            // The column partials that this tile's columns merge into (threads 64..127; from the
            // earlier row tiles of this chunk), loaded now so that they arrive during the tile.
            float pm = NEG_INF_F, pz = 0.0f;
            if (t >= TM && t < TM + TN && rt != rt_begin && c0 + (t - TM) < BC) {
                pm = cm[c0 + (t - TM)];
                pz = cz[c0 + (t - TM)];
            }
            tile_to_shared<MODE, TN + 1>(img, txt, BR, BC, d, r0, c0, As, Bs, Xs, scale,
                                         NEG_INF_F);
            {
                // Every thread: the (max, sum) of a quarter (16 values) of row t % 64 and of
                // column t % 64, quarter t / 64 (masked entries are -inf: a (-inf, 0) partial).
                const int li = t % TM, part = t / TM;
                auto quarter = [&](bool col, float& qm, float& qz) {
                    float v[16], mx = NEG_INF_F, zs = 0.0f;
#pragma unroll
                    for (int k = 0; k < 16; ++k) {
                        v[k] = col ? Xs[16 * part + k][li] : Xs[li][16 * part + k];
                        mx = fmaxf(mx, v[k]);
                    }
                    // exp(v - mx) as 2^((v - mx) log2(e)) on the special-function unit.
                    if (mx != NEG_INF_F)
#pragma unroll
                        for (int k = 0; k < 16; ++k) zs += ex2((v[k] - mx) * LOG2E_F);
                    qm = mx;
                    qz = zs;
                };
                quarter(false, qrm[part][li], qrz[part][li]);
                quarter(true, qcm[part][li], qcz[part][li]);
            }
            __syncthreads();
            if (t < TM) {
                const i64 r = r0 + t;
                if (r < BR) {
                    // The row's four quarters, in order, into its running statistics.
#pragma unroll
                    for (int q = 0; q < 4; ++q) lse_merge(m, z, qrm[q][t], qrz[q][t]);
                    if (diag != NO_DIAG) {
                        const i64 p = r + diag;  // the positive's column
                        if (p >= c0 && p < c0 + TN && p < BC) pos[r] = Xs[t][p - c0];
                    }
                }
            } else if (t < TM + TN) {
                // Column c0 + j: always the same thread for a given column, so the
                // read-modify-write of cm/cz across row tiles needs no synchronisation.
                const int j = t - TM;
                const i64 c = c0 + j;
                if (c < BC) {
                    // The column's four quarters of this tile, in order.
                    float mx = NEG_INF_F, zs = 0.0f;
#pragma unroll
                    for (int q = 0; q < 4; ++q) lse_merge(mx, zs, qcm[q][j], qcz[q][j]);
                    if (rt == rt_begin) {
                        cm[c] = mx;
                        cz[c] = zs;
                    } else {
                        lse_merge(pm, pz, mx, zs);
                        cm[c] = pm;
                        cz[c] = pz;
                    }
                }
            }
            __syncthreads();
        }
        if (t < TM && r0 + t < BR) {
            row_m[cs * BR + r0 + t] = m;
            row_z[cs * BR + r0 + t] = z;
        }
    }
}

#define CLIP_FWD_ARGS(F)                                                                       \
    const F *__restrict__ img, const F *__restrict__ txt, i64 BR, i64 BC, i64 d, float scale,  \
        i64 diag, int tiles_per_chunk, int tiles_per_split, float *__restrict__ row_m,                  \
        float *__restrict__ row_z, float *__restrict__ col_m, float *__restrict__ col_z,        \
        float *__restrict__ pos
#define CLIP_FWD_PASS                                                                          \
    img, txt, BR, BC, d, scale, diag, tiles_per_chunk, tiles_per_split, row_m, row_z, col_m,     \
        col_z, pos

// fp32 FMA / 3xTF32 / TF32 / BF16 tensor-core versions of the forward. clip_fwd_bf16 takes the
// padded bf16 copies of clip_to_bf16 and their row stride as d.
extern "C" __global__ void __launch_bounds__(NT, CLIP_FWD_MIN_BLOCKS)
    clip_fwd(CLIP_FWD_ARGS(float)) {
    clip_fwd_impl<0>(CLIP_FWD_PASS);
}
extern "C" __global__ void __launch_bounds__(NT, CLIP_FWD_MIN_BLOCKS)
    clip_fwd_tf32x3(CLIP_FWD_ARGS(float)) {
    clip_fwd_impl<1>(CLIP_FWD_PASS);
}
extern "C" __global__ void __launch_bounds__(NT, CLIP_FWD_MIN_BLOCKS)
    clip_fwd_tf32(CLIP_FWD_ARGS(float)) {
    clip_fwd_impl<2>(CLIP_FWD_PASS);
}
extern "C" __global__ void __launch_bounds__(NT, CLIP_FWD_MIN_BLOCKS)
    clip_fwd_bf16(CLIP_FWD_ARGS(unsigned short)) {
    clip_fwd_impl<3>(CLIP_FWD_PASS);
}

__device__ __forceinline__ unsigned bf16_pair(float lo, float hi) {
    return (unsigned)to_bf16(lo) | ((unsigned)to_bf16(hi) << 16);
}

// The bf16 copies the *_bf16 kernels read: y[r * ld + k] = bf16(x[r * d + k]) (round to nearest
// even) for r < B and k < d, zero elsewhere up to rows_p x ld (multiples of 64, from the host),
// for the image and the text features in one launch; with txt and txt_h null, for img alone
// (the ring converts its rows and each visiting block, of other sizes, separately). Blocks
// stride over rows, threads over the k pairs of a row.
extern "C" __global__ void clip_to_bf16(const float* __restrict__ img,
                                        const float* __restrict__ txt, i64 B, i64 d, i64 rows_p,
                                        i64 ld, unsigned short* __restrict__ img_h,
                                        unsigned short* __restrict__ txt_h) {
    const bool two = txt != nullptr && txt_h != nullptr;
    for (i64 r = blockIdx.x; r < rows_p; r += gridDim.x) {
        for (i64 k = 2 * (i64)threadIdx.x; k < ld; k += 2 * (i64)blockDim.x) {
            float i0 = 0.0f, i1 = 0.0f, t0 = 0.0f, t1 = 0.0f;
            if (r < B && k < d) {
                i0 = img[r * d + k];
                if (two) t0 = txt[r * d + k];
            }
            if (r < B && k + 1 < d) {
                i1 = img[r * d + k + 1];
                if (two) t1 = txt[r * d + k + 1];
            }
            *reinterpret_cast<unsigned*>(&img_h[r * ld + k]) = bf16_pair(i0, i1);
            if (two) *reinterpret_cast<unsigned*>(&txt_h[r * ld + k]) = bf16_pair(t0, t1);
        }
    }
}

// Merges `parts` partials (m, z) of index i in order, in f64, starting from (m, z).
__device__ void merge_into(const float* pm, const float* pz, int parts, i64 n, i64 i, double& m,
                           double& z) {
    for (int p = 0; p < parts; ++p) {
        const double m2 = (double)pm[(i64)p * n + i];
        const double z2 = (double)pz[(i64)p * n + i];
        if (m2 == NEG_INF_D) continue;
        if (m == NEG_INF_D) {
            m = m2;
            z = z2;
            continue;
        }
        const double mn = fmax(m, m2);
        z = z * exp(m - mn) + z2 * exp(m2 - mn);
        m = mn;
    }
}

// Merges `parts` partials (m, z) of index i in order, in f64; returns m + log z.
__device__ double merge_parts(const float* pm, const float* pz, int parts, i64 B, i64 i) {
    double m = NEG_INF_D, z = 0.0;
    merge_into(pm, pz, parts, B, i, m, z);
    return m + log(z);
}


// One thread per index i < B: row LSE l_i (over `splits` partials), column LSE k_i (over
// `chunks` partials), both split into f32 hi + lo, and term[i] = l_i + k_i - 2 x_ii.
extern "C" __global__ void clip_lse(const float* __restrict__ row_m, const float* __restrict__ row_z,
                                    int splits, const float* __restrict__ col_m,
                                    const float* __restrict__ col_z, int chunks,
                                    const float* __restrict__ pos, i64 B, float* __restrict__ lse_hi,
                                    float* __restrict__ lse_lo, float* __restrict__ kap_hi,
                                    float* __restrict__ kap_lo, double* __restrict__ term) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < B; i += (i64)gridDim.x * blockDim.x) {
        const double l = merge_parts(row_m, row_z, splits, B, i);
        const double k = merge_parts(col_m, col_z, chunks, B, i);
        const float lh = (float)l, kh = (float)k;
        lse_hi[i] = lh;
        lse_lo[i] = (float)(l - (double)lh);
        kap_hi[i] = kh;
        kap_lo[i] = (float)(k - (double)kh);
        term[i] = l + k - 2.0 * (double)pos[i];
    }
}

// The ring (rank/src/device/cuda/ring.rs): folds one block's `splits` row partials of the rows
// i < n into their running statistics (run_m, run_z) in f64, in split order; `first`: the
// running statistics start empty (their contents are ignored).
extern "C" __global__ void clip_fold_rows(const float* __restrict__ row_m,
                                          const float* __restrict__ row_z, int splits, i64 n,
                                          int first, double* __restrict__ run_m,
                                          double* __restrict__ run_z) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        double m = first ? NEG_INF_D : run_m[i], z = first ? 0.0 : run_z[i];
        merge_into(row_m, row_z, splits, n, i, m, z);
        run_m[i] = m;
        run_z[i] = z;
    }
}

// The ring: one block's column statistics over this rank's rows, its `chunks` column partials
// of the columns j < n merged in f64 in chunk order, as the ring carries them: out[j] = m and
// out[n + j] = sum exp(x - m), f32 (z rescaled to the rounded m).
extern "C" __global__ void clip_fold_cols(const float* __restrict__ col_m,
                                          const float* __restrict__ col_z, int chunks, i64 n,
                                          float* __restrict__ out) {
    for (i64 j = (i64)blockIdx.x * blockDim.x + threadIdx.x; j < n; j += (i64)gridDim.x * blockDim.x) {
        double m = NEG_INF_D, z = 0.0;
        merge_into(col_m, col_z, chunks, n, j, m, z);
        const float mf = (float)m;
        out[j] = mf;
        out[n + j] = m == NEG_INF_D ? 0.0f : (float)(z * exp(m - (double)mf));
    }
}

// The device ring's accumulator merge (rank/src/loss/ring_device.rs): part <- inc (+) part for
// the column statistics of n columns ([m; n] then [z; n], as clip_fold_cols writes them), in f64,
// the incoming statistics first, written back as clip_fold_cols writes its output.
extern "C" __global__ void clip_merge_cols(float* __restrict__ part, const float* __restrict__ inc,
                                           i64 n) {
    for (i64 j = (i64)blockIdx.x * blockDim.x + threadIdx.x; j < n; j += (i64)gridDim.x * blockDim.x) {
        double m = NEG_INF_D, z = 0.0;
        merge_into(inc, inc + n, 1, n, j, m, z);
        merge_into(part, part + n, 1, n, j, m, z);
        const float mf = (float)m;
        part[j] = mf;
        part[n + j] = m == NEG_INF_D ? 0.0f : (float)(z * exp(m - (double)mf));
    }
}

// out[0] = sum of v[0..n) in f64 with one block of NT threads: fixed order, deterministic.
extern "C" __global__ void __launch_bounds__(NT) sum_f64(const double* __restrict__ v, i64 n,
                                                         double* __restrict__ out) {
    __shared__ double buf[NT];
    double acc = 0.0;
    for (i64 i = threadIdx.x; i < n; i += NT) acc += v[i];
    buf[threadIdx.x] = acc;
    __syncthreads();
    for (int s = NT / 2; s > 0; s >>= 1) {
        if ((int)threadIdx.x < s) buf[threadIdx.x] += buf[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) out[0] = buf[0];
}

// Deterministic mode's column splits (clip_bwd_pair*, grid z = S): dst[i] += parts[0][i] +
// parts[1][i] + ... over n_parts shares of n floats each, added in that order.
extern "C" __global__ void clip_fold_splits(float* __restrict__ dst, const float* __restrict__ parts,
                                            i64 n, int n_parts) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        float v = dst[i];
        for (int p = 0; p < n_parts; ++p) v += parts[(i64)p * n + i];
        dst[i] = v;
    }
}

// Row stride of the fp32 versions' feature stages Fs (64 + 8 floats): the tensor-core products'
// B-fragment loads (4 stage rows x 8 columns per warp) then hit 32 different banks, and rows stay
// 16-byte aligned (288 bytes).
#define FS_LD (64 + 8)

// Row stride of the bf16 version's feature stages (128 + 8 bf16, 272 bytes = 68 words): the
// ldmatrix loads' 8 rows of 16 bytes then hit 32 different banks.
#define FH_LD (128 + 8)

// Row stride of the backward's logit / G tile (64 + 4 floats): the TF32 products' A-fragment
// reads of G (8 rows x 4 columns per warp) hit 32 different banks, the transposed and bf16
// reads and the fragment stores at most 2 per bank (4 with rows of 65 floats, which the
// forward's LSE loops keep for their row- and column-wise reads).
#define GS_LD (TN + 4)

// Row stride of the fp32 versions' G panel (64 per panel tile + 4 floats; GS_LD for one tile):
// rows 4 words apart modulo 32 whatever the panel, so the reads keep GS_LD's bank pattern.
#define GP_LD (TN * CLIP_BWD_PANEL + 4)

// Row stride of the bf16 copy of s * G that the bf16 products read (64 per panel tile + 8 bf16;
// 144 bytes for one tile): ldmatrix's 8 rows of 16 bytes then hit 32 different banks (rows 4
// words apart modulo 32, whatever the panel).
#define GH_LD (64 * CLIP_BWD_PANEL + 8)

// Asynchronous global -> shared copies (sm_80 cp.async): BYTES (4 or 16) to `dst`, of which the
// first `src_bytes` come from `src` and the rest are zero (src_bytes = 0: zeros, nothing read).
// They complete at cp_async_wait<N>() (all but the N most recent committed groups), made
// visible to the block by the barrier after it.
template <int BYTES>
__device__ __forceinline__ void cp_async(void* dst, const void* src, unsigned src_bytes) {
#ifdef TESSERA_EMU
    emu::cp_async(dst, src, BYTES, src_bytes);
#else
    const unsigned a = smem_addr(dst);
    if (BYTES == 16)
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(a), "l"(src),
                     "r"(src_bytes)
                     : "memory");
    else
        asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(a), "l"(src),
                     "r"(src_bytes)
                     : "memory");
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#ifdef TESSERA_EMU
    emu::cp_async_commit();
#else
    asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifdef TESSERA_EMU
    emu::cp_async_wait(N);
#else
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#endif
}

// One backward stage: the contraction (the tile's 64 columns for dA, its 64 rows for dB) is
// staged SR rows at a time, CW feature columns wide (the job's feature chunk), rows LD elements
// apart, two stages in flight. fp32: 32 rows x 64 columns (9,216 bytes); bf16: the whole
// contraction, 64 rows x 128 columns (17,408 bytes), so that each warp's product is 32 x 32
// (ldmatrix traffic per mma two thirds of a 16 x 32 product's).
template <int MODE>
struct Stage {
    static constexpr int SR = 32, CW = 64, LD = FS_LD;
};
template <>
struct Stage<3> {
    static constexpr int SR = 64, CW = 128, LD = FH_LD;
};

// Starts the copy of Fs[j][k] = F[row0 + j][dc + k] (j < SR, k < CW) into shared memory, rows
// >= nrows and k >= d as 0. fp32: row stride ld (= d); 16-byte pieces when `vec` (d a multiple
// of 4, F 16-byte aligned), else single elements. bf16: the padded copies (ld and the rows
// multiples of 64, zero padding), so whole 16-byte pieces; only the chunk's second half may
// lie past ld (ld an odd multiple of 64), and is zero-filled there.
template <int MODE>
__device__ __forceinline__ void stage_load(const typename Tiles<MODE>::Feat* __restrict__ F,
                                           i64 row0, i64 nrows, i64 d, i64 ld, i64 dc, bool vec,
                                           typename Tiles<MODE>::Feat (*Fs)[Stage<MODE>::LD]) {
    constexpr int SR = Stage<MODE>::SR;
    const int t = threadIdx.x;
    if constexpr (MODE == 3) {
        constexpr int P = Stage<3>::CW / 8;  // 16-byte pieces per row
        for (int e = t; e < SR * P; e += NT) {
            const int j = e / P, p = e % P;
            const i64 k = dc + 8 * p;
            const bool ok = k < ld;
            cp_async<16>(&Fs[j][8 * p], ok ? F + (row0 + j) * ld + k : F, ok ? 16 : 0);
        }
    } else if (vec) {
        for (int e = t; e < SR * 16; e += NT) {
            const int j = e / 16, p = e % 16;
            const i64 r = row0 + j, k = dc + 4 * p;
            const bool ok = r < nrows && k < d;
            cp_async<16>(&Fs[j][4 * p], ok ? F + r * ld + k : F, ok ? 16 : 0);
        }
    } else {
        for (int e = t; e < SR * 64; e += NT) {
            const int j = e / 64, k = e % 64;
            const i64 r = row0 + j, kk = dc + k;
            const bool ok = r < nrows && kk < d;
            cp_async<4>(&Fs[j][k], ok ? F + r * ld + kk : F, ok ? 4 : 0);
        }
    }
    cp_async_commit();
}

// The gradient product of the tensor-core versions for one stage: c += sum over the stage's SR
// contraction indices k of Gop[row][kb + k] * Fs[k][col], for the warp's 16 x 32 block at
// (wm, wn) (m16n8 accumulator fragments, as tile_tc), where Gop = Gs (TRANS false: dA's rows
// against the tile's columns) or Gs^T (TRANS true: dB's rows against the tile's rows). TF32
// m16n8k8 products, fp32 accumulators; SPLIT: 3xTF32 (G and F each as hi + lo, near fp32).
template <bool SPLIT, bool TRANS, int SR, int GLD>
__device__ __forceinline__ void product_tc(const float (*Gs)[GLD], const float (*Fs)[FS_LD],
                                           int kb, int wm, int wn, int g, int q4, float c[4][4]) {
#pragma unroll 1
    for (int k0 = 0; k0 < SR; k0 += 8) {
        const int k = kb + k0;
        float af[4];
        if (TRANS) {
            af[0] = Gs[k + q4][wm + g];
            af[1] = Gs[k + q4][wm + g + 8];
            af[2] = Gs[k + q4 + 4][wm + g];
            af[3] = Gs[k + q4 + 4][wm + g + 8];
        } else {
            af[0] = Gs[wm + g][k + q4];
            af[1] = Gs[wm + g + 8][k + q4];
            af[2] = Gs[wm + g][k + q4 + 4];
            af[3] = Gs[wm + g + 8][k + q4 + 4];
        }
        // TF32: s * G was rounded to TF32 when stored (the G loop); 3xTF32 splits it here.
        auto bf = [&](int n, int e) { return Fs[k0 + q4 + 4 * e][wn + 8 * n + g]; };
        mma_tf32_row<SPLIT, decltype(bf), !SPLIT>(c, af, bf);
    }
}

// The gradient product of the bf16 version for one stage: c += sum over the stage's SR
// contraction indices k of Gop[row][kb + k] * Fs[k][col] for the warp's 32 x 32 block at (wm, wn)
// of the job's 64 x 128 output (two m16 row blocks mi times four n8 column blocks n, accumulator
// c[4 mi + n]), where Gop = Gh (TRANS false: dA's rows against the tile's columns) or Gh^T (TRANS
// true: dB's rows against the tile's rows); Gh is the bf16 copy of s * G (round to nearest
// even), Fs the bf16 feature stage, BF16 m16n8k16 products with fp32 accumulators. All fragments
// come by ldmatrix: per k-step of 16, G's for each row block (rows +0/+8, k +0/+8; transposed for
// TRANS) in one load each, the stage's for two n-blocks (k +0/+8, transposed: the stage is
// [k][column]) in one load each: four loads for eight products.
template <bool TRANS, int SR>
__device__ __forceinline__ void product_bf16(const unsigned short (*Gh)[GH_LD],
                                             const unsigned short (*Fs)[FH_LD], int kb, int wm,
                                             int wn, int lane, float c[8][4]) {
    const int lr = lane % 8, lm = lane / 8;
#pragma unroll 1
    for (int k0 = 0; k0 < SR; k0 += 16) {
        const int k = kb + k0;
        unsigned a[2][4];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
            if (TRANS)
                ldsm_x4<true>(a[mi], &Gh[k + lr + 8 * (lm / 2)][wm + 16 * mi + 8 * (lm % 2)]);
            else
                ldsm_x4<false>(a[mi], &Gh[wm + 16 * mi + lr + 8 * (lm % 2)][k + 8 * (lm / 2)]);
        }
#pragma unroll
        for (int np = 0; np < 2; ++np) {
            unsigned b[4];
            ldsm_x4<true>(b, &Fs[k0 + lr + 8 * (lm % 2)][wn + 16 * np + 8 * (lm / 2)]);
#pragma unroll
            for (int mi = 0; mi < 2; ++mi) {
                mma_bf16(c[4 * mi + 2 * np], a[mi], b);
                mma_bf16(c[4 * mi + 2 * np + 1], a[mi], b + 2);
            }
        }
    }
}

// The fp32 FMA product for one stage, with the same meaning: out[i][k] += sum over the stage's
// j of Gop[ty + 16 i][kb + j] * Fs[j][tx + 16 k].
template <bool TRANS, int SR, int GLD>
__device__ __forceinline__ void product_fma(const float (*Gs)[GLD], const float (*Fs)[FS_LD],
                                            int kb, int tx, int ty, float out[4][4]) {
#pragma unroll 2
    for (int j = 0; j < SR; ++j) {
        float f[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) f[k] = Fs[j][tx + 16 * k];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const float g = TRANS ? Gs[kb + j][ty + 16 * i] : Gs[ty + 16 * i][kb + j];
#pragma unroll
            for (int k = 0; k < 4; ++k) out[i][k] = fmaf(g, f[k], out[i][k]);
        }
    }
}

// The backward's accumulators: element (i, e) of a thread's c[i][e] is output (rb + bwd_ro(i, e),
// cb + bwd_co(i, e)) of the job's block, where (rb, cb) is the thread's first element. fp32 FMA
// (MODE 0): rows ty + 16 i, columns tx + 16 e. Tensor-core versions: m16n8 fragment i % 4 of
// row block i / 4, so that elements e = 0, 1 (and 2, 3) are neighbours in a row.
template <int MODE>
__device__ __forceinline__ int bwd_ro(int i, int e) {
    return MODE == 0 ? 16 * i : 16 * (i / 4) + 8 * (e / 2);
}
template <int MODE>
__device__ __forceinline__ int bwd_co(int i, int e) {
    return MODE == 0 ? 16 * e : 8 * (i % 4) + (e % 2);
}

// Calls f(i, e, q) for a thread's accumulator elements (i, e) of a job (e in steps of STEP; 2:
// the pairs e, e + 1), q the element's address in the output: p + ro * ld + co, for those with
// ro < rows and co < cols (the ones inside the matrix). When all are inside (`interior`), there
// are no tests: the addresses are one multiply per row plus immediate offsets.
template <int MODE, int NACC, int STEP, typename F>
__device__ __forceinline__ void job_elems(float* p, i64 rows, i64 cols, i64 ld, bool interior,
                                          F f) {
    if (interior) {
#pragma unroll
        for (int i = 0; i < NACC; ++i)
#pragma unroll
            for (int e = 0; e < 4; e += STEP)
                f(i, e, p + bwd_ro<MODE>(i, e) * ld + bwd_co<MODE>(i, e));
    } else {
#pragma unroll
        for (int i = 0; i < NACC; ++i)
#pragma unroll
            for (int e = 0; e < 4; e += STEP)
                if (bwd_ro<MODE>(i, e) < rows && bwd_co<MODE>(i, e) < cols)
                    f(i, e, p + bwd_ro<MODE>(i, e) * ld + bwd_co<MODE>(i, e));
    }
}

// p[0] += x, p[1] += y as a reduction in global memory (p 8-byte aligned): one vector red on
// sm_90 and later, two scalar ones before.
__device__ __forceinline__ void red_add2(float* p, float x, float y) {
#if !defined(TESSERA_EMU) && __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};" ::"l"(p), "f"(x), "f"(y) : "memory");
#else
    atomicAdd(p, x);
    atomicAdd(p + 1, y);
#endif
}

// Grid ceil(BR/64) x 1 x S, 256 threads, over the BR x BC logits of A's rows against Bm's rows
// (the positive of A's row r is Bm's row r + diag, when in 0..BC; NO_DIAG: none). dA[rows of
// tile] += s * G * Bm (dA must be initialised, e.g. zero); with dB non-null also dB += s * G^T *
// A by atomicAdd (fast mode, not deterministic); with dt_part non-null, dt_part[blockIdx.x +
// ceil(BR/64) * blockIdx.z] = sum over the block's rows and columns of G_ij x_ij.
// (la_hi, la_lo): LSEs of A's rows; (lb_hi, lb_lo): LSEs of Bm's rows (the other direction). d:
// the feature dimension (dA is BR x d, dB BC x d); ld: the row stride of A and Bm (d, or for
// MODE 3 that of the padded bf16 copies).
//
// Column splits (grid z = S > 1, for grids of fewer row tiles than a wave of blocks): block
// (x, 0, z) takes the column tiles [z * per, (z + 1) * per) of the ceil(BC/64), per = ceil(tiles
// / S) (splits past the last tile have none). Fast mode then adds every dA job into dA by
// atomicAdd too (each job from zero). Deterministic mode keeps dA an ordinary target: split 0
// updates it as one split does, and split z > 0 its share at parts + (z - 1) * BR * d (the
// first tile's jobs from zero, the later ones from the share), which the host folds into dA in
// split order (clip_fold_splits): the result depends on S, which the host plans from the GPU's
// size, and not on the blocks' timing.
//
// Per column tile: recompute the logits, form s * G in shared memory, then run the tile's jobs
// (for each 64-wide feature chunk dc: dA's, then in fast mode dB's), each as 64 / SR stages of
// its contraction. Stages are double-buffered with cp.async, so the next stage's features load
// while this one's products run; a job's accumulators start from dA's current values (loaded
// while the previous job's last stage is waited for) and go back to dA when it ends (dB: zero,
// then atomicAdd).
//
// SIG: the pairwise sigmoid loss (SigLIP, ALGORITHMS.md section 3) instead of the softmax one,
// the same tiles and products with another G: inv2b is 1/B, the LSE pointers are unused (null),
// and G_ij = (sigma(x_ij + bias) - delta_ij) / B; dt_part then holds three values per block,
// [3 k] = sum G_ij x_ij, [3 k + 1] = sum -log sigma(z_ij (x_ij + bias)) (not yet divided by B),
// [3 k + 2] = sum G_ij (dL/dbias).
template <int MODE, bool SIG = false>
__device__ __forceinline__ void clip_bwd_impl(
    const typename Tiles<MODE>::Feat* __restrict__ A,
    const typename Tiles<MODE>::Feat* __restrict__ Bm, i64 BR, i64 BC, i64 d, i64 ld,
    float scale, float inv2b, const float* __restrict__ la_hi, const float* __restrict__ la_lo,
    const float* __restrict__ lb_hi, const float* __restrict__ lb_lo, i64 diag,
    float* __restrict__ dA,
    float* __restrict__ dB, double* __restrict__ dt_part, float* __restrict__ parts,
    float bias = 0.0f) {
    typedef typename Tiles<MODE>::Feat Feat;
    constexpr int SR = Stage<MODE>::SR, CW = Stage<MODE>::CW, LD = Stage<MODE>::LD;
    constexpr int H = TN / SR;               // stages per tile of a job's contraction
    constexpr int NACC = MODE == 3 ? 8 : 4;  // accumulator fragments per thread
    constexpr int PT = CLIP_BWD_PANEL;       // column tiles per G panel
    // The row stride of Gs: the bf16 version's per-tile logits (its panel is Gh), the fp32
    // versions' panel of s * G (GS_LD for one tile).
    constexpr int GLD = MODE == 3 ? GS_LD : GP_LD;
    typedef typename Tiles<MODE>::Row Row;
    // AB: the logit tile's operand staging, As then Bs (fp32 versions); the bf16 version keeps
    // its bf16 copy of s * G there (Gh) and stages the logit tile in FG (below). With panels of
    // several tiles, the panel is the launch's dynamic shared memory instead: Gh (TM x GH_LD
    // bf16) in the bf16 version, Gs (TM x GP_LD floats) in the fp32 ones.
    __shared__ __align__(16) Row AB[MODE == 3 && PT > 1 ? 1 : 2 * Tiles<MODE>::ROWS];
    extern __shared__ uint4 bwd_panel[];
    static_assert(MODE != 3 || PT > 1 || sizeof(AB) >= sizeof(unsigned short[TM][GH_LD]),
                  "the bf16 copy of G fits in AB");
    unsigned short(*Gh)[GH_LD] = reinterpret_cast<unsigned short(*)[GH_LD]>(
        PT > 1 ? static_cast<void*>(bwd_panel) : static_cast<void*>(AB));
    // FG: two stages of SR rows of Bm (for dA) or A (for dB), CW feature columns each, and the
    // logit tile Gs (the logits, then s * G in place): after the stages, or in the bf16 version
    // in the second stage's place (its logits are dead once Gh holds s * G, and the barrier
    // after that comes before the second stage is issued). The fp32 versions' panels of
    // several tiles are in dynamic shared memory, the tile's logits and s * G in its columns.
    constexpr bool GS_DYN = MODE != 3 && PT > 1;
    constexpr int FS_BYTES = 2 * SR * LD * (int)sizeof(Feat);
    constexpr int GS_BYTES = GS_DYN ? 0 : TM * GS_LD * 4;
    constexpr int GS_AT = MODE == 3 ? FS_BYTES / 2 : FS_BYTES;
    constexpr int FG_BYTES = GS_AT + GS_BYTES > FS_BYTES ? GS_AT + GS_BYTES : FS_BYTES;
    __shared__ __align__(16) float FG[FG_BYTES / 4];  // the stages, and Gs
    Feat(*Fs)[SR][LD] = reinterpret_cast<Feat(*)[SR][LD]>(FG);
    float(*Gs)[GLD] = reinterpret_cast<float(*)[GLD]>(
        GS_DYN ? static_cast<void*>(bwd_panel) : static_cast<void*>(FG + GS_AT / 4));
    // The bf16 version's logit tile stages double-buffered (BF16_BUF2) at the start of FG: no
    // stage of the products is in flight during the tile, and the logits reach Gs only after
    // the tile's last read of the staging.
    static_assert(MODE != 3 || 2 * BF16_BUF2 * sizeof(Row) <= sizeof(FG),
                  "the bf16 logit tile's staging fits in FG");
    Row* As = MODE == 3 ? reinterpret_cast<Row*>(FG) : AB;
    Row* Bs = As + Tiles<MODE>::ROWS;
    __shared__ double red[NT];
    const int t = threadIdx.x;
    const int tx = t % 16, ty = t / 16;
    // The tensor-core products' warp tiling: 16 x 32 of the job's 64 x 64 output each (as
    // tile_tc); bf16: 32 x 32 of its 64 x 128 output.
    const int lane = t % 32, warp = t / 32;
    const int wg = lane / 4, wq = lane % 4;
    const int wm = MODE == 3 ? 32 * (warp / 4) : 16 * (warp / 2);
    const int wn = MODE == 3 ? 32 * (warp % 4) : 32 * (warp % 2);
    // This thread's first output element of a job's block (bwd_ro, bwd_co give the others).
    const int rb = MODE == 0 ? ty : wm + wg, cb = MODE == 0 ? tx : wn + 2 * wq;
    const i64 r0 = (i64)blockIdx.x * TM;
    const i64 n_ct = (BC + TN - 1) / TN;
    // This block's column tiles [ct_begin, ct_end) (all of them with one split), and where its
    // dA jobs go (see above).
    const int n_split = (int)gridDim.z, split = (int)blockIdx.z;
    const i64 per_split = (n_ct + n_split - 1) / n_split;
    const i64 ct_begin = split * per_split;
    const i64 ct_end = n_ct < ct_begin + per_split ? n_ct : ct_begin + per_split;
    const bool fast = dB != nullptr;
    const bool dA_atomic = n_split > 1 && fast;  // dA jobs end by atomicAdd (from zero)
    const bool share = n_split > 1 && !fast && split > 0;
    float* const dAo = share ? parts + (i64)(split - 1) * BR * d : dA;
    bool dA_zero = dA_atomic;  // this panel's dA jobs start from zero (set per panel)
    const int passes = dB != nullptr ? 2 : 1;
    const int n_chunks = (int)((d + CW - 1) / CW);
    // Stages per pass and chunk in the current panel (of nt tiles): a dA job contracts over all
    // of the panel's nt * TN columns (nt * H stages); the dB jobs are one per tile (H each).
    // (Written so that with one tile per panel the compiler sees H and the code is the
    // single-tile kernel's.)
    int HP = H;
    const bool vec = MODE != 3 && vec4_rows(d, A, Bm);
    // A stage: feature chunk dc, pass (0: dA from Bm's rows, 1: dB from A's rows), part h of
    // the pass's contractions (pass 1: tile h / H of the panel, part h % H of its job); stages
    // run chunk by chunk, pass by pass, part by part.
    struct St {
        i64 dc;
        int pass, h;
    };
    auto next = [&](St x) {
        if (++x.h == (PT == 1 ? H : HP)) {
            x.h = 0;
            if (++x.pass == passes) {
                x.pass = 0;
                x.dc += CW;
            }
        }
        return x;
    };
    auto issue = [&](St x, int buf, i64 c0) {
        if (x.pass == 0)
            stage_load<MODE>(Bm, c0 + x.h * SR, BC, d, ld, x.dc, vec, Fs[buf]);
        else
            stage_load<MODE>(A, r0 + (PT == 1 ? x.h : x.h % H) * SR, BR, d, ld, x.dc, vec,
                             Fs[buf]);
    };
    // The neighbours (e, e + 1) of the tensor-core versions move as one 8-byte access when d is
    // even and dA, dB 8-byte aligned: a warp's access is then 8 rows of 32 whole bytes.
    const bool vec2 = MODE != 0 && (d & 1) == 0 &&
                      ((reinterpret_cast<unsigned long long>(dAo) |
                        reinterpret_cast<unsigned long long>(dB)) & 7) == 0;
    // The job of stage x in the panel at column c0: this thread's first output element, and how
    // many rows and columns from there are inside the matrix (for job_elems).
    struct Out {
        float* p;
        i64 rows, cols;
        bool interior;
    };
    auto out = [&](St x, i64 c0) {
        const i64 r = (x.pass == 0 ? r0 : c0 + (PT == 1 ? 0 : TN * (x.h / H))) + rb;
        const i64 k = x.dc + cb;
        const i64 rows = (x.pass == 0 ? BR : BC) - r, cols = d - k;
        const bool in = rows > bwd_ro<MODE>(NACC - 1, 3) && cols > bwd_co<MODE>(NACC - 1, 3);
        return Out{(x.pass == 0 ? dAo : dB) + r * d + k, rows, cols, in};
    };
    // A job's accumulators at its start: dA's current values (pass 0), or zero (pass 1, and
    // pass 0 into a split's share).
    float c[NACC][4];
    auto init = [&](St x) {
        const Out o = out(St{x.dc, 0, 0}, 0);
        if (x.pass != 0 || dA_zero || !o.interior) {
#pragma unroll
            for (int i = 0; i < NACC; ++i)
#pragma unroll
                for (int e = 0; e < 4; ++e) c[i][e] = 0.0f;
        }
        if (x.pass != 0 || dA_zero) return;
        if (vec2)  // (co even and cols even: co + 1 < cols with co)
            job_elems<MODE, NACC, 2>(o.p, o.rows, o.cols, d, o.interior,
                                     [&](int i, int e, const float* q) {
                                         const float2 v = *reinterpret_cast<const float2*>(q);
                                         c[i][e] = v.x;
                                         c[i][e + 1] = v.y;
                                     });
        else
            job_elems<MODE, NACC, 1>(o.p, o.rows, o.cols, d, o.interior,
                                     [&](int i, int e, const float* q) { c[i][e] = *q; });
    };
    double dt_acc = 0.0, loss_acc = 0.0, gs_acc = 0.0;  // (the last two: SIG only)
    for (i64 ct = ct_begin; ct < ct_end; ct += PT) {
        // The panel: nt column tiles from column c0 (one but in the bf16 version).
        const i64 c0 = ct * TN;
        const int nt = PT == 1 ? 1 : (int)(ct_end - ct < PT ? ct_end - ct : PT);
        dA_zero = dA_atomic || (share && ct == ct_begin);
        HP = nt * H;
        const int n_stages = n_chunks * passes * HP;
        const St first = {0, 0, 0};
        for (int tt = 0; tt < nt; ++tt) {
            const i64 c0t = c0 + TN * tt;  // this tile's first column
            // The tile's logits, then s * G: the fp32 versions' in the panel's columns of the
            // tile; the bf16 version's logits in Gs (s * G to Gh's columns of the tile).
            float(*Gt)[GLD] = MODE == 3 ? Gs : reinterpret_cast<float(*)[GLD]>(&Gs[0][TN * tt]);
            // (Panels: every thread done with the previous tile's logits, which the bf16 staging
            // of this one overlaps.)
            if (PT > 1 && tt > 0) __syncthreads();
            tile_to_shared<MODE, GLD>(A, Bm, BR, BC, ld, r0, c0t, As, Bs, Gt, scale, 0.0f);
            // The first stage's features load while the panel's last G is formed (the previous
            // panel's last stage ended with a barrier, and nothing of it is in flight).
            if (tt == nt - 1 && n_stages > 0) issue(first, 0, c0);  // (d = 0: no stage)
            // G from the logits: exp2 of arguments scaled by log2(e) (one MUFU.EX2 each, where
            // expf is a longer sequence); the diagonal found by a local offset; rows and columns
            // tested only in edge tiles; this tile's share of dL/dt summed in fp32 over the
            // thread's 16 elements, then added to the fp64 total.
            const float L2E = LOG2E_F;
            float lah[4], lal[4];  // row i's LSE as hi + lo; lal scaled by -log2(e)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const i64 r = r0 + ty + 16 * i;
                lah[i] = !SIG && r < BR ? la_hi[r] : 0.0f;
                lal[i] = !SIG && r < BR ? -L2E * la_lo[r] : 0.0f;
            }
            // The positive of local row li is local column li + dl (none: dl out of reach).
            const i64 dl64 = diag == NO_DIAG ? (i64)TN : diag + r0 - c0t;
            const int dl = (dl64 > -TM && dl64 < TN) ? (int)dl64 : 4 * TN;
            float dt_tile = 0.0f, loss_tile = 0.0f, gs_tile = 0.0f;
            // Element (i, j) of this thread: local row ty + 16 i, column tx + 16 j; `test`: check
            // that it lies inside the matrix (edge tiles).
            auto elem = [&](int i, int j, float lbh, float lbl, bool test) {
                const int li = ty + 16 * i, lj = tx + 16 * j;
                float g = 0.0f;
                if (!test || (r0 + li < BR && c0t + lj < BC)) {
                    const float x = Gt[li][lj];
                    if constexpr (SIG) {
                        // Every pair as a negative first: -log sigma(-u) = softplus(u) =
                        // max(u, 0) + log(1 + e), e = exp(-|u|); sigma(u) from the same e.
                        const float u = x + bias;
                        const float e = ex2(-fabsf(u) * L2E);
                        const float r = 1.0f / (1.0f + e);
                        g = (u >= 0.0f ? r : e * r) * inv2b;
                        float l = fmaxf(u, 0.0f) + log1pf(e);
                        // The positive: softplus(-u) = softplus(u) - u, and G gains -1/B.
                        if (lj - li == dl) {
                            g -= inv2b;
                            l -= u;
                        }
                        loss_tile += l;
                        gs_tile += g;
                    } else {
                        // exp(x - lse) = 2^((x - hi) log2(e) - lo log2(e)), x - hi nearly exact.
                        g = (ex2(fmaf(x - lah[i], L2E, lal[i])) + ex2(fmaf(x - lbh, L2E, lbl))) *
                            inv2b;
                        if (lj - li == dl) g -= 2.0f * inv2b;
                    }
                    dt_tile = fmaf(g, x, dt_tile);
                }
                if constexpr (MODE == 3)
                    Gh[li][TN * tt + lj] = to_bf16(scale * g);
                else if constexpr (MODE == 2)  // rounded once here, not at every read
                    Gt[li][lj] = __uint_as_float(to_tf32(scale * g));
                else
                    Gt[li][lj] = scale * g;
            };
            const bool edge = r0 + TM > BR || c0t + TN > BC;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const i64 cc = c0t + tx + 16 * j;
                const float lbh = !SIG && cc < BC ? lb_hi[cc] : 0.0f;
                const float lbl = !SIG && cc < BC ? -L2E * lb_lo[cc] : 0.0f;
                if (edge) {
#pragma unroll
                    for (int i = 0; i < 4; ++i) elem(i, j, lbh, lbl, true);
                } else {
#pragma unroll
                    for (int i = 0; i < 4; ++i) elem(i, j, lbh, lbl, false);
                }
            }
            dt_acc += (double)dt_tile;
            loss_acc += (double)loss_tile;
            gs_acc += (double)gs_tile;
        }
        if constexpr (MODE == 3) __syncthreads();  // Gs read by all before stage 1 replaces it
        init(first);
        St cur = first;
        for (int s = 0; s < n_stages; ++s) {
            const St nx = next(cur);
            if (s + 1 < n_stages) {
                issue(nx, (s + 1) & 1, c0);
                cp_async_wait<1>();
            } else {
                cp_async_wait<0>();
            }
            __syncthreads();  // stage s (and, at s = 0, s * G) visible to every thread
            const int pass = cur.pass, h = cur.h;
            const Feat(*F)[LD] = Fs[s & 1];
            // The panel's tile h / H, whose rows are the dB job's contraction (its columns of
            // G are the job's rows).
            const float(*Gp)[GLD] = reinterpret_cast<const float(*)[GLD]>(
                &Gs[0][PT == 1 ? 0 : TN * (h / H)]);
            const int hp = PT == 1 ? h : h % H;  // the part of that tile's job
            if constexpr (MODE == 0) {
                if (pass == 0)
                    product_fma<false, SR, GLD>(Gs, F, h * SR, tx, ty, c);
                else
                    product_fma<true, SR, GLD>(Gp, F, hp * SR, tx, ty, c);
            } else if constexpr (MODE == 3) {
                if (pass == 0)
                    product_bf16<false, SR>(Gh, F, h * SR, wm, wn, lane, c);
                else
                    // (the panel's tile h / H: its columns of Gh are the job's rows)
                    product_bf16<true, SR>(Gh, F, (PT == 1 ? h : h % H) * SR,
                                           wm + (PT == 1 ? 0 : TN * (h / H)), wn, lane, c);
            } else {
                if (pass == 0)
                    product_tc<MODE == 1, false, SR, GLD>(Gs, F, h * SR, wm, wn, wg, wq, c);
                else
                    product_tc<MODE == 1, true, SR, GLD>(Gp, F, hp * SR, wm, wn, wg, wq, c);
            }
            if (PT == 1 ? h == H - 1 : pass == 0 ? h == HP - 1 : h % H == H - 1) {
                // The job ends: its accumulators go out, and the next job's come in while the
                // next stage is waited for.
                const Out o = out(cur, c0);
                const bool store = pass == 0 && !dA_atomic;
                if (vec2 && store)
                    job_elems<MODE, NACC, 2>(o.p, o.rows, o.cols, d, o.interior,
                                             [&](int i, int e, float* q) {
                                                 *reinterpret_cast<float2*>(q) =
                                                     make_float2(c[i][e], c[i][e + 1]);
                                             });
                else if (vec2)
                    job_elems<MODE, NACC, 2>(
                        o.p, o.rows, o.cols, d, o.interior,
                        [&](int i, int e, float* q) { red_add2(q, c[i][e], c[i][e + 1]); });
                else if (store)
                    job_elems<MODE, NACC, 1>(o.p, o.rows, o.cols, d, o.interior,
                                             [&](int i, int e, float* q) { *q = c[i][e]; });
                else
                    job_elems<MODE, NACC, 1>(
                        o.p, o.rows, o.cols, d, o.interior,
                        [&](int i, int e, float* q) { atomicAdd(q, c[i][e]); });
                if (s + 1 < n_stages) init(nx);
            }
            __syncthreads();  // every read of this stage's buffer done before it is refilled
            cur = nx;
        }
    }
    if (dt_part != nullptr) {
        constexpr int NV = SIG ? 3 : 1;  // values per block
        const double vals[3] = {dt_acc, loss_acc, gs_acc};
        const i64 at = (blockIdx.x + (BR + TM - 1) / TM * split) * NV;
#pragma unroll
        for (int v = 0; v < NV; ++v) {
            red[t] = vals[v];
            __syncthreads();
            for (int s = NT / 2; s > 0; s >>= 1) {
                if (t < s) red[t] += red[t + s];
                __syncthreads();
            }
            if (t == 0) dt_part[at + v] = red[0];
            __syncthreads();  // red[0] read before the next value's sums
        }
    }
}

#define CLIP_BWD_HEAD(F) const F *__restrict__ A, const F *__restrict__ Bm, i64 BR, i64 BC, i64 d
#define CLIP_BWD_TAIL                                                                          \
    float scale, float inv2b, const float *__restrict__ la_hi, const float *__restrict__ la_lo, \
        const float *__restrict__ lb_hi, const float *__restrict__ lb_lo, i64 diag,              \
        float *__restrict__ dA, float *__restrict__ dB, double *__restrict__ dt_part,          \
        float *__restrict__ parts
#define CLIP_BWD_PASS scale, inv2b, la_hi, la_lo, lb_hi, lb_lo, diag, dA, dB, dt_part, parts

// fp32 FMA / 3xTF32 / TF32 / BF16 tensor-core versions of the backward. clip_bwd_bf16 takes the
// padded bf16 copies of clip_to_bf16 and, after d, their row stride ld.
extern "C" __global__ void __launch_bounds__(NT, CLIP_BWD_MIN_BLOCKS)
    clip_bwd(CLIP_BWD_HEAD(float), CLIP_BWD_TAIL) {
    clip_bwd_impl<0>(A, Bm, BR, BC, d, d, CLIP_BWD_PASS);
}
extern "C" __global__ void __launch_bounds__(NT, CLIP_BWD_MIN_BLOCKS)
    clip_bwd_tf32x3(CLIP_BWD_HEAD(float), CLIP_BWD_TAIL) {
    clip_bwd_impl<1>(A, Bm, BR, BC, d, d, CLIP_BWD_PASS);
}
extern "C" __global__ void __launch_bounds__(NT, CLIP_BWD_MIN_BLOCKS)
    clip_bwd_tf32(CLIP_BWD_HEAD(float), CLIP_BWD_TAIL) {
    clip_bwd_impl<2>(A, Bm, BR, BC, d, d, CLIP_BWD_PASS);
}
extern "C" __global__ void __launch_bounds__(NT, CLIP_BWD_MIN_BLOCKS)
    clip_bwd_bf16(CLIP_BWD_HEAD(unsigned short), i64 ld, CLIP_BWD_TAIL) {
    clip_bwd_impl<3>(A, Bm, BR, BC, d, ld, CLIP_BWD_PASS);
}

// Deterministic mode's two backward passes in one launch: grid (max(ceil(BR/64), ceil(BC/64)), 2,
// S). Blocks with blockIdx.y = 0 run the pass (A, Bm) -> dA (and dt_part), those with 1 the
// swapped pass (Bm, A) -> dB (row and column LSEs exchanged, the diagonal offset negated);
// blocks past their pass's row tiles return at once. Every element of dA and dB (and of each
// split's share) is still written by one block, as with two launches of clip_bwd (bitwise the
// same), but the two passes' blocks fill the GPU together (at B = 4k a pass alone has 64
// blocks). dB is not an atomic target here. With S > 1 column splits, the first pass's shares
// are parts[0 .. (S - 1) BR d) and the swapped pass's the (S - 1) BC d floats after them.
template <int MODE, bool SIG = false>
__device__ __forceinline__ void clip_bwd_pair_impl(
    const typename Tiles<MODE>::Feat* __restrict__ A,
    const typename Tiles<MODE>::Feat* __restrict__ Bm, i64 BR, i64 BC, i64 d, i64 ld,
    float scale, float inv2b, const float* __restrict__ la_hi, const float* __restrict__ la_lo,
    const float* __restrict__ lb_hi, const float* __restrict__ lb_lo, i64 diag,
    float* __restrict__ dA, float* __restrict__ dB, double* __restrict__ dt_part,
    float* __restrict__ parts, float bias = 0.0f) {
    const bool sw = blockIdx.y == 1;
    if ((i64)blockIdx.x * TM >= (sw ? BC : BR)) return;
    const i64 dg = (sw && diag != NO_DIAG) ? -diag : diag;
    // One call site, so that the shared memory of clip_bwd_impl exists once.
    clip_bwd_impl<MODE, SIG>(sw ? Bm : A, sw ? A : Bm, sw ? BC : BR, sw ? BR : BC, d, ld, scale,
                             inv2b, sw ? lb_hi : la_hi, sw ? lb_lo : la_lo, sw ? la_hi : lb_hi,
                             sw ? la_lo : lb_lo, dg, sw ? dB : dA, nullptr,
                             sw ? nullptr : dt_part,
                             sw ? parts + (i64)(gridDim.z - 1) * BR * d : parts, bias);
}

// The paired versions of clip_bwd* (same parameters; dB receives the swapped pass's dA).
extern "C" __global__ void __launch_bounds__(NT, CLIP_BWD_MIN_BLOCKS)
    clip_bwd_pair(CLIP_BWD_HEAD(float), CLIP_BWD_TAIL) {
    clip_bwd_pair_impl<0>(A, Bm, BR, BC, d, d, CLIP_BWD_PASS);
}
extern "C" __global__ void __launch_bounds__(NT, CLIP_BWD_MIN_BLOCKS)
    clip_bwd_pair_tf32x3(CLIP_BWD_HEAD(float), CLIP_BWD_TAIL) {
    clip_bwd_pair_impl<1>(A, Bm, BR, BC, d, d, CLIP_BWD_PASS);
}
extern "C" __global__ void __launch_bounds__(NT, CLIP_BWD_MIN_BLOCKS)
    clip_bwd_pair_tf32(CLIP_BWD_HEAD(float), CLIP_BWD_TAIL) {
    clip_bwd_pair_impl<2>(A, Bm, BR, BC, d, d, CLIP_BWD_PASS);
}
extern "C" __global__ void __launch_bounds__(NT, CLIP_BWD_MIN_BLOCKS)
    clip_bwd_pair_bf16(CLIP_BWD_HEAD(unsigned short), i64 ld, CLIP_BWD_TAIL) {
    clip_bwd_pair_impl<3>(A, Bm, BR, BC, d, ld, CLIP_BWD_PASS);
}

// The pairwise sigmoid (SigLIP) versions of clip_bwd* and clip_bwd_pair* (SIG in clip_bwd_impl):
// one pass computes the loss and both gradients, as the loss has no normalisation over a row or
// a column. Parameters as clip_bwd* without the LSEs, with the bias after the scale; inv_b = 1/B;
// sums: three values per block (clip_bwd_impl), written by the first pass's blocks only.
#define SIGLIP_BWD_TAIL                                                                    \
    float scale, float bias, float inv_b, i64 diag, float *__restrict__ dA,               \
        float *__restrict__ dB, double *__restrict__ sums, float *__restrict__ parts
#define SIGLIP_BWD_PASS \
    scale, inv_b, nullptr, nullptr, nullptr, nullptr, diag, dA, dB, sums, parts, bias

extern "C" __global__ void __launch_bounds__(NT, CLIP_BWD_MIN_BLOCKS)
    siglip_bwd(CLIP_BWD_HEAD(float), SIGLIP_BWD_TAIL) {
    clip_bwd_impl<0, true>(A, Bm, BR, BC, d, d, SIGLIP_BWD_PASS);
}
extern "C" __global__ void __launch_bounds__(NT, CLIP_BWD_MIN_BLOCKS)
    siglip_bwd_tf32x3(CLIP_BWD_HEAD(float), SIGLIP_BWD_TAIL) {
    clip_bwd_impl<1, true>(A, Bm, BR, BC, d, d, SIGLIP_BWD_PASS);
}
extern "C" __global__ void __launch_bounds__(NT, CLIP_BWD_MIN_BLOCKS)
    siglip_bwd_tf32(CLIP_BWD_HEAD(float), SIGLIP_BWD_TAIL) {
    clip_bwd_impl<2, true>(A, Bm, BR, BC, d, d, SIGLIP_BWD_PASS);
}
extern "C" __global__ void __launch_bounds__(NT, CLIP_BWD_MIN_BLOCKS)
    siglip_bwd_bf16(CLIP_BWD_HEAD(unsigned short), i64 ld, SIGLIP_BWD_TAIL) {
    clip_bwd_impl<3, true>(A, Bm, BR, BC, d, ld, SIGLIP_BWD_PASS);
}
extern "C" __global__ void __launch_bounds__(NT, CLIP_BWD_MIN_BLOCKS)
    siglip_bwd_pair(CLIP_BWD_HEAD(float), SIGLIP_BWD_TAIL) {
    clip_bwd_pair_impl<0, true>(A, Bm, BR, BC, d, d, SIGLIP_BWD_PASS);
}
extern "C" __global__ void __launch_bounds__(NT, CLIP_BWD_MIN_BLOCKS)
    siglip_bwd_pair_tf32x3(CLIP_BWD_HEAD(float), SIGLIP_BWD_TAIL) {
    clip_bwd_pair_impl<1, true>(A, Bm, BR, BC, d, d, SIGLIP_BWD_PASS);
}
extern "C" __global__ void __launch_bounds__(NT, CLIP_BWD_MIN_BLOCKS)
    siglip_bwd_pair_tf32(CLIP_BWD_HEAD(float), SIGLIP_BWD_TAIL) {
    clip_bwd_pair_impl<2, true>(A, Bm, BR, BC, d, d, SIGLIP_BWD_PASS);
}
extern "C" __global__ void __launch_bounds__(NT, CLIP_BWD_MIN_BLOCKS)
    siglip_bwd_pair_bf16(CLIP_BWD_HEAD(unsigned short), i64 ld, SIGLIP_BWD_TAIL) {
    clip_bwd_pair_impl<3, true>(A, Bm, BR, BC, d, ld, SIGLIP_BWD_PASS);
}
