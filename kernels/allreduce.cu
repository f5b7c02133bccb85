// Entry points of the peer-to-peer all-reduce (include/flint/allreduce.cuh).
#include "flint/allreduce.cuh"

using namespace flint;

extern "C" __global__ void flint_ar_sum(ArPeers peers, uint32_t* counter, bf16* out, unsigned long long n8, int rank,
                                        int world) {
    pdl_wait();
    ar_sum_all(peers, counter, out, n8, rank, world);
}

// out: bf16 rows, or (out null) FP8 codes with a scale per row.
extern "C" __global__ void flint_ar_add_rms_norm(ArPeers peers, uint32_t* counter, bf16* residual,
                                                 const float* weight, bf16* out, uint8_t* codes, float* scales, int n,
                                                 int hidden, float eps, int rank, int world) {
    pdl_wait();
    ar_add_rms_norm_rows(peers, counter, residual, weight, ArNormOut{out, codes, scales}, n, hidden, eps, rank,
                         world);
}

extern "C" __global__ void __cluster_dims__(kArCluster, 1, 1)
    flint_ar_add_rms_norm_cluster(ArPeers peers, uint32_t* counter, bf16* residual, const float* weight, bf16* out,
                                  uint8_t* codes, float* scales, int n, int hidden, float eps, int rank, int world) {
    pdl_wait();
    ar_add_rms_norm_cluster(peers, counter, residual, weight, ArNormOut{out, codes, scales}, n, hidden, eps, rank,
                            world);
}
