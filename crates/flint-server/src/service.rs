//! The `flint.v1.Inference` service: validates requests, hands them to the worker and streams
//! the results back.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use flint_engine::{
    ChatMessage, Engine, FinishReason, GenerateRequest, Prompt, SamplingParams, SchedulerConfig, StreamEvent,
};
use flint_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::worker::{CancelOnDrop, Worker};
use crate::{Error, Result};

/// Longest prompt text accepted, in bytes, before tokenizing: a bound on the work a single
/// request can cause. Token limits are checked after tokenizing.
pub const MAX_PROMPT_BYTES: usize = 4 << 20;

/// Shared state of the service.
#[derive(Debug)]
pub struct Service {
    engine: Arc<Engine>,
    worker: Worker,
    draining: Arc<AtomicBool>,
    model_name: String,
    kv_cache_tokens: u64,
    max_batch_tokens: u32,
    max_running: u32,
    next_id: AtomicU64,
}

impl Service {
    pub(crate) fn new(
        engine: Arc<Engine>,
        worker: Worker,
        draining: Arc<AtomicBool>,
        model_name: String,
        scheduler: &SchedulerConfig,
    ) -> Self {
        Service {
            engine,
            worker,
            draining,
            model_name,
            kv_cache_tokens: (scheduler.n_blocks * scheduler.block_size) as u64,
            max_batch_tokens: scheduler.max_batch_tokens as u32,
            max_running: scheduler.max_running as u32,
            next_id: AtomicU64::new(1),
        }
    }
}

fn messages_of(list: Vec<pb::ChatMessage>) -> Result<Vec<ChatMessage>> {
    list.into_iter()
        .enumerate()
        .map(|(i, m)| {
            if m.role.is_empty() {
                return Err(Error::InvalidArgument(format!("messages[{i}].role must not be empty")));
            }
            Ok(ChatMessage::new(m.role, m.content))
        })
        .collect()
}

fn sampling_of(s: Option<pb::SamplingParams>) -> SamplingParams {
    let s = s.unwrap_or_default();
    SamplingParams {
        temperature: s.temperature,
        top_k: s.top_k as usize,
        top_p: s.top_p.unwrap_or(1.0),
        min_p: s.min_p,
        repetition_penalty: s.repetition_penalty.unwrap_or(1.0),
        frequency_penalty: s.frequency_penalty,
        presence_penalty: s.presence_penalty,
        seed: s.seed,
    }
}

/// Checks what can be checked before tokenizing, and builds the engine's request.
fn request_of(r: pb::GenerateRequest) -> Result<GenerateRequest> {
    let set = [!r.prompt.is_empty(), !r.messages.is_empty(), !r.prompt_token_ids.is_empty()];
    let n_set = set.iter().filter(|&&b| b).count();
    if n_set != 1 {
        return Err(Error::InvalidArgument(format!(
            "exactly one of prompt, messages or prompt_token_ids must be set, got {n_set}"
        )));
    }
    if r.max_tokens == 0 {
        return Err(Error::InvalidArgument("max_tokens must be at least 1".to_string()));
    }
    let prompt_bytes = r.prompt.len() + r.messages.iter().map(|m| m.content.len() + m.role.len()).sum::<usize>();
    if prompt_bytes > MAX_PROMPT_BYTES {
        return Err(Error::OutOfRange(format!(
            "prompt of {prompt_bytes} bytes is longer than the limit of {MAX_PROMPT_BYTES} bytes"
        )));
    }
    if r.stop.iter().any(String::is_empty) {
        return Err(Error::InvalidArgument("stop strings must not be empty".to_string()));
    }
    if r.top_logprobs as usize > flint_engine::MAX_TOP_LOGPROBS {
        return Err(Error::InvalidArgument(format!(
            "top_logprobs must be at most {}, got {}",
            flint_engine::MAX_TOP_LOGPROBS,
            r.top_logprobs
        )));
    }
    let prompt = if !r.prompt.is_empty() {
        Prompt::Raw(r.prompt)
    } else if !r.messages.is_empty() {
        Prompt::Chat(messages_of(r.messages)?)
    } else {
        Prompt::TokenIds(r.prompt_token_ids)
    };
    let sampling = sampling_of(r.sampling);
    sampling.validate().map_err(|e| Error::InvalidArgument(format!("sampling.{}", strip_prefix(&e.to_string()))))?;
    Ok(GenerateRequest {
        prompt,
        max_tokens: r.max_tokens as usize,
        sampling,
        stop: r.stop,
        ignore_eos: r.ignore_eos,
        logprobs: (r.logprobs || r.top_logprobs > 0).then_some(r.top_logprobs as usize),
    })
}

