//! The server's errors, and the one place engine and server errors become gRPC statuses.

use tonic::{Code, Status};

/// Errors of the serving shell.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field is wrong; the message names the field.
    #[error("{0}")]
    InvalidArgument(String),

    /// The prompt or the requested output does not fit the model's context.
    #[error("{0}")]
    OutOfRange(String),

    #[error("the server is shutting down")]
    ShuttingDown,

    #[error("the request's deadline passed")]
    DeadlineExceeded,

    #[error("missing or wrong bearer token")]
    Unauthenticated,

    #[error(transparent)]
    Engine(flint_engine::Error),

    #[error("cannot start the server: {0}")]
    Startup(String),
}

/// `Result` with this crate's [`Error`] as the default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        use flint_engine::Error as E;
        let code = match &e {
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::OutOfRange(_) => Code::OutOfRange,
            Error::ShuttingDown => Code::Unavailable,
            Error::DeadlineExceeded => Code::DeadlineExceeded,
            Error::Unauthenticated => Code::Unauthenticated,
            Error::Startup(_) => Code::Internal,
            Error::Engine(inner) => match inner {
                E::InvalidRequest(_) | E::ChatTemplate(_) => Code::InvalidArgument,
                E::PromptTooLong { .. } => Code::OutOfRange,
                E::Overloaded(_) => Code::ResourceExhausted,
                E::Tokenizer(_) | E::Model(_) | E::Backend(_) | E::Device(_) | E::Internal(_) => Code::Internal,
            },
        };
        Status::new(code, e.to_string())
    }
}
