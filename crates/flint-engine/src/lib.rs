//! Flint's engine: what turns a request into text.
//!
//! - [`Tokenizer`]: `tokenizer.json` or GGUF metadata through the `tokenizers` crate, with the
//!   model's special tokens and [`ChatTemplate`];
//! - [`StreamDecoder`]: incremental detokenization that never emits half a character;
//! - [`Sampler`]: penalties, temperature, top-k, top-p, min-p, seeded;
//! - [`StopMatcher`]: stop strings over streamed text;
//! - [`Engine`]: loads a model on a backend and runs [`GenerateRequest`]s.

mod chat;
mod detok;
mod error;
mod generate;
mod sampler;
mod stop;
mod tokenizer;

pub use chat::{ChatMessage, ChatTemplate};
pub use detok::StreamDecoder;
pub use error::{Error, Result};
pub use generate::{Engine, FinishReason, GenerateRequest, Generation, Prompt, Timings};
pub use sampler::{Sampler, SamplingParams, argmax};
pub use stop::{StopMatcher, StopScan};
pub use tokenizer::Tokenizer;