fn strip_prefix(message: &str) -> &str {
    message.strip_prefix("invalid request: ").unwrap_or(message)
}

/// The `grpc-timeout` header as a duration (`<digits><unit>`, units H M S m u n).
fn grpc_timeout<T>(request: &Request<T>) -> Option<Duration> {
    let value = request.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

fn finish_reason_of(r: &FinishReason) -> pb::FinishReason {
    match r {
        FinishReason::Stop => pb::FinishReason::Stop,
        FinishReason::Length => pb::FinishReason::Length,
        FinishReason::Cancelled => pb::FinishReason::Cancelled,
    }
}

/// The response stream of one Generate call. Dropping it (the client went away) cancels the
/// request; its deadline, if any, ends it with DEADLINE_EXCEEDED.
pub struct GenerateStream {
    events: mpsc::UnboundedReceiver<StreamEvent>,
    request_id: String,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    cancel: CancelOnDrop,
    submitted: Instant,
    first_token: Option<Instant>,
    done: bool,
    span: tracing::Span,
}

impl std::fmt::Debug for GenerateStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GenerateStream").field("request_id", &self.request_id).finish()
    }
}

impl Stream for GenerateStream {
    type Item = std::result::Result<pb::GenerateResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let span = self.span.clone();
        let _entered = span.enter();
        if self.done {
            return Poll::Ready(None);
        }
        if let Some(deadline) = self.deadline.as_mut()
            && deadline.as_mut().poll(cx).is_ready()
        {
            self.done = true;
            self.cancel.0.store(true, Ordering::Relaxed);
            metrics::counter!("flint_requests_total", "outcome" => "deadline_exceeded").increment(1);
            return Poll::Ready(Some(Err(Error::DeadlineExceeded.into())));
        }
        let event = match self.events.poll_recv(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(None) => {
                self.done = true;
                return Poll::Ready(Some(Err(Status::internal("the engine dropped the request"))));
            }
            Poll::Ready(Some(event)) => event,
        };
        let request_id = self.request_id.clone();
        Poll::Ready(Some(match event {
            StreamEvent::Delta { text, token_ids, logprobs } => {
                if self.first_token.is_none() {
                    let now = Instant::now();
                    metrics::histogram!("flint_time_to_first_token_seconds")
                        .record((now - self.submitted).as_secs_f64());
                    self.first_token = Some(now);
                }
                metrics::counter!("flint_generation_tokens_total").increment(token_ids.len() as u64);
                Ok(pb::GenerateResponse {
                    text,
                    token_ids,
                    logprobs: logprobs
                        .into_iter()
                        .map(|l| pb::TokenLogprob {
                            token_id: l.token_id,
                            logprob: l.logprob,
                            top: l
                                .top
                                .into_iter()
                                .map(|(token_id, logprob)| pb::TopLogprob { token_id, logprob })
                                .collect(),
                        })
                        .collect(),
                    request_id,
                    ..Default::default()
                })
            }
            StreamEvent::Finished { reason, stop_string, usage, seed, decode_s, .. } => {
                self.done = true;
                if usage.completion_tokens > 1 {
                    metrics::histogram!("flint_time_per_output_token_seconds")
                        .record(decode_s / (usage.completion_tokens - 1) as f64);
                }
                metrics::counter!("flint_prompt_tokens_total").increment(usage.prompt_tokens as u64);
                let outcome = match reason {
                    FinishReason::Stop => "stop",
                    FinishReason::Length => "length",
                    FinishReason::Cancelled => "cancelled",
                };
                metrics::counter!("flint_requests_total", "outcome" => outcome).increment(1);
                tracing::info!(
                    prompt_tokens = usage.prompt_tokens,
                    completion_tokens = usage.completion_tokens,
                    finish = outcome,
                    "request finished"
                );
                Ok(pb::GenerateResponse {
                    finish_reason: finish_reason_of(&reason) as i32,
                    stop_string: stop_string.unwrap_or_default(),
                    usage: Some(pb::Usage {
                        prompt_tokens: usage.prompt_tokens as u32,
                        completion_tokens: usage.completion_tokens as u32,
                    }),
                    request_id,
                    seed,
                    ..Default::default()
                })
            }
            StreamEvent::Error(message) => {
                self.done = true;
                metrics::counter!("flint_requests_total", "outcome" => "error").increment(1);
                Err(Status::internal(message))
            }
        }))
    }
}

