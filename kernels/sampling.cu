// Entry point of device sampling (include/flint/sampling.cuh).
#include "flint/sampling.cuh"

using namespace flint;

extern "C" __global__ void __launch_bounds__(kSampleThreads) flint_sample(const float* logits, int vocab,
                                                                         const SamplingParams* params,
                                                                         uint32_t* out) {
    pdl_wait();
    sample_row(logits, vocab, params, out);
}

extern "C" __global__ void __launch_bounds__(kTopKThreads) flint_top_candidates(const float* logits, int width,
                                                                               int ld, int id_offset, int k,
                                                                               float* out) {
    pdl_wait();
    top_candidates_row(logits, width, ld, id_offset, k, out);
}
