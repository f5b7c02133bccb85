// All-reduce among the GPUs of one process over peer-to-peer (NVLink) memory, optionally fused
// with the residual add and RMSNorm that follow a row-parallel projection. Every rank sums the
// ranks' values in rank order, so every rank holds the same bits. Two links move the data, and
// each kernel below is written once over a `Link`:
//
// FlagLink (pull): every rank writes its input into its own peer-readable buffer (the
// projection's output); each rank then reads all ranks' buffers. Ranks meet with one flag write
// per peer and block:
//
//   flags[r]: [kMaxBlocks][kMaxRanks] u32 on rank r's GPU; flags[r][b][p] is the last call of
//             block b at which rank p arrived.
//   counter:  [kMaxBlocks] u32 on this GPU: calls block b has made.
//
// Block b of rank r, at call c = counter[b] + 1: thread p < world stores c into flags[p][b][r]
// (release, system scope), then waits until flags[r][b][p] >= c (acquire). Every rank launches
// the same calls with the same grids, so the counters agree.
//
// Safety of the inputs without a second barrier: callers alternate between two input buffers
// (slot 0 and 1). Rank p writes a slot's buffer again for call c + 2 only after its call c + 1,
// whose block 0 waited for every rank to arrive at c + 1, that is, to have finished call c.
//
// LamportLink (push, no barrier): every rank owns a receive area of three slots, each with a
// place for every sender's message, filled with a sentinel (bf16 -0, bits 0x8000) that no sent
// value carries (a sent -0 goes out as +0, on every rank alike). Call c (a counter on each GPU,
// advanced by the last block of each call) uses slot c % 3: each rank stores its input straight
// into its place in every peer's slot, then waits in its own memory until no value of a peer's
// message is the sentinel, sums in rank order, and writes the sentinel back. A place is written
// again at call c + 3, which a peer reaches only after receiving this rank's messages of c + 1
// and c + 2, sent after this rank finished reading call c. Only the data crosses NVLink, once, as
// posted writes: no flag round trip and no remote loads. The input is this GPU's alone (slots
// need not alternate), and calls may use any grid.
#pragma once

#include <cooperative_groups.h>

#include "flint/e4m3.cuh"

