// Entry points of the paged attention kernels (include/flint/attention.cuh), for head_dim 64 and
// 128, over a BF16 cache and (fp8_) an E4M3 cache with per-row scales (ignored by the BF16 ones);
// decode_rope_ is the decode kernel with the step's RoPE and KV-cache write folded in.
#include "flint/attention.cuh"

using namespace flint;

#define FLINT_ATTENTION(HD, F8, NAME)                                                                         \
    extern "C" __global__ void __launch_bounds__(kDecodeThreads) flint_attention_decode_##NAME##HD(           \
        const bf16* q, int q_stride, const void* k_cache, const void* v_cache, const float* k_scales,         \
        const float* v_scales, const uint32_t* block_tables, int max_blocks, const int* token_seq,            \
        const uint32_t* positions, float* part_o, float* part_ml, uint32_t* counters, bf16* out,              \
        float* out_amax, int n_heads, int n_kv, int block_size, float scale) {                                 \
        using T = typename KvElem<F8>::T;                                                                      \
        pdl_enter();                                                                                           \
        attention_decode<HD, F8, false>(q, q_stride, static_cast<const T*>(k_cache), static_cast<const T*>(v_cache),  \
                                 k_scales, v_scales, block_tables, max_blocks, token_seq, positions, part_o,   \
                                 part_ml, counters, out, out_amax, n_heads, n_kv, block_size, scale,           \
                                 DecodeRope{});                                                                \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(kDecodeThreads) flint_attention_decode_rope_##NAME##HD(      \
        const bf16* qkv, int q_stride, void* k_cache, void* v_cache, float* k_scales, float* v_scales,         \
        const uint32_t* block_tables, int max_blocks, const int* token_seq, const uint32_t* positions,         \
        float* part_o, float* part_ml, uint32_t* counters, bf16* out, float* out_amax, int n_heads, int n_kv,  \
        int block_size, float scale, const bf16* bias, const float* inv_freq, const uint32_t* slots) {         \
        using T = typename KvElem<F8>::T;                                                                      \
        pdl_enter();                                                                                           \
        const DecodeRope rope{bias, inv_freq, slots, k_cache, v_cache, k_scales, v_scales};                    \
        attention_decode<HD, F8, true>(qkv, q_stride, static_cast<const T*>(k_cache),                          \
                                       static_cast<const T*>(v_cache), k_scales, v_scales, block_tables,       \
                                       max_blocks, token_seq, positions, part_o, part_ml, counters, out,       \
                                       out_amax, n_heads, n_kv, block_size, scale, rope);                      \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(kPrefillThreads) flint_attention_prefill_##NAME##HD(         \
        const bf16* q, int q_stride, const void* k_cache, const void* v_cache, const float* k_scales,         \
        const float* v_scales, const uint32_t* block_tables, int max_blocks, const uint32_t* query_starts,     \
        const uint32_t* context_lens, const int* tile_seq, const uint32_t* tile_start, bf16* out, int n_heads, \
        int n_kv, int block_size, float scale) {                                                               \
        using T = typename KvElem<F8>::T;                                                                      \
        pdl_wait();                                                                                            \
        attention_prefill<HD, F8>(q, q_stride, static_cast<const T*>(k_cache), static_cast<const T*>(v_cache), \
                                  k_scales, v_scales, block_tables, max_blocks, query_starts, context_lens,    \
                                  tile_seq, tile_start, out, n_heads, n_kv, block_size, scale);                \
    }

FLINT_ATTENTION(64, false, )
FLINT_ATTENTION(128, false, )
FLINT_ATTENTION(64, true, fp8_)
FLINT_ATTENTION(128, true, fp8_)
