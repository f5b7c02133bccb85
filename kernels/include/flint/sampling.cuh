// Token sampling on the device, one block per row of logits: greedy (argmax, lowest index on
// ties), or temperature with top-k and top-p, seeded and reproducible.
//
// Top-k/top-p keep every token whose logit is at least a threshold. The threshold is found by
// bisection on the logit value (counts and probability mass above a candidate are block
// reductions), so no sort is needed; tokens tied at the threshold are all kept. The token is then
// drawn by inverse transform over the kept tokens in vocabulary order.
#pragma once

#include "common.cuh"

namespace flint {

struct SamplingParams {
    float temperature;  // <= 0: greedy
    int top_k;          // <= 0: off
    float top_p;        // >= 1: off
    int pad;
    uint64_t seed;      // combined with the step for this draw
};

constexpr int kSampleThreads = 1024;

__device__ __forceinline__ void argmax_pair(float& v, int& i, float ov, int oi) {
    if (ov > v || (ov == v && oi < i)) {
        v = ov;
        i = oi;
    }
}

// Grid n_rows, kSampleThreads threads. logits [n_rows, vocab] f32; out_tokens [n_rows].
__device__ __forceinline__ void sample_row(const float* logits, int vocab, const SamplingParams* params,
                                           const uint64_t* steps, uint32_t* out_tokens) {
    __shared__ float red_v[32];
    __shared__ int red_i[32];
    __shared__ float scratch[32];
    __shared__ float chunk_mass[kSampleThreads];
    const int row = blockIdx.x, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const float* x = logits + (size_t)row * vocab;
    const SamplingParams p = params[row];

    // Argmax (also the max for the softmax).
    float best = -INFINITY;
    int best_i = 0x7fffffff;
    for (int i = tid; i < vocab; i += blockDim.x) argmax_pair(best, best_i, x[i], i);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        argmax_pair(best, best_i, __shfl_xor_sync(0xffffffffu, best, o), __shfl_xor_sync(0xffffffffu, best_i, o));
    if (lane == 0) {
        red_v[warp] = best;
        red_i[warp] = best_i;
    }
    __syncthreads();
    if (warp == 0) {
        best = lane < (int)(blockDim.x >> 5) ? red_v[lane] : -INFINITY;
        best_i = lane < (int)(blockDim.x >> 5) ? red_i[lane] : 0x7fffffff;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1)
            argmax_pair(best, best_i, __shfl_xor_sync(0xffffffffu, best, o),
                        __shfl_xor_sync(0xffffffffu, best_i, o));
        if (lane == 0) {
            red_v[0] = best;
            red_i[0] = best_i;
        }
    }
    __syncthreads();
    const float max_logit = red_v[0];
    const int argmax = red_i[0];
    if (!(p.temperature > 0.f) || p.top_k == 1) {
        if (tid == 0) out_tokens[row] = (uint32_t)argmax;
        return;
    }
    const float inv_t = 1.4426950408889634f / p.temperature;
    // Total mass.
    float local = 0.f;
    for (int i = tid; i < vocab; i += blockDim.x) local += exp2f((x[i] - max_logit) * inv_t);
    const float total = block_sum(local, scratch);