namespace flint {

constexpr int kArMaxRanks = 8;
constexpr int kArMaxBlocks = 64;

struct ArPeers {
    const bf16* data[kArMaxRanks];
    uint32_t* flags[kArMaxRanks];
};

__device__ __forceinline__ void st_release_sys(uint32_t* p, uint32_t v) {
    asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ uint32_t ld_acquire_sys(const uint32_t* p) {
    uint32_t v;
    asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

// A 16-byte load that skips L1 (peer memory is not coherent with this SM's L1).
__device__ __forceinline__ Bf16x8 load_cg(const bf16* p) {
    int4 r;
    asm volatile("ld.global.cg.v4.s32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(p)
                 : "memory");
    return *reinterpret_cast<Bf16x8*>(&r);
}

__device__ __forceinline__ uint64_t global_ns() {
    uint64_t t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

// The flag barrier of this block. A rank that never arrives (it failed) stops the kernel with a
// trap after `kArTimeoutNs`, which fails this GPU's stream instead of hanging it.
constexpr uint64_t kArTimeoutNs = 20ull * 1000 * 1000 * 1000;

__device__ __forceinline__ void ar_barrier(const ArPeers& peers, uint32_t* counter, int rank, int world) {
    __shared__ uint32_t call;
    if (threadIdx.x == 0) call = counter[blockIdx.x] + 1;
    __syncthreads();
    const uint32_t c = call;
    if (threadIdx.x < world) {
        const int p = threadIdx.x;
        st_release_sys(peers.flags[p] + blockIdx.x * kArMaxRanks + rank, c);
        const uint32_t* mine = peers.flags[rank] + blockIdx.x * kArMaxRanks + p;
        const uint64_t start = global_ns();
        while ((int32_t)(ld_acquire_sys(mine) - c) < 0) {
            if (global_ns() - start > kArTimeoutNs) {
                printf("flint all-reduce: rank %d block %d waited 20 s for rank %d; trapping\n", rank,
                       (int)blockIdx.x, p);
                __trap();
            }
        }
    }
    __syncthreads();
    if (threadIdx.x == 0) counter[blockIdx.x] = c;
}

// The sum of `world` vectors in rank order, rounded to bf16 (as NCCL's BF16 sum).
__device__ __forceinline__ void ar_sum_ranks8(const Bf16x8 (&v)[kArMaxRanks], int world, float (&s)[8]) {
    unpack(v[0], s);
#pragma unroll
    for (int p = 1; p < kArMaxRanks; ++p) {
        if (p < world) {
            float a[8];
            unpack(v[p], a);
#pragma unroll
            for (int j = 0; j < 8; ++j) s[j] += a[j];
        }
    }
    Bf16x8 rounded = pack(s);
    unpack(rounded, s);
}

// The pull link (see the top of the file): `begin` meets the peers at the flag barrier, `sum8`
// reads vector i from every rank's buffer and sums.
struct FlagLink {
    static constexpr bool kPushes = false;
    const ArPeers& peers;
    uint32_t* counter;
    int rank, world;

    __device__ __forceinline__ void begin() { ar_barrier(peers, counter, rank, world); }
    __device__ __forceinline__ void push(size_t) const {}
    __device__ __forceinline__ void sum8(size_t i, float (&s)[8]) const {
        Bf16x8 v[kArMaxRanks];
#pragma unroll
        for (int p = 0; p < kArMaxRanks; ++p)
            if (p < world) v[p] = load_cg(peers.data[p] + i * 8);
        ar_sum_ranks8(v, world, s);
    }
    __device__ __forceinline__ void end() const {}
};

// The push link's buffers (see the top of the file).
struct ArLamport {
    const bf16* input;        // this rank's message (local)
    bf16* recv[kArMaxRanks];  // each rank's receive area: [3 slots][world senders][cap8 vectors]
    uint32_t* state;          // on this GPU: [0] calls made, [1] blocks done in this call
    unsigned long long cap8;  // vectors of 8 bf16 per (slot, sender)
};

constexpr uint32_t kLamportEmpty = 0x80008000u;  // two sentinels

__device__ __forceinline__ bool lamport_has_empty(uint32_t w) {
    return (w & 0xffffu) == 0x8000u || (w >> 16) == 0x8000u;
}

__device__ __forceinline__ bool lamport_full(uint4 v) {
    return !(lamport_has_empty(v.x) || lamport_has_empty(v.y) || lamport_has_empty(v.z) || lamport_has_empty(v.w));
}

// A sent value never equals the sentinel: -0 goes out as +0.
__device__ __forceinline__ uint32_t lamport_clean(uint32_t w) {
    if ((w & 0xffffu) == 0x8000u) w &= 0xffff0000u;
    if ((w >> 16) == 0x8000u) w &= 0x0000ffffu;
    return w;
}

__device__ __forceinline__ uint4 lamport_clean(uint4 v) {
    return make_uint4(lamport_clean(v.x), lamport_clean(v.y), lamport_clean(v.z), lamport_clean(v.w));
}

__device__ __forceinline__ void st_volatile16(bf16* p, uint4 v) {
    asm volatile("st.volatile.global.v4.u32 [%0], {%1,%2,%3,%4};" ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
                 : "memory");
}

__device__ __forceinline__ uint4 ld_volatile16(const bf16* p) {
    uint4 v;
    asm volatile("ld.volatile.global.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p)
                 : "memory");
    return v;
}

// Polls `p` until none of its values is the sentinel (out of line: the common case finds the
// values there at the first load). A peer that never sends (it failed) stops the kernel with a
// trap after `kArTimeoutNs`.
__device__ __noinline__ uint4 lamport_wait_slow(const bf16* p, int rank) {
    const uint64_t start = global_ns();
    for (;;) {
        const uint4 v = ld_volatile16(p);
        if (lamport_full(v)) return v;
        if (global_ns() - start > kArTimeoutNs) {
            printf("flint all-reduce: rank %d block %d waited 20 s for a peer's values; trapping\n", rank,
                   (int)blockIdx.x);
            __trap();
        }
    }
}

// The push link: `begin` learns the call's slot, `push` sends this rank's vector i to every
// peer, `sum8` waits for vector i from every peer, sums and empties its places again, `end`
// advances the call counter once every block is done.
struct LamportLink {
    static constexpr bool kPushes = true;
    const ArLamport& l;
    int rank, world;
    uint32_t slot = 0;

    // Where vector i from `sender` lands in a receive area.
    __device__ __forceinline__ size_t at(int sender, size_t i) const {
        return (((size_t)slot * world + sender) * l.cap8 + i) * 8;
    }

    __device__ __forceinline__ void begin() {
        __shared__ uint32_t s;
        if (threadIdx.x == 0) s = l.state[0] % 3;
        __syncthreads();
        slot = s;
    }

    __device__ __forceinline__ void push(size_t i) const {
        const uint4 v = lamport_clean(*reinterpret_cast<const uint4*>(l.input + i * 8));
        const size_t to = at(rank, i);
#pragma unroll
        for (int p = 0; p < kArMaxRanks; ++p)
            if (p < world && p != rank) st_volatile16(l.recv[p] + to, v);
    }

    __device__ __forceinline__ void sum8(size_t i, float (&s)[8]) const {
        bf16* mine = l.recv[rank] + at(0, i);
        const size_t step = l.cap8 * 8;  // from one sender's place to the next
        Bf16x8 v[kArMaxRanks];
#pragma unroll
        for (int p = 0; p < kArMaxRanks; ++p) {
            if (p < world) {
                uint4 w;
                if (p == rank) {
                    w = lamport_clean(*reinterpret_cast<const uint4*>(l.input + i * 8));
                } else {
                    w = ld_volatile16(mine + p * step);
                    if (!lamport_full(w)) w = lamport_wait_slow(mine + p * step, rank);
                }
                v[p] = *reinterpret_cast<const Bf16x8*>(&w);
            }
        }
        ar_sum_ranks8(v, world, s);
        const uint4 empty = make_uint4(kLamportEmpty, kLamportEmpty, kLamportEmpty, kLamportEmpty);
#pragma unroll
        for (int p = 0; p < kArMaxRanks; ++p)
            if (p < world && p != rank) *reinterpret_cast<uint4*>(mine + p * step) = empty;
    }

    __device__ __forceinline__ void end() const {
        __syncthreads();
        if (threadIdx.x == 0 && atomicAdd(l.state + 1, 1u) == gridDim.x - 1) {
            l.state[1] = 0;
            l.state[0] += 1;
        }
    }
};

// out[i] = sum over ranks of the inputs' vector i, for `n8` vectors of 8 bf16, grid-strided.
template <class Link>
__device__ __forceinline__ void ar_sum_all(Link& link, bf16* out, size_t n8) {
    link.begin();
    const size_t first = (size_t)blockIdx.x * blockDim.x + threadIdx.x, stride = (size_t)gridDim.x * blockDim.x;
    if constexpr (Link::kPushes)
        for (size_t i = first; i < n8; i += stride) link.push(i);
    Bf16x8* o = reinterpret_cast<Bf16x8*>(out);
    for (size_t i = first; i < n8; i += stride) {
        float s[8];
        link.sum8(i, s);
        o[i] = pack(s);
    }
    link.end();
}

// Where the normalised rows go: bf16 rows, or (FP8 models) E4M3 codes with a scale per row,
// as add_rms_norm_fp8_row writes them (the normalised values rounded to bf16, then quantized).
struct ArNormOut {
    bf16* rows;       // bf16 [n, hidden], or null
    uint8_t* codes;   // FP8 [n, hidden] (when rows is null)
    float* scales;    // [n]
};

// Vector i of a row's normalised values (rounded to bf16): the bf16 model's activation.
__device__ __forceinline__ void ar_normed8(const Bf16x8& res, const float* weight, float r, float (&v)[8]) {
    unpack(res, v);
    rms_scale8(v, weight, r);
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = __bfloat162float(__float2bfloat16(v[j]));
}

__device__ __forceinline__ float abs_max8(const float (&v)[8]) {
    float m = 0.f;
#pragma unroll
    for (int j = 0; j < 8; ++j) m = fmaxf(m, fabsf(v[j]));
    return m;
}

// For each of `n` rows of `hidden`: residual += sum over ranks (bf16), then
// out = rms_norm(residual) * weight, as add_rms_norm_row (or add_rms_norm_fp8_row for FP8
// output). Rows are spread over the blocks.
template <class Link>
__device__ __forceinline__ void ar_add_rms_norm_rows(Link& link, bf16* residual, const float* weight, ArNormOut out,
                                                     int n, int hidden, float eps) {
    __shared__ float scratch[32];
    link.begin();
    const int h8 = hidden / 8;
    if constexpr (Link::kPushes)
        for (int row = blockIdx.x; row < n; row += gridDim.x)
            for (int i = threadIdx.x; i < h8; i += blockDim.x) link.push((size_t)row * h8 + i);
    for (int row = blockIdx.x; row < n; row += gridDim.x) {
        Bf16x8* res = reinterpret_cast<Bf16x8*>(residual + (size_t)row * hidden);
        float ss = 0.f;
        for (int i = threadIdx.x; i < h8; i += blockDim.x) {
            float s[8], v[8];
            link.sum8((size_t)row * h8 + i, s);
            residual_add8(res[i], s, v, ss);
        }
        const float r = rsqrtf(block_sum(ss, scratch) / hidden + eps);
        if (out.rows != nullptr) {
            Bf16x8* o = reinterpret_cast<Bf16x8*>(out.rows + (size_t)row * hidden);
            for (int i = threadIdx.x; i < h8; i += blockDim.x) {
                float v[8];
                unpack(res[i], v);
                rms_scale8(v, weight + i * 8, r);
                o[i] = pack(v);
            }
        } else {
            float m = 0.f;
            for (int i = threadIdx.x; i < h8; i += blockDim.x) {
                float v[8];
                ar_normed8(res[i], weight + i * 8, r, v);
                m = fmaxf(m, abs_max8(v));
            }
            __syncthreads();  // scratch reuse
            const float scale = fp8_scale(block_max(m, scratch));
            for (int i = threadIdx.x; i < h8; i += blockDim.x) {
                float v[8];
                ar_normed8(res[i], weight + i * 8, r, v);
                store_e4m3x8(out.codes + (size_t)row * hidden + i * 8, v, scale);
            }
            if (threadIdx.x == 0) out.scales[row] = scale;
        }
        __syncthreads();
    }
    link.end();
}

// ar_add_rms_norm_rows with each row spread over a cluster of kCluster blocks (one row of
// a decode step is too little work for one SM to fetch from every peer quickly): block c of a
// cluster takes vectors [c * chunk, (c + 1) * chunk) of the row, and the blocks add their
// sums of squares (and, for FP8 output, take the max of their amax) through distributed shared
// memory. Rows go to clusters in turn.
constexpr int kArCluster = 8;

template <class Link>
__device__ __forceinline__ void ar_add_rms_norm_cluster(Link& link, bf16* residual, const float* weight,
                                                        ArNormOut out, int n, int hidden, float eps) {
    namespace cg = cooperative_groups;
    __shared__ float scratch[32];
    __shared__ float partial, partial_max;
    cg::cluster_group cluster = cg::this_cluster();
    link.begin();
    const int c = (int)cluster.block_rank();
    const int chunk = hidden / 8 / kArCluster;
    const int n_clusters = gridDim.x / kArCluster;
    if constexpr (Link::kPushes)
        for (int row = blockIdx.x / kArCluster; row < n; row += n_clusters)
            for (int i = c * chunk + threadIdx.x; i < (c + 1) * chunk; i += blockDim.x)
                link.push((size_t)row * (hidden / 8) + i);
    for (int row = blockIdx.x / kArCluster; row < n; row += n_clusters) {
        Bf16x8* res = reinterpret_cast<Bf16x8*>(residual + (size_t)row * hidden);
        const size_t base = (size_t)row * (hidden / 8);
        float ss = 0.f;
        for (int i = c * chunk + threadIdx.x; i < (c + 1) * chunk; i += blockDim.x) {
            float s[8], v[8];
            link.sum8(base + i, s);
            residual_add8(res[i], s, v, ss);
        }
        ss = block_sum(ss, scratch);
        if (threadIdx.x == 0) partial = ss;
        cluster.sync();
        float total = 0.f;
        for (int b = 0; b < kArCluster; ++b) total += *cluster.map_shared_rank(&partial, b);
        // Every block has read every partial before any block overwrites its own.
        cluster.sync();
        const float r = rsqrtf(total / hidden + eps);
        if (out.rows != nullptr) {
            Bf16x8* o = reinterpret_cast<Bf16x8*>(out.rows + (size_t)row * hidden);
            for (int i = c * chunk + threadIdx.x; i < (c + 1) * chunk; i += blockDim.x) {
                float v[8];
                unpack(res[i], v);
                rms_scale8(v, weight + i * 8, r);
                o[i] = pack(v);
            }
            continue;
        }
        float m = 0.f;
        for (int i = c * chunk + threadIdx.x; i < (c + 1) * chunk; i += blockDim.x) {
            float v[8];
            ar_normed8(res[i], weight + i * 8, r, v);
            m = fmaxf(m, abs_max8(v));
        }
        __syncthreads();  // scratch reuse
        m = block_max(m, scratch);
        if (threadIdx.x == 0) partial_max = m;
        cluster.sync();
        float amax = 0.f;
        for (int b = 0; b < kArCluster; ++b) amax = fmaxf(amax, *cluster.map_shared_rank(&partial_max, b));
        cluster.sync();
        const float scale = fp8_scale(amax);
        for (int i = c * chunk + threadIdx.x; i < (c + 1) * chunk; i += blockDim.x) {
            float v[8];
            ar_normed8(res[i], weight + i * 8, r, v);
            store_e4m3x8(out.codes + (size_t)row * hidden + i * 8, v, scale);
        }
        if (c == 0 && threadIdx.x == 0) out.scales[row] = scale;
    }
    link.end();
}

}  // namespace flint
