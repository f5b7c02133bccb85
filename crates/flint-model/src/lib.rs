//! Models for Flint: configs, checkpoint readers and architectures.
//!
//! - [`gguf`]: a memory-mapped GGUF v2/v3 reader;
//! - [`ModelSource`]: a GGUF file or a Hugging Face safetensors directory, yielding a validated
//!   [`ModelConfig`] and weights under Hugging Face names;
//! - [`Llama`]: the Llama family's forward pass over any `flint_tensor::Backend`: batched over
//!   sequences ([`ForwardBatch`]) with a [`PagedKvCache`], or one sequence with a [`KvCache`].

mod config;
pub mod cuda;
mod draw;
mod error;
pub mod fp8_checkpoint;
pub mod gguf;
mod llama;
pub mod quant;
pub mod remote;
mod shard;
mod source;
pub mod tp;

pub use config::{Architecture, Llama3RopeScaling, ModelConfig, RopeScaling};
pub use draw::{Draw, MAX_DRAW_VOCAB, apply_draws, argmax, by_logit, drawn_output_len};
pub use error::{Error, Result};
pub use llama::{
    ForwardBatch, Fp8Spec, KvCache, Llama, LoadProgress, Logits, MAX_CANDIDATES, PagedKvCache, StageInput, StageOutput,
    candidate_pairs, merge_candidates, rope_inv_freq, top_candidates,
};
pub use shard::Shard;
pub use source::{HostTensor, ModelSource, SafetensorsDir, StoredTensor};
pub use tp::{RankInfo, RankModel, StepTicket, TpGroup};