    // Threshold by bisection: the largest logit value t such that the kept set {x >= t} has at
    // least top_k tokens (if set) and at least top_p of the mass (if set).
    float lo = -INFINITY, hi = max_logit;  // invariant: threshold hi is feasible... after the search
    const bool use_k = p.top_k > 0 && p.top_k < vocab;
    const bool use_p = p.top_p < 1.f;
    float threshold = -INFINITY;
    if (use_k || use_p) {
        // Lower end: the minimum logit.
        float mn = INFINITY;
        for (int i = tid; i < vocab; i += blockDim.x) mn = fminf(mn, x[i]);
        lo = -block_max(-mn, scratch);
        // Whether keeping every token with a logit >= t meets top-k and top-p (block-wide).
        auto keeps_enough = [&](float t) {
            float cnt = 0.f, mass = 0.f;
            for (int i = tid; i < vocab; i += blockDim.x) {
                if (x[i] >= t) {
                    cnt += 1.f;
                    mass += exp2f((x[i] - max_logit) * inv_t);
                }
            }
            cnt = block_sum(cnt, scratch);
            mass = block_sum(mass, scratch);
            return (!use_k || cnt >= (float)p.top_k) && (!use_p || mass >= p.top_p * total);
        };
        // Find the largest t in [lo, max] that keeps enough: bisect 40 times on the value.
        float a = lo, b = hi;  // a always feasible (keeps everything), b maybe not
        for (int it = 0; it < 40; ++it) {
            const float mid = 0.5f * (a + b);
            if (mid <= a || mid >= b) break;
            if (keeps_enough(mid)) a = mid; else b = mid;
        }
        // b may be feasible exactly at the max (a single token holding the mass).
        const bool b_ok = keeps_enough(b);
        threshold = b_ok ? b : a;
    }
    // Inverse transform over contiguous per-thread chunks of the vocabulary.
    const int per = (vocab + blockDim.x - 1) / blockDim.x;
    const int c0 = min(vocab, tid * per), c1 = min(vocab, c0 + per);
    float mine = 0.f;
    for (int i = c0; i < c1; ++i)
        if (x[i] >= threshold) mine += exp2f((x[i] - max_logit) * inv_t);
    chunk_mass[tid] = mine;
    __syncthreads();
    // Inclusive scan (Hillis-Steele) over the chunk masses.
    for (int o = 1; o < (int)blockDim.x; o <<= 1) {
        const float v = tid >= o ? chunk_mass[tid - o] : 0.f;
        __syncthreads();
        chunk_mass[tid] += v;
        __syncthreads();
    }
    const float kept = chunk_mass[blockDim.x - 1];
    const float u = uniform01(mix64(p.seed ^ mix64(steps[row] + 0x5851f42d4c957f2dull))) * kept;
    const float before = tid > 0 ? chunk_mass[tid - 1] : 0.f;
    __shared__ int chosen;
    if (tid == 0) chosen = argmax;
    __syncthreads();
    if (u >= before && u < chunk_mass[tid] && mine > 0.f) {
        float run = before;
        int pick = -1, last = -1;
        for (int i = c0; i < c1; ++i) {
            if (x[i] < threshold) continue;
            last = i;
            run += exp2f((x[i] - max_logit) * inv_t);
            if (u < run) {
                pick = i;
                break;
            }
        }
        chosen = pick >= 0 ? pick : last;
    }
    __syncthreads();
    if (tid == 0) out_tokens[row] = (uint32_t)chosen;
}

// ---- Top-k candidates ------------------------------------------------------------------------
//
// Each row's k most likely entries as (id + id_offset, logit) pairs, best first, ties to the
// lower id, NaN never taken, padded with (-1, NaN): what the host's `top_candidates` gives, so
// a step reads back 2k floats per row instead of the vocabulary. The k-th largest logit is found
// exactly by radix selection on order-preserving keys (four passes of 8 bits), the entries above
// it and the first of those equal to it (in id order) are compacted, and the k are sorted.

constexpr int kTopKThreads = 1024;
constexpr int kMaxTopK = 256;

// Larger float, larger key (-0 below +0, as total_cmp); 0 for NaN, which is never taken.
__device__ __forceinline__ uint32_t order_key(float v) {
    const uint32_t u = __float_as_uint(v);
    if (isnan(v)) return 0u;
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Exclusive prefix sum over the block (blockDim.x a multiple of 32, at most 1024); total out.
__device__ __forceinline__ int block_exclusive_scan(int v, int* scratch, int& total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    int incl = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int t = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += t;
    }
    __syncthreads();
    if (lane == 31) scratch[warp] = incl;
    __syncthreads();
    if (warp == 0) {
        int w = lane < n_warps ? scratch[lane] : 0;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const int t = __shfl_up_sync(0xffffffffu, w, o);
            if (lane >= o) w += t;
        }
        scratch[lane] = w;  // inclusive over warps
    }
    __syncthreads();
    total = scratch[n_warps - 1];
    return (warp > 0 ? scratch[warp - 1] : 0) + incl - v;
}

