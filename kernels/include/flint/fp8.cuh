// FP8 (E4M3) kernels: per-row dynamic quantization (activations per token, weights per output
// channel), RMSNorm and SwiGLU fused with it, and a small-batch GEMV on FP8 tensor cores.
// Codes and scales as in e4m3.cuh.
#pragma once

#include "e4m3.cuh"

namespace flint {

// out[r] = codes of x[r] / scale[r], scale[r] = amax(x[r]) / 448. One block per row; cols % 8 == 0.
__device__ __forceinline__ void quantize_row(const bf16* x, uint8_t* out, float* scales, int cols) {
    __shared__ float scratch[32];
    const size_t row = (size_t)blockIdx.x * cols;
    const Bf16x8* src = reinterpret_cast<const Bf16x8*>(x + row);
    float m = 0.f;
    for (int i = threadIdx.x; i < cols / 8; i += blockDim.x) {
        float v[8];
        unpack(src[i], v);
#pragma unroll
        for (int j = 0; j < 8; ++j) m = fmaxf(m, fabsf(v[j]));
    }
    const float scale = fp8_scale(block_max(m, scratch));
    for (int i = threadIdx.x; i < cols / 8; i += blockDim.x) {
        float v[8];
        unpack(src[i], v);
        store_e4m3x8(out + row + i * 8, v, scale);
    }
    if (threadIdx.x == 0) scales[blockIdx.x] = scale;
}

// v = res (+= add, rounded to bf16 and stored, where add is not null); ss += the squares of v.
__device__ __forceinline__ void residual_sum8(Bf16x8& res, const Bf16x8* add, float (&v)[8], float& ss) {
    if (add != nullptr) {
        float a[8];
        unpack(*add, a);
        residual_add8(res, a, v, ss);
    } else {
        unpack(res, v);
#pragma unroll
        for (int j = 0; j < 8; ++j) ss += v[j] * v[j];
    }
}

// add_rms_norm_row (elementwise.cuh) with an FP8 output: residual[t] += add[t] (bf16), then the
// normalised row, rounded to bf16 as the BF16 model has it, is quantized with its own scale.
__device__ __forceinline__ void add_rms_norm_fp8_row(bf16* residual, const bf16* add, const float* weight,
                                                     uint8_t* out, float* scales, int hidden, float eps) {
    __shared__ float scratch[32];
    const size_t row = (size_t)blockIdx.x * hidden;
    Bf16x8* res = reinterpret_cast<Bf16x8*>(residual + row);
    const Bf16x8* addv = reinterpret_cast<const Bf16x8*>(add + row);
    float ss = 0.f;
    for (int i = threadIdx.x; i < hidden / 8; i += blockDim.x) {
        float v[8];
        residual_sum8(res[i], add != nullptr ? &addv[i] : nullptr, v, ss);
    }
    const float r = rsqrtf(block_sum(ss, scratch) / hidden + eps);
    // The bf16 model's normed activation, before quantization.
    auto normed = [&](int i, float (&v)[8]) {
        unpack(res[i], v);
        rms_scale8(v, weight + i * 8, r);
#pragma unroll
        for (int j = 0; j < 8; ++j) v[j] = __bfloat162float(__float2bfloat16(v[j]));
    };
    float m = 0.f;
    for (int i = threadIdx.x; i < hidden / 8; i += blockDim.x) {
        float v[8];
        normed(i, v);
#pragma unroll
        for (int j = 0; j < 8; ++j) m = fmaxf(m, fabsf(v[j]));
    }
    __syncthreads();  // scratch reuse
    const float scale = fp8_scale(block_max(m, scratch));
    for (int i = threadIdx.x; i < hidden / 8; i += blockDim.x) {
        float v[8];
        normed(i, v);
        store_e4m3x8(out + row + i * 8, v, scale);
    }
    if (threadIdx.x == 0) scales[blockIdx.x] = scale;
}

// Threads that share a row in the add + RMSNorm + quantize kernels (the launch's block size).
// The fused tail of an FP8 GEMV (norm_tail) splits the row as this many threads would, whatever
// its block size, so that its sums and codes are the kernel's bit for bit.
constexpr int kNormThreads = 256;

// The norm weights of thread `tid`'s vectors tid + c kNormThreads (c < C) of a row of nv vectors.
template <int C>
__device__ __forceinline__ void load_norm_weights(float (&w)[C][8], const float* weight, int nv, int tid) {
#pragma unroll
    for (int c = 0; c < C; ++c) {
        const int i = tid + c * kNormThreads;
        if (tid < kNormThreads && i < nv) {
#pragma unroll
            for (int j = 0; j < 8; ++j) w[c][j] = weight[i * 8 + j];
        }
    }
}

// Sum and max over the kNormThreads threads of row group `grp` (threads grp kNormThreads ..
// (grp + 1) kNormThreads - 1 of the block, blockDim.x a multiple of kNormThreads): the group's
// warp partials sit in lanes 0..7 of the final warp reduction and zeros in the others, as in
// block_sum / block_max of a kNormThreads block, so the results are theirs bit for bit. Every
// thread of the block calls them together (they synchronise the block); scratch holds a float per
// warp of the block.
constexpr int kNormWarps = kNormThreads / 32;
template <bool MAX>
__device__ __forceinline__ float group_reduce(float v, float* scratch, int grp) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const auto reduce = [](float x) { return MAX ? warp_max(x) : warp_sum(x); };
    v = reduce(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    return reduce(lane < kNormWarps ? scratch[grp * kNormWarps + lane] : (MAX ? -INFINITY : 0.f));
}
__device__ __forceinline__ float group_sum(float v, float* scratch, int grp) { return group_reduce<false>(v, scratch, grp); }
__device__ __forceinline__ float group_max(float v, float* scratch, int grp) { return group_reduce<true>(v, scratch, grp); }

// add_rms_norm_fp8_row with the row in registers, C vectors of 8 per thread (hidden <= 8 C
// kNormThreads), for row `row`, by row group `grp` of the block (blockDim.x a multiple of
// kNormThreads): its thread tid takes vectors tid + c kNormThreads. The groups of a block run
// together, each on its own row; a group with `active` false has no row and only joins the
// block's synchronisations. The row is held as bf16 (every value it keeps is a bf16 value), four
// registers a vector. weights8(c, i): the norm weights of vector i (the thread's c-th), read
// after the sum of squares. CG: the added row is read through L2 (written by other blocks of
// this grid). The same arithmetic as the three-pass row kernel, so the same codes and scales.
template <int C, bool CG, class Weights>
__device__ __forceinline__ void add_rms_norm_fp8_regs(Weights weights8, bf16* residual, const bf16* add, uint8_t* out,
                                                      float* scales, int row, int grp, bool active, int hidden,
                                                      float eps, float* scratch) {
    const int nv = active ? hidden / 8 : 0, tid = threadIdx.x - grp * kNormThreads;
    const size_t at = (size_t)row * hidden;
    Bf16x8* res = reinterpret_cast<Bf16x8*>(residual + at);
    const Bf16x8* addv = reinterpret_cast<const Bf16x8*>(add + at);
    Bf16x8 kept[C];
    float ss = 0.f;
#pragma unroll
    for (int c = 0; c < C; ++c) {
        const int i = tid + c * kNormThreads;
        if (tid >= kNormThreads || i >= nv) continue;
        float v[8];
        if (add == nullptr) {
            residual_sum8(res[i], nullptr, v, ss);
        } else if constexpr (CG) {
            const uint4 raw = __ldcg(reinterpret_cast<const uint4*>(addv + i));
            residual_sum8(res[i], reinterpret_cast<const Bf16x8*>(&raw), v, ss);
        } else {
            residual_sum8(res[i], &addv[i], v, ss);
        }
        kept[c] = pack(v);
    }
    const float r = rsqrtf(group_sum(ss, scratch, grp) / hidden + eps);
    float m = 0.f;
#pragma unroll
    for (int c = 0; c < C; ++c) {
        const int i = tid + c * kNormThreads;
        if (tid >= kNormThreads || i >= nv) continue;
        float v[8];
        unpack(kept[c], v);
        rms_scale8(v, weights8(c, i), r);
        kept[c] = pack(v);  // the bf16 rounding of the normed row
        unpack(kept[c], v);
#pragma unroll
        for (int j = 0; j < 8; ++j) m = fmaxf(m, fabsf(v[j]));
    }
    __syncthreads();  // scratch reuse
    const float scale = fp8_scale(group_max(m, scratch, grp));
#pragma unroll
    for (int c = 0; c < C; ++c) {
        const int i = tid + c * kNormThreads;
        if (tid >= kNormThreads || i >= nv) continue;
        float v[8];
        unpack(kept[c], v);
        store_e4m3x8(out + at + i * 8, v, scale);
    }
    if (active && tid == 0) scales[row] = scale;
}

// The kernel form of add_rms_norm_fp8_regs, one block of kNormThreads per row: with early launch
// the norm weights are loaded (into registers) before the wait, and each input is read once.
template <int C>
__device__ __forceinline__ void add_rms_norm_fp8_cached(bf16* residual, const bf16* add, const float* weight,
                                                        uint8_t* out, float* scales, int hidden, float eps) {
    __shared__ float scratch[32];
    float w[C][8];
    const bool early = flint_early_launch != 0;
    if (early) {
        pdl_launch_next();
        load_norm_weights<C>(w, weight, hidden / 8, threadIdx.x);
    }
    pdl_wait();
    if (!early) load_norm_weights<C>(w, weight, hidden / 8, threadIdx.x);
    const auto weights8 = [&](int c, int) -> const float* { return w[c]; };
    add_rms_norm_fp8_regs<C, false>(weights8, residual, add, out, scales, blockIdx.x, 0, true, hidden, eps, scratch);
}

// The add + RMSNorm + quantize that an FP8 GEMV of the decode chain (O, down) runs on its own
// output once every block has written it (residual += y, then the next layer's normed codes).
// counter: a u32, zero before the launch and again after it.
struct Fp8NormTail {
    bf16* residual;
    const float* weight;
    uint8_t* codes;
    float* scales;
    unsigned* counter;
    float eps;
};

// Largest row the tail takes (in registers, four vectors per thread).
constexpr int kNormTailMaxHidden = 32 * kNormThreads;
// Most tokens of a tail (the rows run one after another in one block).
constexpr int kNormTailMaxM = 2;

// Called by every thread of every block after its writes of y [m, hidden]: the last block to
// arrive normalises the m rows with add_rms_norm_fp8_regs, as many side by side as it has groups
// of kNormThreads threads (two rows at once in a 512-thread block).
__device__ __forceinline__ void norm_tail(const Fp8NormTail& tail, const bf16* y, int m, int hidden) {
    __shared__ float scratch[32];
    __shared__ bool last;
    __threadfence();  // this thread's y, before the block counts itself in
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(tail.counter, 1u) == gridDim.x - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();  // every block's y, before reading it
    // The norm weights are read after each row's sum of squares; ask them into L1 now.
    const int nv = hidden / 8;
    for (int i = threadIdx.x; i < nv; i += blockDim.x) prefetch_l1(tail.weight + i * 8);
    const auto weights8 = [&](int, int i) { return tail.weight + i * 8; };
    // A row per group of kNormThreads threads, the groups side by side.
    const int groups = blockDim.x / kNormThreads, grp = threadIdx.x / kNormThreads;
    for (int r0 = 0; r0 < m; r0 += groups)
        add_rms_norm_fp8_regs<4, true>(weights8, tail.residual, y, tail.codes, tail.scales, r0 + grp, grp,
                                       r0 + grp < m, hidden, tail.eps, scratch);
    if (threadIdx.x == 0) *tail.counter = 0;  // ready for the next launch
}

// The add + RMSNorm + quantize between two FP8 GEMVs of the decode chain, split over both
// instead of run by the first one's last block (norm_tail): no block waits for another.
// The producer (output kOutSplitNorm, a plain-epilogue GEMV) adds its output into y, the
// residual (y += bf16(x W^T), as add_rms_norm_fp8 adds), and the part-0 warp of each tile leaves,
// per token, the tile's sum of squares of the new residual and its max of |residual * weight| in
// partials[token * n_parts + tile] (n_parts: its tiles). The consumer (input kInNormed) reads the
// residual as its bf16 input: each block sums the partials in a fixed order (the same bits every
// run), r = rsqrt(sum / k + eps), and its warps quantize bf16(weight * bf16(residual * r)), the
// bf16 model's normed value, with the scale fp8_scale(r * max). That scale is not the norm
// kernel's: the sum's order differs, and the bf16 roundings can put a normed value up to 2^-7
// above r * max, where it saturates at 448, an error below E4M3's step of 32 there.
struct Fp8SplitNorm {
    const float* weight;  // the norm's weights [hidden]
    float2* partials;     // [m, n_parts]: sum of squares, max |residual * weight|
    int n_parts;
    float eps;
};

// The input of an FP8 GEMV: E4M3 codes with a scale per token; a bf16 activation with its
// producer's amax slots (e4m3.cuh); the residual whose RMSNorm a kOutSplitNorm GEMV began.
constexpr int kInCodes = 0, kInBf16 = 1, kInNormed = 2;
// What an FP8 GEMV of plain epilogue does after its output: nothing more; the norm tail in its
// last block; the split norm's first half.
constexpr int kOutPlain = 0, kOutNormTail = 1, kOutSplitNorm = 2;

// SwiGLU on a fused gate/up row ([2 ff]: gate then up), quantized: out[t] = codes of
// bf16(silu(gate) * up) / scale[t]. One block per token.
__device__ __forceinline__ void silu_mul_fp8_row(const bf16* gate_up, uint8_t* out, float* scales, int ff) {
    __shared__ float scratch[32];
    const size_t t = blockIdx.x;
    const Bf16x8* g = reinterpret_cast<const Bf16x8*>(gate_up + t * 2 * ff);
    const Bf16x8* u = reinterpret_cast<const Bf16x8*>(gate_up + t * 2 * ff + ff);
    auto act = [&](int i, float (&o)[8]) {
        float gv[8], uv[8];
        unpack(g[i], gv);
        unpack(u[i], uv);
#pragma unroll
        for (int j = 0; j < 8; ++j) o[j] = __bfloat162float(__float2bfloat16(gv[j] / (1.f + __expf(-gv[j])) * uv[j]));
    };
    float m = 0.f;
    for (int i = threadIdx.x; i < ff / 8; i += blockDim.x) {
        float v[8];
        act(i, v);
#pragma unroll
        for (int j = 0; j < 8; ++j) m = fmaxf(m, fabsf(v[j]));
    }
    const float scale = fp8_scale(block_max(m, scratch));
    for (int i = threadIdx.x; i < ff / 8; i += blockDim.x) {
        float v[8];
        act(i, v);
        store_e4m3x8(out + t * ff + i * 8, v, scale);
    }
    if (threadIdx.x == 0) scales[t] = scale;
}

// ---- FP8 GEMV on tensor cores --------------------------------------------------------------
//
// y[m, row] = (sum_k codes_x[m, k] * codes_w[row, k]) * x_scale[m] * w_scale[row], m < 8.
// One warp computes a 16-row tile for all m with mma.m16n8k32 (rows as the MMA's M, tokens as
// its N). Lane (g, t) = (lane / 4, lane % 4) loads 16 contiguous bytes of weight rows A(g) and
// B(g) and of token g's activation at k = base + 16 t; its first 8 bytes feed one MMA and its
// last 8 the next, as k positions {4t..4t+3, 16+4t..16+4t+3} of each. The reduction order does
// not matter, so this permutation of k (the same for weights and activations) is free and every
// load is 16 bytes. Tile rows: A(g) = 16 tile + g, B(g) = A(g) + 8; for SwiGLU, gate row 8 tile + g
// and its up row n + 8 tile + g, so one lane holds both halves of an output.

constexpr int kF8Warps = 8;  // per block at least; kF8Warps / S tiles per block when S <= 8
constexpr int kF8MaxM = 8;   // tokens: the MMA's N

// Warps per block of the variant with S warps per tile: 8 (several tiles per block) or S (one).
__host__ __device__ constexpr int f8_block_warps(int s) { return s > kF8Warps ? s : kF8Warps; }
// Blocks an SM should hold (the register budget of __launch_bounds__): three of 8 warps, two of 16
// (so that a grid of 256 one-tile blocks, the O and down projections, is resident at once), one
// of 32.
__host__ __device__ constexpr int f8_min_blocks(int s) { return f8_block_warps(s) >= 32 ? 1 : f8_block_warps(s) >= 16 ? 2 : 3; }

__device__ __forceinline__ uint4 load_stream16(const uint8_t* p) {
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(p));
    return r;
}

