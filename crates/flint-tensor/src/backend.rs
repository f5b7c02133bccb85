//! The `Backend` trait: every operation a decoder-only transformer's forward pass needs.
//!
//! Shapes use named axes. Weights of linear layers are `[out_features, in_features]`, as in
//! Hugging Face checkpoints. Activations are row-major with the token axis outermost.

use std::fmt;

use crate::{AttentionBatch, DType, Result, Shape, Tensor};

/// Where a backend computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(ordinal) => write!(f, "cuda:{ordinal}"),
        }
    }
}

/// The operations a model needs, implemented once per device.
///
/// Every method checks its operands' shapes and devices and returns an error rather than
/// panicking. Methods that take `&Tensor` outputs (`write_kv`) update that storage in place.
pub trait Backend: Send + Sync + fmt::Debug {
    /// The device this backend computes on.
    fn device(&self) -> Device;

    /// A tensor of `dtype` holding `data` (row-major, `shape.elem_count()` values), converted
    /// from f32 with round-to-nearest-even.
    fn upload_f32(&self, data: &[f32], shape: Shape, dtype: DType) -> Result<Tensor>;

    /// A zero-filled tensor.
    fn zeros(&self, shape: Shape, dtype: DType) -> Result<Tensor>;

    /// The tensor's values as f32 on the host, row-major.
    fn to_f32_vec(&self, tensor: &Tensor) -> Result<Vec<f32>>;

    /// Rows of `table` (`[vocab, hidden]`) picked by `token_ids`: `[n_tokens, hidden]`.
    fn embedding(&self, table: &Tensor, token_ids: &[u32]) -> Result<Tensor>;

    /// Rows `rows` of a `[n_rows, n_cols]` matrix: `[rows.len(), n_cols]`.
    fn gather_rows(&self, x: &Tensor, rows: &[usize]) -> Result<Tensor>;

    /// RMSNorm over the last axis: `x / sqrt(mean(x²) + eps) * weight`; `weight` is `[hidden]`.
    fn rms_norm(&self, x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor>;

    /// Residual add fused with RMSNorm: returns `(residual + x, rms_norm(residual + x))`.
    fn add_rms_norm(&self, residual: &Tensor, x: &Tensor, weight: &Tensor, eps: f32) -> Result<(Tensor, Tensor)>;

    /// `x @ weightᵀ (+ bias)`: `x` is `[n_tokens, in_features]`, `weight` is
    /// `[out_features, in_features]`, `bias` is `[out_features]`; result `[n_tokens, out_features]`.
    fn linear(&self, x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor>;

    /// Element-wise `a + b` of equal shapes.
    fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor>;

    /// SwiGLU's gate: `silu(gate) * up`, element-wise, equal shapes.
    fn silu_mul(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor>;

    /// Rotary position embedding, rotate-half (GPT-NeoX / Hugging Face) layout, applied to
    /// `x: [n_tokens, n_heads, head_dim]` at `positions[token]`. `inv_freq` is `[head_dim / 2]`
    /// (f32); pair `i` of a token at position `p` turns by the f32 angle `p * inv_freq[i]`.
    fn rope(&self, x: &Tensor, positions: &[u32], inv_freq: &Tensor) -> Result<Tensor>;

    /// Writes `values: [n_tokens, n_kv_heads, head_dim]` into the paged cache
    /// `cache: [n_blocks, block_size, n_kv_heads, head_dim]`: token `t` goes to slot
    /// `slots[t]`, that is block `slots[t] / block_size`, row `slots[t] % block_size`.
    fn write_kv(&self, cache: &Tensor, values: &Tensor, slots: &[u32]) -> Result<()>;

    /// Causal grouped-query attention of a batch of sequences over a paged KV cache.
    ///
    /// `q: [n_tokens, n_heads, head_dim]` holds every sequence's new tokens back to back, as
    /// `batch` describes; `k_cache` and `v_cache` are `[n_blocks, block_size, n_kv_heads,
    /// head_dim]` and already hold the new tokens' keys and values. Query token `i` of sequence
    /// `s` sits at position `context_lens[s] - n_new(s) + i` and attends to that sequence's
    /// positions `0..=` its own. Query head `h` reads KV head `h / (n_heads / n_kv_heads)`.
    /// Result `[n_tokens, n_heads, head_dim]`.
    fn attention(
        &self,
        q: &Tensor,
        k_cache: &Tensor,
        v_cache: &Tensor,
        batch: &AttentionBatch,
        softmax_scale: f32,
    ) -> Result<Tensor>;
}
