// Entry points of the peer-to-peer all-reduce (include/flint/allreduce.cuh): `flint_ar_*` over
// the pull link (flags), `flint_arl_*` over the push link (Lamport sentinels).
#include "flint/allreduce.cuh"

using namespace flint;

extern "C" __global__ void flint_ar_sum(ArPeers peers, uint32_t* counter, bf16* out, unsigned long long n8, int rank,
                                        int world) {
    pdl_wait();
    FlagLink link{peers, counter, rank, world};
    ar_sum_all(link, out, n8);
}

// out: bf16 rows, or (out null) FP8 codes with a scale per row.
extern "C" __global__ void flint_ar_add_rms_norm(ArPeers peers, uint32_t* counter, bf16* residual,
                                                 const float* weight, bf16* out, uint8_t* codes, float* scales, int n,
                                                 int hidden, float eps, int rank, int world) {
    pdl_wait();
    FlagLink link{peers, counter, rank, world};
    ar_add_rms_norm_rows(link, residual, weight, ArNormOut{out, codes, scales}, n, hidden, eps);
}

extern "C" __global__ void __cluster_dims__(kArCluster, 1, 1)
    flint_ar_add_rms_norm_cluster(ArPeers peers, uint32_t* counter, bf16* residual, const float* weight, bf16* out,
                                  uint8_t* codes, float* scales, int n, int hidden, float eps, int rank, int world) {
    pdl_wait();
    FlagLink link{peers, counter, rank, world};
    ar_add_rms_norm_cluster(link, residual, weight, ArNormOut{out, codes, scales}, n, hidden, eps);
}

extern "C" __global__ void __launch_bounds__(512) flint_arl_sum(ArLamport lamport, bf16* out, unsigned long long n8, int rank, int world) {
    pdl_wait();
    LamportLink link{lamport, rank, world};
    ar_sum_all(link, out, n8);
}

extern "C" __global__ void __launch_bounds__(512) flint_arl_add_rms_norm(ArLamport lamport, bf16* residual, const float* weight, bf16* out,
                                                  uint8_t* codes, float* scales, int n, int hidden, float eps,
                                                  int rank, int world) {
    pdl_wait();
    LamportLink link{lamport, rank, world};
    ar_add_rms_norm_rows(link, residual, weight, ArNormOut{out, codes, scales}, n, hidden, eps);
}

extern "C" __global__ void __cluster_dims__(kArCluster, 1, 1) __launch_bounds__(512)
    flint_arl_add_rms_norm_cluster(ArLamport lamport, bf16* residual, const float* weight, bf16* out,
                                   uint8_t* codes, float* scales, int n, int hidden, float eps, int rank, int world) {
    pdl_wait();
    LamportLink link{lamport, rank, world};
    ar_add_rms_norm_cluster(link, residual, weight, ArNormOut{out, codes, scales}, n, hidden, eps);
}