__device__ __forceinline__ void mma_e4m3(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Both MMAs of one 64-element step: wa, wb the two rows' 16 bytes, x the token's.
__device__ __forceinline__ void mma_step(float (&c)[4], const uint4& wa, const uint4& wb, const uint4& x) {
    mma_e4m3(c, wa.x, wb.x, wa.y, wb.y, x.x, x.y);
    mma_e4m3(c, wa.z, wb.z, wa.w, wb.w, x.z, x.w);
}

enum class Fp8Epilogue : int {
    Bf16 = 0,
    SwiGlu = 1,  // W is [gate; up] (2n rows); y[m, j] = silu(gate_j) * up_j, bf16 [m, n]
};

// Loads of one chunk (U 64-element steps) of both weight rows.
template <int U>
__device__ __forceinline__ void load_chunk(uint4 (&va)[U], uint4 (&vb)[U], const uint8_t* wa, const uint8_t* wb,
                                           int base) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
        va[u] = load_stream16(wa + base + 64 * u);
        vb[u] = load_stream16(wb + base + 64 * u);
    }
}

// Q (a GEMV that quantizes its bf16 input): at most kF8QMaxM tokens. Converting in every warp
// costs a few instructions per token and step, which past two tokens outweigh the quantization
// kernel it saves (H200, Llama-3.1-8B: 1.02x faster at one token, 0.85x at eight).
constexpr int kF8QMaxM = 2;

