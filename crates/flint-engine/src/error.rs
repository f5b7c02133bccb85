//! Errors of the engine: bad requests, tokenizer and template failures, model failures.

/// Errors raised while preparing and running a generation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request itself is wrong; the message names the field.
    #[error("invalid request: {0}")]
    InvalidRequest(String),

    /// The prompt does not fit the model's context.
    #[error(
        "prompt of {prompt_tokens} tokens does not fit the context of {context} tokens (at least one new token must fit)"
    )]
    PromptTooLong { prompt_tokens: usize, context: usize },

    /// The engine is at capacity; try again later.
    #[error("overloaded: {0}")]
    Overloaded(String),

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("chat template: {0}")]
    ChatTemplate(String),

    #[error(transparent)]
    Model(#[from] flint_model::Error),

    #[error(transparent)]
    Backend(#[from] flint_tensor::Error),

    /// The GPU runtime failed (driver, kernel, out of memory).
    #[error("device: {0}")]
    Device(String),

    /// A broken invariant inside the engine.
    #[error("internal error: {0}")]
    Internal(String),
}

/// `Result` with this crate's [`Error`] as the default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;
