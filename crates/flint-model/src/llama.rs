//! The Llama family (Llama 2/3/3.1/3.2, Mistral, Qwen2): pre-norm decoder blocks with RMSNorm,
//! rotary embeddings, grouped-query attention and a SwiGLU MLP, over any [`Backend`].

use flint_tensor::{Backend, DType, Shape, Tensor};

use crate::config::{ModelConfig, RopeScaling};
use crate::source::{HostTensor, ModelSource};
use crate::{Error, Result};

/// Progress of a weight load: bytes of weights loaded so far and in all.
#[derive(Clone, Copy, Debug)]
pub struct LoadProgress {
    pub loaded_bytes: usize,
    pub total_bytes: usize,
}

#[derive(Debug)]
struct Layer {
    attn_norm: Tensor,
    q_proj: Tensor,
    k_proj: Tensor,
    v_proj: Tensor,
    q_bias: Option<Tensor>,
    k_bias: Option<Tensor>,
    v_bias: Option<Tensor>,
    o_proj: Tensor,
    mlp_norm: Tensor,
    gate_proj: Tensor,
    up_proj: Tensor,
    down_proj: Tensor,
}

/// A loaded Llama-family model on one backend.
#[derive(Debug)]
pub struct Llama {
    config: ModelConfig,
    dtype: DType,
    embed_tokens: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Tensor,
    rope_inv_freq: Tensor,
}

/// Per-sequence key/value cache: one `[capacity, n_kv_heads, head_dim]` tensor per layer for
/// keys and one for values, filled from position 0 up to `len`.
#[derive(Debug)]
pub struct KvCache {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    capacity: usize,
    len: usize,
}

impl KvCache {
    /// Positions held so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Most positions this cache can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forgets every position; the memory is kept for the next sequence.
    pub fn clear(&mut self) {
        self.len = 0;
    }
}