// Q: the bf16 pairs of tokens < m at k = base + 64 v + 2 lane (v < V) that lane converts, so the
// whole warp shares the work whatever m is.
template <int V>
__device__ __forceinline__ void load_x_pairs(uint32_t (&pair)[kF8QMaxM][V], const bf16* __restrict__ x, int k,
                                             int m, int base, int lane) {
#pragma unroll
    for (int j = 0; j < kF8QMaxM; ++j)
#pragma unroll
        for (int v = 0; v < V; ++v)
            pair[j][v] = j < m ? *reinterpret_cast<const uint32_t*>(x + (size_t)j * k + base + 64 * v + 2 * lane) : 0u;
}

// kInNormed: the norm weights of those pairs.
template <int V>
__device__ __forceinline__ void load_w_pairs(float2 (&w)[V], const float* __restrict__ weight, int base, int lane) {
#pragma unroll
    for (int v = 0; v < V; ++v) w[v] = __ldg(reinterpret_cast<const float2*>(weight + base + 64 * v + 2 * lane));
}

// Q: those pairs as codes of value / scale (rcp[j] = 1 / scale[j]) into the warp's shared buffer,
// a row of ROW bytes per token. N (kInNormed): the value is first normalised as the bf16 model
// has it, bf16(weight * bf16(value * r[j])), with w[v] the weights of pair v.
template <int V, int ROW, bool N>
__device__ __forceinline__ void store_x_codes(uint8_t* buf, const uint32_t (&pair)[kF8QMaxM][V], int m, int lane,
                                              const float (&scale)[kF8QMaxM], const float (&rcp)[kF8QMaxM],
                                              const float (&r)[kF8QMaxM], const float2* w) {
#pragma unroll
    for (int j = 0; j < kF8QMaxM; ++j) {
        if (j >= m) break;
#pragma unroll
        for (int v = 0; v < V; ++v) {
            float a = __uint_as_float(pair[j][v] << 16), b = __uint_as_float(pair[j][v] & 0xffff0000u);
            if constexpr (N) {
                a = round_bf16(w[v].x * round_bf16(a * r[j]));
                b = round_bf16(w[v].y * round_bf16(b * r[j]));
            }
            *reinterpret_cast<uint16_t*>(buf + j * ROW + 64 * v + 2 * lane) =
                to_e4m3x2(div_by_scale(a, scale[j], rcp[j]), div_by_scale(b, scale[j], rcp[j]));
        }
    }
}

