// Token sampling on the device, one block per row of logits, picking exactly the token the
// host's sampler (`flint_engine::Sampler`) picks from the same logits with the same uniform draw:
// greedy (argmax, lowest id on ties, NaN never), or temperature with top-k, top-p and min-p over
// the row in sampling order (logit descending, ties by ascending id), then inverse transform with
// the host's draw `u` over the kept tokens.
//
// No sort: every cut is a prefix of the sampling order, found by radix selection on the logits'
// order keys (four passes of 8 bits), by count (top-k) or by probability mass (top-p and the draw).
// Weights are exp((logit - max) / temperature) in f64, as on the host, and are summed in a fixed
// order (per-warp histograms, lanes in order), so a row's token is deterministic.
#pragma once

#include "common.cuh"

namespace flint {

struct SamplingParams {
    float temperature;  // <= 0: greedy
    int top_k;          // <= 0: off
    float top_p;        // >= 1: off
    float min_p;        // <= 0: off
    double u;           // the host generator's uniform draw in [0, 1)
};

constexpr int kSampleThreads = 1024;
constexpr int kSampleWarps = kSampleThreads / 32;
// Dynamic shared memory of flint_sample: one 256-bucket f64 histogram per warp.
constexpr int kSampleSmemBytes = kSampleWarps * 256 * 8;

__device__ __forceinline__ void argmax_pair(float& v, int& i, float ov, int oi) {
    if (ov > v || (ov == v && oi < i)) {
        v = ov;
        i = oi;
    }
}

// Larger float, larger key (-0 below +0, as total_cmp); 0 for NaN, which is never taken.
__device__ __forceinline__ uint32_t order_key(float v) {
    const uint32_t u = __float_as_uint(v);
    if (isnan(v)) return 0u;
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// The float of a non-zero order key.
__device__ __forceinline__ float key_value(uint32_t key) {
    return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
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

// Deterministic block sum of doubles (lane order, then warp order); every thread gets lane 0's.
__device__ __forceinline__ double block_sum_f64(double v, double* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    if (warp == 0) {
        double t = lane < n_warps ? scratch[lane] : 0.0;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) t += __shfl_down_sync(0xffffffffu, t, o);
        if (lane == 0) scratch[32] = t;
    }
    __syncthreads();
    return scratch[32];
}

__device__ __forceinline__ int block_sum_int(int v, int* scratch) {
    int total;
    block_exclusive_scan(v, scratch, total);
    return total;
}

// Max (or, with `min`, min) of u32 over the block; every thread gets it.
__device__ __forceinline__ uint32_t block_extreme_u32(uint32_t v, bool take_min, uint32_t* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const uint32_t t = __shfl_xor_sync(0xffffffffu, v, o);
        v = take_min ? min(v, t) : max(v, t);
    }
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    uint32_t r = scratch[0];
    for (int w = 1; w < n_warps; ++w) r = take_min ? min(r, scratch[w]) : max(r, scratch[w]);
    return r;
}

// A prefix of the row in sampling order: every entry whose order key is above `key`, then the
// first `ties` entries (in id order) whose key equals it. {0, 0} is every non-NaN entry.
struct Prefix {
    uint32_t key;
    int ties;
};

__device__ __forceinline__ bool shorter(Prefix a, Prefix b) {
    return a.key > b.key || (a.key == b.key && a.ties < b.ties);
}

// The shortest prefix of a row in sampling order holding `k` entries (k below the count of its
// non-NaN entries): the k-th largest order key, and how many entries equal to it to take.
__device__ __forceinline__ Prefix select_by_count(const float* x, int n, int k) {
    __shared__ int hist[256];
    __shared__ uint32_t s_prefix;
    __shared__ int s_remaining;
    uint32_t prefix = 0u, mask = 0u;
    int remaining = k;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int b = threadIdx.x; b < 256; b += blockDim.x) hist[b] = 0;
        __syncthreads();
        for (int i = threadIdx.x; i < n; i += blockDim.x) {
            const uint32_t key = order_key(x[i]);
            if (key != 0u && (key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
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
    return Prefix{prefix, remaining};
}

struct SampleRow {
    const float* x;
    int n;
    double max_logit;
    double inv_t;
    double* warp_hist;  // [kSampleWarps][256], dynamic shared memory
    double* merged;     // [256]
    double* dscratch;   // [33]
    int* iscratch;      // [32]
    uint32_t* uscratch; // [32]

    __device__ __forceinline__ double weight(float v) const { return exp(((double)v - max_logit) * inv_t); }

    __device__ int count_key(uint32_t key) const {
        int c = 0;
        for (int i = threadIdx.x; i < n; i += blockDim.x) c += order_key(x[i]) == key;
        return block_sum_int(c, iscratch);
    }

    // Mass of a prefix, and how many of its ties there are.
    __device__ double mass_of(Prefix p, int& ties) const {
        double local = 0.0;
        for (int i = threadIdx.x; i < n; i += blockDim.x) {
            const float v = x[i];
            if (order_key(v) > p.key) local += weight(v);
        }
        const double above = block_sum_f64(local, dscratch);
        ties = p.key == 0u ? 0 : min(p.ties, count_key(p.key));
        return above + (ties > 0 ? (double)ties * weight(key_value(p.key)) : 0.0);
    }

    // The shortest prefix of `within` (whose tie group holds `within_ties` entries) whose mass
    // reaches `target` (strict: exceeds it). False when even all of `within` does not.
    __device__ bool select_mass(Prefix within, int within_ties, double target, bool strict, Prefix& out) const {
        __shared__ uint32_t s_prefix;
        __shared__ int s_found;
        __shared__ double s_above;
        const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
        const double within_w = within_ties > 0 ? weight(key_value(within.key)) : 0.0;
        double* hist = warp_hist + warp * 256;
        uint32_t prefix = 0u, mask = 0u;
        if (threadIdx.x == 0) s_above = 0.0;
        for (int shift = 24; shift >= 0; shift -= 8) {
            for (int b = lane; b < 256; b += 32) hist[b] = 0.0;
            __syncwarp();
            for (int base = warp * 32; base < n; base += blockDim.x) {
                const int i = base + lane;
                const float v = i < n ? x[i] : __int_as_float(0x7fc00000);
                const uint32_t key = order_key(v);
                const bool take = key > within.key && (key & mask) == prefix;
                if (__ballot_sync(0xffffffffu, take) == 0u) continue;
                const int digit = take ? (int)((key >> shift) & 255u) : -1;
                const double w = take ? weight(v) : 0.0;
                const unsigned peers = __match_any_sync(0xffffffffu, digit);
                double acc = 0.0;
#pragma unroll
                for (int src = 0; src < 32; ++src) {
                    const double t = __shfl_sync(0xffffffffu, w, src);
                    if ((peers >> src) & 1u) acc += t;
                }
                if (take && lane == __ffs(peers) - 1) hist[digit] += acc;
                __syncwarp();
            }
            __syncthreads();
            for (int b = threadIdx.x; b < 256; b += blockDim.x) {
                double m = 0.0;
                for (int w = 0; w < kSampleWarps; ++w) m += warp_hist[w * 256 + b];
                merged[b] = m;
            }
            __syncthreads();
            if (threadIdx.x == 0) {
                if (within_ties > 0 && (within.key & mask) == prefix)
                    merged[(within.key >> shift) & 255u] += (double)within_ties * within_w;
                double above = s_above;
                int d = 255;
                for (; d >= 0; --d) {
                    if (merged[d] == 0.0) continue;
                    const double next = above + merged[d];
                    if (strict ? next > target : next >= target) break;
                    above = next;
                }
                s_found = d >= 0;
                s_above = above;
                s_prefix = prefix | ((uint32_t)max(d, 0) << shift);
            }
            __syncthreads();
            if (!s_found) return false;
            prefix = s_prefix;
            mask |= 255u << shift;
        }
        const int avail = prefix == within.key ? within_ties : count_key(prefix);
        const double wt = weight(key_value(prefix));
        const double gap = (target - s_above) / wt;
        double j = strict ? floor(gap) + 1.0 : ceil(gap);
        j = fmin(fmax(j, 1.0), (double)max(avail, 1));
        out = Prefix{prefix, (int)j};
        return true;
    }

    // The `ties`-th entry (1-based, id order) whose key is `key`.
    __device__ int nth_with_key(uint32_t key, int ties) const {
        __shared__ int s_id;
        const int per = (n + blockDim.x - 1) / blockDim.x;
        const int c0 = min(n, (int)threadIdx.x * per), c1 = min(n, c0 + per);
        int mine = 0;
        for (int i = c0; i < c1; ++i) mine += order_key(x[i]) == key;
        int total;
        const int before = block_exclusive_scan(mine, iscratch, total);
        if (threadIdx.x == 0) s_id = 0;
        __syncthreads();
        const int want = min(ties, total) - 1;
        if (want >= before && want < before + mine) {
            int seen = before;
            for (int i = c0; i < c1; ++i) {
                if (order_key(x[i]) != key) continue;
                if (seen == want) {
                    s_id = i;
                    break;
                }
                ++seen;
            }
        }
        __syncthreads();
        return s_id;
    }

    // The shortest prefix holding `k` entries (k below the count of non-NaN entries).
    __device__ Prefix select_count(int k) const { return select_by_count(x, n, k); }
};

// Grid n_rows, kSampleThreads threads, kSampleSmemBytes dynamic shared memory.
// logits [n_rows, vocab] f32; out_tokens [n_rows].
__device__ __forceinline__ void sample_row(const float* logits, int vocab, const SamplingParams* params,
                                           uint32_t* out_tokens) {
    extern __shared__ double warp_hist[];
    __shared__ double merged[256];
    __shared__ double dscratch[33];
    __shared__ int iscratch[32];
    __shared__ uint32_t uscratch[32];
    __shared__ float red_v[32];
    __shared__ int red_i[32];
    const int row = blockIdx.x, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const float* x = logits + (size_t)row * vocab;
    const SamplingParams p = params[row];

    if (!(p.temperature > 0.f) || p.top_k == 1) {
        // Argmax; nothing but NaN gives 0, as the host's argmax.
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
        if (tid == 0) {
            for (int w = 1; w < (int)(blockDim.x >> 5); ++w) argmax_pair(best, best_i, red_v[w], red_i[w]);
            out_tokens[row] = best_i == 0x7fffffff ? 0u : (uint32_t)best_i;
        }
        return;
    }

    int valid = 0;
    uint32_t top = 0u;
    for (int i = tid; i < vocab; i += blockDim.x) {
        const uint32_t key = order_key(x[i]);
        valid += key != 0u;
        top = max(top, key);
    }
    const int n_valid = block_sum_int(valid, iscratch);
    top = block_extreme_u32(top, false, uscratch);
    if (n_valid == 0) {
        if (tid == 0) out_tokens[row] = 0u;
        return;
    }
    SampleRow r{x, vocab, (double)key_value(top), 1.0 / (double)p.temperature, warp_hist, merged, dscratch,
                iscratch, uscratch};
    if (!isfinite(r.max_logit)) {
        // An infinite logit holds all the mass: the first entry in sampling order.
        const int id = r.nth_with_key(top, 1);
        if (tid == 0) out_tokens[row] = (uint32_t)id;
        return;
    }
    // Top-k, then top-p and min-p over it, as the host cuts its sorted candidates.
    const Prefix base = p.top_k > 0 && p.top_k < n_valid ? r.select_count(p.top_k) : Prefix{0u, 0};
    int base_ties;
    const double base_mass = r.mass_of(base, base_ties);
    Prefix kept = base;
    if (p.top_p < 1.f) {
        Prefix by_p;
        if (r.select_mass(base, base_ties, (double)p.top_p * base_mass, false, by_p) && shorter(by_p, kept)) kept = by_p;
    }
    if (p.min_p > 0.f) {
        // The host keeps w / total >= min_p * (1 / total): the entries of the base at least that
        // likely (a prefix, since weights fall with the key), and at least the first.
        const double threshold = (double)p.min_p * (1.0 / base_mass);
        uint32_t lowest = 0xffffffffu;
        for (int i = tid; i < vocab; i += blockDim.x) {
            const float v = x[i];
            const uint32_t key = order_key(v);
            if (key > base.key && r.weight(v) / base_mass >= threshold) lowest = min(lowest, key);
        }
        lowest = block_extreme_u32(lowest, true, uscratch);
        Prefix by_min;
        if (base_ties > 0 && r.weight(key_value(base.key)) / base_mass >= threshold) by_min = base;
        else if (lowest != 0xffffffffu) by_min = Prefix{lowest, 0x7fffffff};
        else by_min = Prefix{top, 1};
        if (shorter(by_min, kept)) kept = by_min;
    }
    int kept_ties;
    const double kept_mass = r.mass_of(kept, kept_ties);
    Prefix pick;
    if (!r.select_mass(kept, kept_ties, p.u * kept_mass, true, pick)) {
        // Rounding left the draw past the kept mass: the host takes the last kept entry.
        if (kept_ties > 0) {
            pick = Prefix{kept.key, kept_ties};
        } else {
            uint32_t last = 0xffffffffu;
            for (int i = tid; i < vocab; i += blockDim.x) {
                const uint32_t key = order_key(x[i]);
                if (key > kept.key) last = min(last, key);
            }
            last = block_extreme_u32(last, true, uscratch);
            pick = Prefix{last, 0x7fffffff};
        }
    }
    const int id = r.nth_with_key(pick.key, pick.ties);
    if (tid == 0) out_tokens[row] = (uint32_t)id;
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

// Grid rows, kTopKThreads threads. Row r: logits + r * ld, width entries; out [rows, 2k];
// 1 <= k <= kMaxTopK.
__device__ __forceinline__ void top_candidates_row(const float* logits, int width, int ld, int id_offset, int k,
                                                   float* out) {
    __shared__ int scratch[32];
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
    uint32_t prefix = 1u;  // every valid key is >= 1: take them all
    int remaining = 0;
    if (total_valid > k) {
        const Prefix kth = select_by_count(x, width, k);
        prefix = kth.key;
        remaining = kth.ties;
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