/// Inverse rotary frequencies `1 / theta^(2i/d)`, with the config's scaling applied, computed
/// in f32 as the Hugging Face reference does.
pub fn rope_inv_freq(config: &ModelConfig) -> Vec<f32> {
    let d = config.head_dim;
    let base: Vec<f32> = (0..d / 2).map(|i| 1.0 / config.rope_theta.powf((2 * i) as f32 / d as f32)).collect();
    match &config.rope_scaling {
        RopeScaling::None => base,
        RopeScaling::Linear(factor) => base.iter().map(|f| f / factor).collect(),
        RopeScaling::FreqFactors(factors) => base.iter().zip(factors).map(|(f, s)| f / s).collect(),
        RopeScaling::Llama3(s) => {
            let old = s.original_max_position_embeddings as f32;
            let low_freq_wavelen = old / s.low_freq_factor;
            let high_freq_wavelen = old / s.high_freq_factor;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    if wavelen < high_freq_wavelen {
                        f
                    } else if wavelen > low_freq_wavelen {
                        f / s.factor
                    } else {
                        let smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
                        (1.0 - smooth) * f / s.factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

fn expect_dims(name: &str, t: &HostTensor, expected: &[usize]) -> Result<()> {
    if t.dims != expected {
        return Err(Error::WeightShape { name: name.to_string(), got: t.dims.clone(), expected: expected.to_vec() });
    }
    Ok(())
}

struct Loader<'a> {
    source: &'a ModelSource,
    config: &'a ModelConfig,
    backend: &'a dyn Backend,
    dtype: DType,
    loaded_bytes: usize,
    total_bytes: usize,
    progress: &'a mut dyn FnMut(LoadProgress),
}

impl Loader<'_> {
    fn optional(&mut self, name: &str, dims: &[usize]) -> Result<Option<Tensor>> {
        let Some(host) = self.source.tensor(name, self.config)? else { return Ok(None) };
        expect_dims(name, &host, dims)?;
        // Norm weights and biases stay f32: they are tiny and every backend keeps them so.
        let dtype = if dims.len() == 1 { DType::F32 } else { self.dtype };
        let tensor = self.backend.upload_f32(&host.data, Shape::new(dims), dtype)?;
        self.loaded_bytes += self.dtype.size_in_bytes(host.data.len());
        (self.progress)(LoadProgress { loaded_bytes: self.loaded_bytes, total_bytes: self.total_bytes });
        Ok(Some(tensor))
    }

    fn required(&mut self, name: &str, dims: &[usize]) -> Result<Tensor> {
        self.optional(name, dims)?.ok_or_else(|| Error::MissingWeight {
            name: name.to_string(),
            source_name: self.source.path().display().to_string(),
        })
    }
}

impl Llama {
    /// Loads every weight of `source` onto `backend`, matrices in `dtype`.
    pub fn load(
        source: &ModelSource,
        config: ModelConfig,
        backend: &dyn Backend,
        dtype: DType,
        progress: &mut dyn FnMut(LoadProgress),
    ) -> Result<Self> {
        let c = &config;
        let h = c.hidden_size;
        let q_dim = c.n_heads * c.head_dim;
        let kv_dim = c.n_kv_heads * c.head_dim;
        let total_bytes = dtype.size_in_bytes(c.n_parameters());
        let mut ld = Loader { source, config: c, backend, dtype, loaded_bytes: 0, total_bytes, progress };

        let embed_tokens = ld.required("model.embed_tokens.weight", &[c.vocab_size, h])?;
        // Not preallocated from the config: a corrupt file could claim any layer count.
        let mut layers = Vec::new();
        for i in 0..c.n_layers {
            let p = format!("model.layers.{i}");
            let bias = |ld: &mut Loader<'_>, name: &str, n: usize| -> Result<Option<Tensor>> {
                if c.attention_bias { ld.optional(&format!("{p}.self_attn.{name}.bias"), &[n]) } else { Ok(None) }
            };
            layers.push(Layer {
                attn_norm: ld.required(&format!("{p}.input_layernorm.weight"), &[h])?,
                q_proj: ld.required(&format!("{p}.self_attn.q_proj.weight"), &[q_dim, h])?,
                k_proj: ld.required(&format!("{p}.self_attn.k_proj.weight"), &[kv_dim, h])?,
                v_proj: ld.required(&format!("{p}.self_attn.v_proj.weight"), &[kv_dim, h])?,
                q_bias: bias(&mut ld, "q_proj", q_dim)?,
                k_bias: bias(&mut ld, "k_proj", kv_dim)?,
                v_bias: bias(&mut ld, "v_proj", kv_dim)?,
                o_proj: ld.required(&format!("{p}.self_attn.o_proj.weight"), &[h, q_dim])?,
                mlp_norm: ld.required(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                gate_proj: ld.required(&format!("{p}.mlp.gate_proj.weight"), &[c.intermediate_size, h])?,
                up_proj: ld.required(&format!("{p}.mlp.up_proj.weight"), &[c.intermediate_size, h])?,
                down_proj: ld.required(&format!("{p}.mlp.down_proj.weight"), &[h, c.intermediate_size])?,
            });
        }
        let norm = ld.required("model.norm.weight", &[h])?;
        let lm_head = if c.tie_word_embeddings {
            embed_tokens.clone()
        } else {
            match ld.optional("lm_head.weight", &[c.vocab_size, h])? {
                Some(t) => t,
                // Some checkpoints declare untied embeddings but ship no head: use the embedding.
                None => embed_tokens.clone(),
            }
        };

        let inv_freq = rope_inv_freq(c);
        let rope_inv_freq = backend.upload_f32(&inv_freq, Shape::from([inv_freq.len()]), DType::F32)?;

        Ok(Llama { config, dtype, embed_tokens, layers, norm, lm_head, rope_inv_freq })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// A KV cache for one sequence of up to `capacity` positions (at most the model's context).
    pub fn new_kv_cache(&self, backend: &dyn Backend, capacity: usize) -> Result<KvCache> {
        let capacity = capacity.min(self.config.max_position_embeddings);
        let shape = Shape::from([capacity, self.config.n_kv_heads, self.config.head_dim]);
        let mut keys = Vec::with_capacity(self.layers.len());
        let mut values = Vec::with_capacity(self.layers.len());
        for _ in 0..self.layers.len() {
            keys.push(backend.zeros(shape.clone(), DType::F32)?);
            values.push(backend.zeros(shape.clone(), DType::F32)?);
        }
        Ok(KvCache { keys, values, capacity, len: 0 })
    }

    /// Runs `tokens` at positions `cache.len()..`, appends their keys and values to `cache`,
    /// and returns logits `[n, vocab]`: for every token when `all_logits`, else for the last.
    pub fn forward(
        &self,
        backend: &dyn Backend,
        tokens: &[u32],
        cache: &mut KvCache,
        all_logits: bool,
    ) -> Result<Tensor> {
        let c = &self.config;
        let n = tokens.len();
        let start = cache.len;
        if n == 0 {
            return Err(Error::Backend(flint_tensor::Error::ShapeMismatch {
                op: "forward",
                detail: "no tokens to run".to_string(),
            }));
        }
        if start + n > cache.capacity {
            return Err(Error::ContextOverflow { needed: start + n, capacity: cache.capacity });
        }
        let positions: Vec<u32> = (start..start + n).map(|p| p as u32).collect();
        let scale = 1.0 / (c.head_dim as f32).sqrt();
        let q_shape = Shape::from([n, c.n_heads, c.head_dim]);
        let kv_shape = Shape::from([n, c.n_kv_heads, c.head_dim]);
        let flat = |t: Tensor, shape: &Shape| {
            t.reshape(shape.clone()).ok_or_else(|| {
                Error::Backend(flint_tensor::Error::ShapeMismatch {
                    op: "forward",
                    detail: format!("reshape to {shape}"),
                })
            })
        };

        let mut residual = backend.embedding(&self.embed_tokens, tokens)?;
        let mut pending: Option<Tensor> = None;
        for (i, layer) in self.layers.iter().enumerate() {
            let normed = match pending.take() {
                None => backend.rms_norm(&residual, &layer.attn_norm, c.rms_norm_eps)?,
                Some(mlp_out) => {
                    let (sum, normed) = backend.add_rms_norm(&residual, &mlp_out, &layer.attn_norm, c.rms_norm_eps)?;
                    residual = sum;
                    normed
                }
            };
            let q = backend.linear(&normed, &layer.q_proj, layer.q_bias.as_ref())?;
            let k = backend.linear(&normed, &layer.k_proj, layer.k_bias.as_ref())?;
            let v = backend.linear(&normed, &layer.v_proj, layer.v_bias.as_ref())?;
            let q = backend.rope(&flat(q, &q_shape)?, &positions, &self.rope_inv_freq)?;
            let k = backend.rope(&flat(k, &kv_shape)?, &positions, &self.rope_inv_freq)?;
            backend.write_kv(&cache.keys[i], &k, start)?;
            backend.write_kv(&cache.values[i], &flat(v, &kv_shape)?, start)?;
            let attn = backend.attention(&q, &cache.keys[i], &cache.values[i], start, scale)?;
            let attn = flat(attn, &Shape::from([n, c.n_heads * c.head_dim]))?;
            let o = backend.linear(&attn, &layer.o_proj, None)?;

            let (sum, normed) = backend.add_rms_norm(&residual, &o, &layer.mlp_norm, c.rms_norm_eps)?;
            residual = sum;
            let gate = backend.linear(&normed, &layer.gate_proj, None)?;
            let up = backend.linear(&normed, &layer.up_proj, None)?;
            let act = backend.silu_mul(&gate, &up)?;
            pending = Some(backend.linear(&act, &layer.down_proj, None)?);
        }
        let hidden = match pending {
            Some(mlp_out) => backend.add_rms_norm(&residual, &mlp_out, &self.norm, c.rms_norm_eps)?.1,
            None => backend.rms_norm(&residual, &self.norm, c.rms_norm_eps)?,
        };
        cache.len = start + n;
        let hidden = if all_logits { hidden } else { backend.gather_rows(&hidden, &[n - 1])? };
        Ok(backend.linear(&hidden, &self.lm_head, None)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Llama3RopeScaling;

    /// Values of `transformers`' `ROPE_INIT_FUNCTIONS["llama3"]` for the Llama-3.1-8B config.
    #[test]
    fn llama3_rope_scaling_matches_transformers() {
        let json = r#"{"architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 4096,
            "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 8, "rope_theta": 500000.0, "max_position_embeddings": 131072}"#;
        let mut config = ModelConfig::from_hf_json(json, "test").expect("valid");
        config.rope_scaling = RopeScaling::Llama3(Llama3RopeScaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        });
        let inv = rope_inv_freq(&config);
        assert_eq!(inv.len(), 64);
        let want = [
            (0, 1.0),
            (10, 0.12868738174438477),
            (20, 0.016560440883040428),
            (30, 0.0013718936825171113),
            (40, 3.428102354519069e-05),
            (45, 1.2297638932068367e-05),
            (50, 4.411534519022098e-06),
            (63, 3.068925877869333e-07),
        ];
        for (i, w) in want {
            let rel = (inv[i] as f64 - w).abs() / w;
            assert!(rel < 1e-5, "inv_freq[{i}] = {} vs {w}", inv[i]);
        }
    }
}