// Bytes per token row of a warp's Q buffer: 64 per step, plus 64 when U is even, so that the
// 16-byte reads of one quarter-warp (tokens g, g + 1) fall on all 32 banks.
template <int U>
__host__ __device__ constexpr int f8_qrow() { return 64 * U + (U % 2 == 0 ? 64 : 0); }

// Grid: ceil(tiles / (W / S)) blocks of 32 * W threads, W = f8_block_warps(S); tiles = n / 16
// (plain) or n / 8 (SwiGLU). S warps share a tile, each taking every S-th chunk of U 64-element
// steps of K; with P, a warp loads its next chunk before it multiplies the current one (twice the
// loads in flight for twice the registers). k % 64 == 0, n % 16 == 0 (plain) or n % 8 == 0
// (SwiGLU), m <= 8 (m <= kF8QMaxM unless IN is kInCodes).
//
// Input (IN): kInCodes: x holds E4M3 codes [m, k] and x_aux their per-token scales. kInBf16: x is
// the bf16 activation [m, k] and x_aux its producer's amax slots [m, kAmaxSlots]; each warp
// quantizes the activation of its chunks itself (codes bit-identical to quantize_row's), so no
// quantization kernel runs between the producer and this GEMV. kInNormed: x is the residual
// [m, k] whose norm `split` describes (Fp8SplitNorm), normalised and quantized the same way.
// amax_out (SwiGLU, may be null): the output's amax per token is published there, for a Q GEMV
// next. amax_clear (may be null): [m, kAmaxSlots] that block 0 zeroes (the other activation's
// slots, whose reader has finished, for their producer's next use).
// OUT (plain epilogue): kOutNormTail runs `tail` after the output; kOutSplitNorm adds the output
// into y (the residual) and leaves the norm's partials of `split`.
template <int S, int U, bool P, int IN, int OUT>
__device__ __forceinline__ void gemv_fp8(const void* __restrict__ xv, const float* __restrict__ x_aux,
                                         const uint8_t* __restrict__ w, const float* __restrict__ w_scale, bf16* y,
                                         int m, int n, int k, Fp8Epilogue epilogue, float* amax_out,
                                         float* amax_clear, bool l2_prefetch, const Fp8NormTail& tail,
                                         const Fp8SplitNorm& split) {
    constexpr bool Q = IN != kInCodes;  // the warps quantize a bf16 input
    constexpr bool N = IN == kInNormed;
    constexpr int W = f8_block_warps(S);
    static_assert(W % S == 0, "S divides the block's warps");
    static_assert(W >= kF8QMaxM, "a warp per token sums the split norm's partials");
    constexpr int kTilesPerBlock = W / S;
    constexpr int kRow = f8_qrow<U>();
    __shared__ float partial[W][32][4];
    __shared__ __align__(16) uint8_t qbuf[Q ? W : 1][Q ? kF8QMaxM * kRow : 16];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const int tile = blockIdx.x * kTilesPerBlock + warp / S;
    const int part = warp % S;
    const bool swiglu = epilogue == Fp8Epilogue::SwiGlu;
    const int n_tiles = swiglu ? n / 8 : n / 16;
    const bool early = flint_early_launch != 0;
    if (!early) pdl_wait();
    // Before the wait (early launch): the block's weight rows into L2 where the budget reaches,
    // and (P) each warp's first chunk into registers, while the previous kernel finishes.
    const int first_tile = blockIdx.x * kTilesPerBlock;
    const int block_tiles = min(kTilesPerBlock, n_tiles - first_tile);
    if (block_tiles > 0 && prefetches_l2(l2_prefetch, blockIdx.x, (size_t)kTilesPerBlock * 16 * k) && lane == 0) {
        // Warp r asks for rows r, r + W, ... of the block's 16 per tile (SwiGLU: 8 gate rows
        // per tile, then their 8 up rows).
        for (int r = warp; r < 16 * block_tiles; r += W) {
            const int half = 8 * block_tiles;
            const size_t row = swiglu ? (r < half ? 8 * first_tile + r : n + 8 * first_tile + (r - half))
                                      : 16 * (size_t)first_tile + r;
            prefetch_l2(w + row * k, k);
        }
    }
    const bool real = tile < n_tiles;
    const int row_a = real ? (swiglu ? tile * 8 + g : tile * 16 + g) : 0;
    const int row_b = real ? (swiglu ? n + row_a : row_a + 8) : 0;
    const uint8_t* wa = w + (size_t)row_a * k + 16 * t;
    const uint8_t* wb = w + (size_t)row_b * k + 16 * t;
    constexpr int kChunk = 64 * U;
    const int full = k / kChunk;
    uint4 va[U], vb[U];
    if (P && real && part < full) load_chunk<U>(va, vb, wa, wb, part * kChunk);
    // kInNormed: the norm weights of the first chunk (constant over the step).
    float2 wp[N ? U : 1];
    if constexpr (N && P)
        if (real && part < full) load_w_pairs<U>(wp, split.weight, part * kChunk, lane);
    if (early) pdl_wait();
    if (amax_clear != nullptr && blockIdx.x == 0)
        for (int i = threadIdx.x; i < m * kAmaxSlots; i += blockDim.x) amax_clear[i] = 0.f;
    // kOutSplitNorm: the residual and norm weights of the rows this lane finishes (tokens 2t,
    // 2t + 1), read now so that the epilogue does not wait for them.
    // Kept in shared memory (registers would cost the variant occupancy): per tile of the block
    // and lane, the residual of rows A and B for both tokens, then their two norm weights.
    __shared__ float split_in[OUT == kOutSplitNorm ? kTilesPerBlock : 1][32][6];
    if constexpr (OUT == kOutSplitNorm) {
        if (part == 0 && real) {
            float* in = split_in[warp / S][lane];
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                const bool has = 2 * t + j < m;
                in[j] = has ? __bfloat162float(y[(size_t)(2 * t + j) * n + row_a]) : 0.f;
                in[2 + j] = has ? __bfloat162float(y[(size_t)(2 * t + j) * n + row_b]) : 0.f;
            }
            in[4] = split.weight[row_a];
            in[5] = split.weight[row_b];
        }
    }
    // Q: token g's scale in lane (g, t) (own_scale), and every token's in every lane (scale, its
    // reciprocal rcp and, N, the norm's r), for the conversion.
    float own_scale = 1.f;
    float scale[kF8QMaxM], rcp[kF8QMaxM], norm_r[kF8QMaxM];
    if constexpr (IN == kInBf16) {
        // From token g's eight slots 8t..8t+7 and the three other lanes'.
        float a = 0.f;
        if (g < m) {
            const float4* s = reinterpret_cast<const float4*>(x_aux + g * kAmaxSlots + 8 * t);
            const float4 lo = __ldcg(s), hi = __ldcg(s + 1);
            a = fmaxf(fmaxf(fmaxf(lo.x, lo.y), fmaxf(lo.z, lo.w)), fmaxf(fmaxf(hi.x, hi.y), fmaxf(hi.z, hi.w)));
        }
        a = fmaxf(a, __shfl_xor_sync(0xffffffffu, a, 1));
        a = fmaxf(a, __shfl_xor_sync(0xffffffffu, a, 2));
        own_scale = fp8_scale(a);
#pragma unroll
        for (int j = 0; j < kF8QMaxM; ++j) {
            scale[j] = __shfl_sync(0xffffffffu, own_scale, 4 * j);
            rcp[j] = 1.f / scale[j];
            norm_r[j] = 1.f;
        }
    } else if constexpr (N) {
        // Warp j sums token j's partials (lane-strided, then the butterfly: a fixed order).
        __shared__ float s_r[kF8QMaxM], s_scale[kF8QMaxM];
        if (warp < m) {
            const float2* p = split.partials + (size_t)warp * split.n_parts;
            float ss = 0.f, mx = 0.f;
            for (int i = lane; i < split.n_parts; i += 32) {
                const float2 v = __ldcg(p + i);
                ss += v.x;
                mx = fmaxf(mx, v.y);
            }
            ss = warp_sum(ss);
            mx = warp_max(mx);
            if (lane == 0) {
                const float r = rsqrtf(ss / k + split.eps);
                s_r[warp] = r;
                s_scale[warp] = fp8_scale(mx * r);
            }
        }
        __syncthreads();
#pragma unroll
        for (int j = 0; j < kF8QMaxM; ++j) {
            scale[j] = j < m ? s_scale[j] : 1.f;
            rcp[j] = 1.f / scale[j];
            norm_r[j] = j < m ? s_r[j] : 1.f;
        }
        own_scale = g < m ? s_scale[g] : 1.f;
    }
    uint8_t* qb = qbuf[Q ? warp : 0];
    float c[4] = {0.f, 0.f, 0.f, 0.f};
    if (real) {
        const uint8_t* xr = static_cast<const uint8_t*>(xv) + (size_t)g * k + 16 * t;
        const bf16* xb = static_cast<const bf16*>(xv);
        const bool has_x = g < m;
        // Q: the chunk's activation pairs, loaded (with P) one chunk ahead like the weights.
        uint32_t xp[Q ? kF8QMaxM : 1][Q ? U : 1];
        if constexpr (Q && P)
            if (part < full) load_x_pairs<U>(xp, xb, k, m, part * kChunk, lane);
        for (int ch = part; ch < full; ch += S) {
            const int base = ch * kChunk;
            uint4 na[U], nb[U];
            uint32_t np[Q ? kF8QMaxM : 1][Q ? U : 1];
            float2 nwp[N ? U : 1];
            if (P) {
                if (ch + S < full) {
                    load_chunk<U>(na, nb, wa, wb, base + S * kChunk);
                    if constexpr (Q) load_x_pairs<U>(np, xb, k, m, base + S * kChunk, lane);
                    if constexpr (N) load_w_pairs<U>(nwp, split.weight, base + S * kChunk, lane);
                }
            } else {
                load_chunk<U>(va, vb, wa, wb, base);
                if constexpr (Q) load_x_pairs<U>(xp, xb, k, m, base, lane);
                if constexpr (N) load_w_pairs<U>(wp, split.weight, base, lane);
            }
            uint4 vx[U];
            if constexpr (Q) {
                store_x_codes<U, kRow, N>(qb, xp, m, lane, scale, rcp, norm_r, wp);
                __syncwarp();
#pragma unroll
                for (int u = 0; u < U; ++u)
                    vx[u] = has_x ? *reinterpret_cast<const uint4*>(qb + g * kRow + 64 * u + 16 * t)
                                  : make_uint4(0, 0, 0, 0);
                __syncwarp();
            } else {
#pragma unroll
                for (int u = 0; u < U; ++u)
                    vx[u] = has_x ? *reinterpret_cast<const uint4*>(xr + base + 64 * u) : make_uint4(0, 0, 0, 0);
            }
#pragma unroll
            for (int u = 0; u < U; ++u) mma_step(c, va[u], vb[u], vx[u]);
            if (P) {
#pragma unroll
                for (int u = 0; u < U; ++u) {
                    va[u] = na[u];
                    vb[u] = nb[u];
                }
                if constexpr (Q)
#pragma unroll
                    for (int j = 0; j < kF8QMaxM; ++j)
#pragma unroll
                        for (int u = 0; u < U; ++u) xp[j][u] = np[j][u];
                if constexpr (N)
#pragma unroll
                    for (int u = 0; u < U; ++u) wp[u] = nwp[u];
            }
        }
        // 64-element steps past the last full chunk.
        for (int off = full * kChunk + 64 * part; off < k; off += 64 * S) {
            const uint4 a = load_stream16(wa + off), b = load_stream16(wb + off);
            uint4 xq;
            if constexpr (Q) {
                uint32_t tp[kF8QMaxM][1];
                float2 tw[1];
                load_x_pairs<1>(tp, xb, k, m, off, lane);
                if constexpr (N) load_w_pairs<1>(tw, split.weight, off, lane);
                store_x_codes<1, kRow, N>(qb, tp, m, lane, scale, rcp, norm_r, tw);
                __syncwarp();
                xq = has_x ? *reinterpret_cast<const uint4*>(qb + g * kRow + 16 * t) : make_uint4(0, 0, 0, 0);
                __syncwarp();
            } else {
                xq = has_x ? *reinterpret_cast<const uint4*>(xr + off) : make_uint4(0, 0, 0, 0);
            }
            mma_step(c, a, b, xq);
        }
    }
    pdl_launch_next();
