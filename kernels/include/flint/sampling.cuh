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

}  // namespace flint
