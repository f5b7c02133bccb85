// Entry points of the paged attention kernels (include/flint/attention.cuh), for head_dim 64 and 128.
#include "flint/attention.cuh"

using namespace flint;

#define FLINT_ATTENTION(HD)                                                                                    \
    extern "C" __global__ void __launch_bounds__(kDecodeThreads) flint_attention_decode_##HD(                  \
        const bf16* q, int q_stride, const bf16* k_cache, const bf16* v_cache, const uint32_t* block_tables, int max_blocks, \
        const int* token_seq, const uint32_t* positions, float* part_o, float* part_ml, int n_heads, int n_kv,  \
        int block_size, float scale) {                                                                         \
        pdl_wait();                                                                                            \
        attention_decode<HD>(q, q_stride, k_cache, v_cache, block_tables, max_blocks, token_seq, positions, part_o,      \
                             part_ml, n_heads, n_kv, block_size, scale);                                       \
    }                                                                                                          \
    extern "C" __global__ void flint_attention_combine_##HD(const float* part_o, const float* part_ml,         \
                                                            bf16* out, const int* token_seq, int n_heads,      \
                                                            int n_splits) {                                    \
        pdl_wait();                                                                                            \
        attention_combine<HD>(part_o, part_ml, out, token_seq, n_heads, n_splits);                             \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(kPrefillThreads) flint_attention_prefill_##HD(                \
        const bf16* q, int q_stride, const bf16* k_cache, const bf16* v_cache, const uint32_t* block_tables, int max_blocks, \
        const uint32_t* query_starts, const uint32_t* context_lens, const int* tile_seq,                       \
        const uint32_t* tile_start, bf16* out, int n_heads, int n_kv, int block_size, float scale) {           \
        pdl_wait();                                                                                            \
        attention_prefill<HD>(q, q_stride, k_cache, v_cache, block_tables, max_blocks, query_starts, context_lens,       \
                              tile_seq, tile_start, out, n_heads, n_kv, block_size, scale);                    \
    }

FLINT_ATTENTION(64)
FLINT_ATTENTION(128)