#pragma unroll
    for (int i = 0; i < 4; ++i) partial[warp][lane][i] = c[i];
    __syncthreads();
    if (part == 0 && tile < n_tiles) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            float s = 0.f;
#pragma unroll
            for (int p = 0; p < S; ++p) s += partial[warp + p][lane][i];
            c[i] = s;
        }
        // c0, c1: row A, tokens 2t, 2t + 1; c2, c3: row B, the same tokens. (From here on the warp
        // is whole: part 0 of a real tile.)
        float xs[2];
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const int tok = 2 * t + j;
            if constexpr (Q)
                xs[j] = __shfl_sync(0xffffffffu, own_scale, 4 * tok);
            else
                xs[j] = tok < m ? x_aux[tok] : 0.f;
        }
        const float sa = w_scale[row_a], sb = w_scale[row_b];
        float amax[2] = {0.f, 0.f};
        float ss[2] = {0.f, 0.f};  // kOutSplitNorm: this lane's squares and max |residual * weight|
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const int tok = 2 * t + j;
            if (tok >= m) continue;
            const float va = c[j] * sa * xs[j], vb = c[2 + j] * sb * xs[j];
            if (swiglu) {
                const float gb = __bfloat162float(__float2bfloat16(va));
                const float ub = __bfloat162float(__float2bfloat16(vb));
                const bf16 o = __float2bfloat16(gb / (1.f + __expf(-gb)) * ub);
                y[(size_t)tok * n + row_a] = o;
                amax[j] = fmaxf(0.f, fabsf(__bfloat162float(o)));
            } else if constexpr (OUT == kOutSplitNorm) {
                // residual += bf16(y), rounded to bf16 (residual_add8).
                const float* in = split_in[warp / S][lane];
                const float ha = round_bf16(in[j] + round_bf16(va));
                const float hb = round_bf16(in[2 + j] + round_bf16(vb));
                y[(size_t)tok * n + row_a] = __float2bfloat16(ha);
                y[(size_t)tok * n + row_b] = __float2bfloat16(hb);
                ss[j] = ha * ha + hb * hb;
                amax[j] = fmaxf(fabsf(ha * in[4]), fabsf(hb * in[5]));
            } else {
                y[(size_t)tok * n + row_a] = __float2bfloat16(va);
                y[(size_t)tok * n + row_b] = __float2bfloat16(vb);
            }
        }
        if (swiglu && amax_out != nullptr) {
            // Max over the warp's eight rows (lanes of one t), then one atomic per token.
#pragma unroll
            for (int j = 0; j < 2; ++j)
#pragma unroll
                for (int o = 4; o < 32; o <<= 1) amax[j] = fmaxf(amax[j], __shfl_xor_sync(0xffffffffu, amax[j], o));
            if (g == 0)
#pragma unroll
                for (int j = 0; j < 2; ++j)
                    if (2 * t + j < m) amax_publish(amax_out, 2 * t + j, tile, amax[j]);
        }
        if constexpr (OUT == kOutSplitNorm) {
            // The tile's partials: over the warp's sixteen rows (lanes of one t), a fixed order.
#pragma unroll
            for (int j = 0; j < 2; ++j)
#pragma unroll
                for (int o = 4; o < 32; o <<= 1) {
                    ss[j] += __shfl_xor_sync(0xffffffffu, ss[j], o);
                    amax[j] = fmaxf(amax[j], __shfl_xor_sync(0xffffffffu, amax[j], o));
                }
            if (g == 0)
#pragma unroll
                for (int j = 0; j < 2; ++j)
                    if (2 * t + j < m) split.partials[(size_t)(2 * t + j) * split.n_parts + tile] = make_float2(ss[j], amax[j]);
        }
    }
    if constexpr (OUT == kOutNormTail) norm_tail(tail, y, m, n);
}

}  // namespace flint
