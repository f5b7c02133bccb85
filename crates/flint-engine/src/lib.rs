//! Flint's engine: what turns a request into text.
//!
//! - [`Tokenizer`]: `tokenizer.json` or GGUF metadata through the `tokenizers` crate, with the
//!   model's special tokens and [`ChatTemplate`];
//! - [`StreamDecoder`]: incremental detokenization that never emits half a character;
//! - [`Sampler`]: penalties, temperature, top-k, top-p, min-p, seeded;
//! - [`StopMatcher`]: stop strings over streamed text;
//! - [`BlockManager`]: the paged KV cache's blocks, reference counts and prefix reuse;
//! - [`Scheduler`]: continuous batching with chunked prefill and recompute preemption;
//! - [`Engine`]: loads a model on a backend, prepares [`GenerateRequest`]s and runs them.

pub mod accuracy;
mod blocks;
mod chat;
mod detok;
mod error;
mod generate;
mod sampler;
mod scheduler;
mod stop;
mod tokenizer;

pub use blocks::{BlockHash, BlockManager, block_hash};
pub use chat::{ChatMessage, ChatTemplate};
pub use detok::StreamDecoder;
pub use error::{Error, Result};
pub use generate::{
    DEFAULT_BLOCK_SIZE, Engine, Executor, FinishReason, GenerateRequest, Generation, KvStore, MAX_TOP_LOGPROBS, Prompt,
    Runtime, Submitted, Timings,
};
pub use sampler::{Sampler, SamplingParams, argmax};
pub use scheduler::{
    PreparedRequest, Scheduler, SchedulerConfig, SchedulerStats, Sink, StreamEvent, TokenLogprob, Usage,
};
pub use stop::{StopMatcher, StopScan};
pub use tokenizer::Tokenizer;
