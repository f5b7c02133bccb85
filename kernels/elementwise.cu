// Entry points of the row-wise kernels (include/flint/elementwise.cuh).
#include "flint/elementwise.cuh"

using namespace flint;

extern "C" __global__ void flint_embedding(const uint32_t* tokens, const bf16* table, bf16* out, int hidden,
                                           int vocab, int first) {
    pdl_enter();
    embedding_row(tokens, table, out, hidden, vocab, first);
}

extern "C" __global__ void flint_unshard_rows(const float* in, float* out, int rows, int part, int vocab) {
    pdl_wait();
    unshard_rows_all(in, out, rows, part, vocab);
}

extern "C" __global__ void flint_add_rms_norm(bf16* residual, const bf16* add, const float* weight, bf16* out,
                                              int hidden, float eps) {
    pdl_enter();
    add_rms_norm_row(residual, add, weight, out, hidden, eps);
}

extern "C" __global__ void flint_rope_kv_write(bf16* qkv, const bf16* bias, const uint32_t* positions,
                                               const float* inv_freq, const uint32_t* slots, bf16* k_cache,
                                               bf16* v_cache, int n_heads, int n_kv, int head_dim) {
    pdl_enter();
    rope_kv_write_head(qkv, bias, positions, inv_freq, slots, k_cache, v_cache, n_heads, n_kv, head_dim);
}

extern "C" __global__ void flint_silu_mul(const bf16* gate_up, bf16* out, int n, int ff) {
    pdl_enter();
    silu_mul_all(gate_up, out, n, ff);
}

extern "C" __global__ void flint_fill_uniform(bf16* out, unsigned long long n, unsigned long long seed, float mean,
                                              float std) {
    fill_uniform_all(out, n, seed, mean, std);
}

extern "C" __global__ void flint_rope_kv_write_fp8(bf16* qkv, const bf16* bias, const uint32_t* positions,
                                                   const float* inv_freq, const uint32_t* slots, uint8_t* k_cache,
                                                   uint8_t* v_cache, float* k_scales, float* v_scales, int n_heads,
                                                   int n_kv, int head_dim) {
    pdl_enter();
    rope_kv_write_fp8_head(qkv, bias, positions, inv_freq, slots, k_cache, v_cache, k_scales, v_scales, n_heads, n_kv,
                           head_dim);
}
