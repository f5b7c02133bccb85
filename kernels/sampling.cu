// Entry point of device sampling (include/flint/sampling.cuh).
#include "flint/sampling.cuh"

using namespace flint;

// Grid n_rows * kSampleCluster blocks (a cluster per row) of kSampleThreads threads, with
// kSampleSmemBytes of dynamic shared memory. logits [n_rows, vocab] f32; out [n_rows].
extern "C" __global__ void __cluster_dims__(kSampleCluster, 1, 1) __launch_bounds__(kSampleThreads)
    flint_sample(const float* logits, int vocab, const SamplingParams* params, uint32_t* out) {
    pdl_wait();
    const int row = blockIdx.x / kSampleCluster;
    const float* x = logits + (size_t)row * vocab;
    const SamplingParams p = params[row];
    if (!(p.temperature > 0.f) || p.top_k == 1)
        argmax_row_cluster(x, vocab, out + row);
    else if (blockIdx.x % kSampleCluster == 0)
        sample_row(x, vocab, p, out + row);
}

extern "C" __global__ void __launch_bounds__(kTopKThreads) flint_top_candidates(const float* logits, int width,
                                                                               int ld, int id_offset, int k,
                                                                               float* out) {
    pdl_wait();
    top_candidates_row(logits, width, ld, id_offset, k, out);
}
