//! One generation from prompt to finish: tokenize (chat template or raw), prefill, decode with
//! sampling, stream text, stop on EOS, stop strings or the token limit.

use std::time::Instant;

use flint_model::{Llama, ModelConfig, ModelSource};
use flint_tensor::{Backend, DType};
use serde::Serialize;

use crate::detok::StreamDecoder;
use crate::sampler::{Sampler, SamplingParams};
use crate::stop::StopMatcher;
use crate::{ChatMessage, Error, Result, Tokenizer};

/// What to generate from.
#[derive(Clone, Debug)]
pub enum Prompt {
    /// Text used as is (a BOS is added when the tokenizer adds one).
    Raw(String),
    /// A conversation rendered through the model's chat template.
    Chat(Vec<ChatMessage>),
    /// Token ids used as is.
    TokenIds(Vec<u32>),
}

/// A generation request.
#[derive(Clone, Debug)]
pub struct GenerateRequest {
    pub prompt: Prompt,
    /// Most new tokens to generate (at least 1).
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation ends before the first occurrence of any of these strings.
    pub stop: Vec<String>,
    /// Keep going past end-of-sequence tokens.
    pub ignore_eos: bool,
}

impl GenerateRequest {
    pub fn new(prompt: Prompt) -> Self {
        GenerateRequest {
            prompt,
            max_tokens: 256,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            ignore_eos: false,
        }
    }
}

/// Why generation ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` reached, or the context is full.
    Length,
}

/// The result of a generation.
#[derive(Clone, Debug, Serialize)]
pub struct Generation {
    /// Generated text, without the stop string or EOS that ended it.
    pub text: String,
    /// Generated ids, including the EOS token when one ended the generation.
    pub token_ids: Vec<u32>,
    pub prompt_token_ids: Vec<u32>,
    pub finish_reason: FinishReason,
    /// The stop string that ended generation, if one did.
    pub stop_string: Option<String>,
    /// The sampling seed used.
    pub seed: u64,
    pub timings: Timings,
}

/// Wall-clock timings of one generation.
#[derive(Clone, Debug, Serialize)]
pub struct Timings {
    pub prefill_ms: f64,
    /// Time from the first to the last generated token.
    pub decode_ms: f64,
    /// Tokens generated after the first, per second of decode time.
    pub decode_tokens_per_s: f64,
    pub prompt_tokens_per_s: f64,
}

/// A model, its tokenizer and the backend it runs on: everything needed to generate.
#[derive(Debug)]
pub struct Engine {
    backend: Box<dyn Backend>,
    model: Llama,
    tokenizer: Tokenizer,
}

impl Engine {
    /// Loads the checkpoint at `source` onto `backend`.
    pub fn load(
        source: &ModelSource,
        backend: Box<dyn Backend>,
        dtype: DType,
        progress: &mut dyn FnMut(flint_model::LoadProgress),
    ) -> Result<Self> {
        let config = source.config()?;
        let tokenizer = Tokenizer::for_source(source, &config)?;
        let model = Llama::load(source, config, backend.as_ref(), dtype, progress)?;
        Ok(Engine { backend, model, tokenizer })
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn config(&self) -> &ModelConfig {
        self.model.config()
    }

    pub fn backend(&self) -> &dyn Backend {
        self.backend.as_ref()
    }

    pub fn model(&self) -> &Llama {
        &self.model
    }

    /// Token ids of a prompt, as generation would feed them.
    pub fn prompt_ids(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        let ids = match prompt {
            Prompt::Raw(text) => self.tokenizer.encode(text, true)?,
            Prompt::Chat(messages) => {
                if messages.is_empty() {
                    return Err(Error::InvalidRequest("messages must not be empty".to_string()));
                }
                let text = self.tokenizer.apply_chat_template(messages)?;
                self.tokenizer.encode(&text, false)?
            }
            Prompt::TokenIds(ids) => {
                let vocab = self.config().vocab_size;
                if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
                    return Err(Error::InvalidRequest(format!(
                        "prompt_token_ids: id {bad} is outside the vocabulary of {vocab}"
                    )));
                }
                ids.clone()
            }
        };
        if ids.is_empty() {
            return Err(Error::InvalidRequest("prompt is empty".to_string()));
        }
        Ok(ids)
    }

    /// Generates for `request`, calling `on_text` with each new piece of text as it is decoded.
    pub fn generate(&self, request: &GenerateRequest, on_text: &mut dyn FnMut(&str)) -> Result<Generation> {
        if request.max_tokens == 0 {
            return Err(Error::InvalidRequest("max_tokens must be at least 1".to_string()));
        }
        let prompt_ids = self.prompt_ids(&request.prompt)?;
        let context = self.config().max_position_embeddings;
        if prompt_ids.len() >= context {
            return Err(Error::PromptTooLong { prompt_tokens: prompt_ids.len(), context });
        }
        let mut sampler = Sampler::new(request.sampling.clone(), &prompt_ids)?;
        let max_new = request.max_tokens.min(context - prompt_ids.len());
        let backend = self.backend.as_ref();
        let mut cache = self.model.new_kv_cache(backend, prompt_ids.len() + max_new)?;
        let mut decoder = StreamDecoder::new();
        let mut stops = StopMatcher::new(&request.stop);
        let stop_ids = self.tokenizer.stop_ids();

        let mut text = String::new();
        let mut token_ids = Vec::new();
        let mut finish_reason = FinishReason::Length;
        let mut stop_string = None;

        let started = Instant::now();
        let mut logits = self.model.forward(backend, &prompt_ids, &mut cache, false)?;
        let prefill = started.elapsed();
        let decode_started = Instant::now();
        loop {
            let mut row = backend.to_f32_vec(&logits)?;
            let token = sampler.sample(&mut row)?;
            token_ids.push(token);
            if !request.ignore_eos && stop_ids.contains(&token) {
                finish_reason = FinishReason::Stop;
                break;
            }
            let piece = decoder.push(&self.tokenizer, token)?;
            let scan = stops.push(&piece);
            if !scan.emit.is_empty() {
                on_text(&scan.emit);
                text.push_str(&scan.emit);
            }
            if scan.matched.is_some() {
                finish_reason = FinishReason::Stop;
                stop_string = scan.matched;
                break;
            }
            if token_ids.len() >= max_new {
                break;
            }
            logits = self.model.forward(backend, &[token], &mut cache, false)?;
        }
        if stop_string.is_none() {
            let tail = decoder.finish(&self.tokenizer)?;
            let scan = stops.push(&tail);
            let mut rest = scan.emit;
            if scan.matched.is_some() {
                finish_reason = FinishReason::Stop;
                stop_string = scan.matched;
            } else {
                rest.push_str(&stops.finish());
            }
            if !rest.is_empty() {
                on_text(&rest);
                text.push_str(&rest);
            }
        }
        let decode = decode_started.elapsed();
        let decode_ms = decode.as_secs_f64() * 1e3;
        let decoded_after_first = token_ids.len().saturating_sub(1);
        Ok(Generation {
            text,
            token_ids,
            prompt_token_ids: prompt_ids.clone(),
            finish_reason,
            stop_string,
            seed: sampler.seed(),
            timings: Timings {
                prefill_ms: prefill.as_secs_f64() * 1e3,
                decode_ms,
                decode_tokens_per_s: if decode_ms > 0.0 {
                    decoded_after_first as f64 / decode.as_secs_f64()
                } else {
                    0.0
                },
                prompt_tokens_per_s: prompt_ids.len() as f64 / prefill.as_secs_f64().max(1e-9),
            },
        })
    }
}