// Grid rows, kTopKThreads threads. Row r: logits + r * ld, width entries; out [rows, 2k];
// 1 <= k <= kMaxTopK.
__device__ __forceinline__ void top_candidates_row(const float* logits, int width, int ld, int id_offset, int k,
                                                   float* out) {
    __shared__ int hist[256];
    __shared__ int scratch[32];
    __shared__ uint32_t s_prefix;
    __shared__ int s_remaining;
    __shared__ uint32_t cand_key[kMaxTopK];
    __shared__ int cand_id[kMaxTopK];
    const float* x = logits + (size_t)blockIdx.x * ld;
    const int tid = threadIdx.x;

    int valid = 0;
    for (int i = tid; i < width; i += blockDim.x) valid += order_key(x[i]) != 0u;
    int total_valid;
    block_exclusive_scan(valid, scratch, total_valid);
    // The k-th largest key T (every valid entry when there are at most k), and how many entries
    // equal to T to take.
    uint32_t prefix = 0u, mask = 0u;
    int remaining = min(k, total_valid);
    if (total_valid > k) {
        for (int shift = 24; shift >= 0; shift -= 8) {
            for (int b = tid; b < 256; b += blockDim.x) hist[b] = 0;
            __syncthreads();
            for (int i = tid; i < width; i += blockDim.x) {
                const uint32_t key = order_key(x[i]);
                if (key != 0u && (key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1);
            }
            __syncthreads();
            if (tid == 0) {
                int above = 0, d = 255;
                for (; d > 0 && above + hist[d] < remaining; --d) above += hist[d];
                s_prefix = prefix | ((uint32_t)d << shift);
                s_remaining = remaining - above;
            }
            __syncthreads();
            prefix = s_prefix;
            remaining = s_remaining;
            mask |= 255u << shift;
        }
    } else {
        prefix = 1u;  // every valid key is >= 1: take them all
        remaining = 0;
    }
    // With T = prefix: entries with key > T all go in; of those equal to T, the first
    // `remaining` in id order (contiguous chunks per thread keep id order through the scan).
    const bool exact = total_valid > k;
    const int per = (width + blockDim.x - 1) / blockDim.x;
    const int c0 = min(width, tid * per), c1 = min(width, c0 + per);
    int gt = 0, eq = 0;
    for (int i = c0; i < c1; ++i) {
        const uint32_t key = order_key(x[i]);
        if (key == 0u) continue;
        if (exact ? key > prefix : key >= prefix) ++gt;
        else if (exact && key == prefix) ++eq;
    }
    int n_gt, n_eq;
    int pos_gt = block_exclusive_scan(gt, scratch, n_gt);
    int pos_eq = block_exclusive_scan(eq, scratch, n_eq);
    for (int i = c0; i < c1 && (gt > 0 || (eq > 0 && pos_eq < remaining)); ++i) {
        const uint32_t key = order_key(x[i]);
        if (key == 0u) continue;
        if (exact ? key > prefix : key >= prefix) {
            cand_key[pos_gt] = key;
            cand_id[pos_gt++] = i;
            --gt;
        } else if (exact && key == prefix) {
            if (pos_eq < remaining) {
                cand_key[n_gt + pos_eq] = key;
                cand_id[n_gt + pos_eq] = i;
            }
            ++pos_eq;
            --eq;
        }
    }
    const int taken = n_gt + (exact ? remaining : 0);
    for (int j = taken + tid; j < kMaxTopK; j += blockDim.x) {
        cand_key[j] = 0u;
        cand_id[j] = 0x7fffffff;
    }
    __syncthreads();
    // Bitonic sort of the kMaxTopK slots: key descending, then id ascending (padding last).
    for (int size = 2; size <= kMaxTopK; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            for (int j = tid; j < kMaxTopK / 2; j += blockDim.x) {
                const int a = 2 * j - (j & (stride - 1)), b = a + stride;
                const bool first_desc = (a & size) == 0;
                const bool a_before_b = cand_key[a] > cand_key[b] || (cand_key[a] == cand_key[b] && cand_id[a] < cand_id[b]);
                if (a_before_b != first_desc) {
                    const uint32_t tk = cand_key[a];
                    cand_key[a] = cand_key[b];
                    cand_key[b] = tk;
                    const int ti = cand_id[a];
                    cand_id[a] = cand_id[b];
                    cand_id[b] = ti;
                }
            }
            __syncthreads();
        }
    }
    float* o = out + (size_t)blockIdx.x * 2 * k;
    for (int j = tid; j < k; j += blockDim.x) {
        const bool have = j < taken;
        o[2 * j] = have ? (float)(cand_id[j] + id_offset) : -1.f;
        o[2 * j + 1] = have ? x[cand_id[j]] : __int_as_float(0x7fc00000);
    }
}

}  // namespace flint