#[tonic::async_trait]
impl pb::inference_server::Inference for Service {
    type GenerateStream = GenerateStream;

    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> std::result::Result<Response<GenerateStream>, Status> {
        if self.draining.load(Ordering::Relaxed) {
            return Err(Error::ShuttingDown.into());
        }
        let submitted = Instant::now();
        let timeout = grpc_timeout(&request);
        let mut body = request.into_inner();
        let request_id = if body.request_id.is_empty() {
            format!("req-{}", self.next_id.fetch_add(1, Ordering::Relaxed))
        } else {
            std::mem::take(&mut body.request_id)
        };
        let span = tracing::info_span!("generate", request_id = %request_id);
        let generate = request_of(body)?;
        let engine = Arc::clone(&self.engine);
        let max_tokens = generate.max_tokens;
        // Tokenizing a long prompt is real work: keep it off the async threads.
        let prepared = tokio::task::spawn_blocking(move || engine.prepare(&generate))
            .await
            .map_err(|e| Status::internal(format!("tokenizer task failed: {e}")))?
            .map_err(Error::Engine)?;
        let context = self.engine.context_len();
        if prepared.prompt_ids.len() + max_tokens > context {
            return Err(Error::OutOfRange(format!(
                "max_tokens: a prompt of {} tokens plus {max_tokens} new tokens exceeds the context of {context} tokens",
                prepared.prompt_ids.len()
            ))
            .into());
        }
        let (tx, events) = mpsc::unbounded_channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let sink = Box::new(move |event: StreamEvent| tx.send(event).is_ok());
        self.worker.submit(prepared, sink, Arc::clone(&cancel)).await?;
        let deadline = timeout.map(|t| Box::pin(tokio::time::sleep(t.saturating_sub(submitted.elapsed()))));
        Ok(Response::new(GenerateStream {
            events,
            request_id,
            deadline,
            cancel: CancelOnDrop(cancel),
            submitted,
            first_token: None,
            done: false,
            span,
        }))
    }

    async fn tokenize(
        &self,
        request: Request<pb::TokenizeRequest>,
    ) -> std::result::Result<Response<pb::TokenizeResponse>, Status> {
        let body = request.into_inner();
        if body.text.is_empty() == body.messages.is_empty() {
            return Err(Error::InvalidArgument("exactly one of text or messages must be set".to_string()).into());
        }
        if body.text.len() > MAX_PROMPT_BYTES {
            return Err(Error::OutOfRange(format!("text is longer than {MAX_PROMPT_BYTES} bytes")).into());
        }
        let engine = Arc::clone(&self.engine);
        let messages = messages_of(body.messages)?;
        let text = body.text;
        let result = tokio::task::spawn_blocking(move || -> flint_engine::Result<pb::TokenizeResponse> {
            if messages.is_empty() {
                Ok(pb::TokenizeResponse { token_ids: engine.prompt_ids(&Prompt::Raw(text))?, rendered: String::new() })
            } else {
                let rendered = engine.tokenizer().apply_chat_template(&messages)?;
                Ok(pb::TokenizeResponse { token_ids: engine.prompt_ids(&Prompt::Chat(messages))?, rendered })
            }
        })
        .await
        .map_err(|e| Status::internal(format!("tokenizer task failed: {e}")))?
        .map_err(Error::Engine)?;
        Ok(Response::new(result))
    }

    async fn model_info(
        &self,
        _request: Request<pb::ModelInfoRequest>,
    ) -> std::result::Result<Response<pb::ModelInfoResponse>, Status> {
        let c = self.engine.config();
        Ok(Response::new(pb::ModelInfoResponse {
            model: self.model_name.clone(),
            architecture: c.architecture.as_str().to_string(),
            vocab_size: c.vocab_size as u32,
            context_length: self.engine.context_len() as u32,
            device: self.engine.device(),
            dtype: self.engine.dtype().to_string(),
            kv_cache_tokens: self.kv_cache_tokens,
            max_batch_tokens: self.max_batch_tokens,
            max_running: self.max_running,
        }))
    }
}
