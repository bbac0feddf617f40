//! The crate's error type: a bad request (image, messages) or a bad checkpoint file.

use std::path::PathBuf;

/// Everything that can go wrong while building or checking a prompt.
#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    // ---- invalid input (the caller's fault) ----
    /// The image bytes could not be decoded.
    #[error("invalid image: {0}")]
    InvalidImage(String),
    /// The image exceeds the configured byte or pixel limit.
    #[error("image too large: {0}")]
    ImageTooLarge(String),
    /// The messages cannot be rendered (e.g. a role the chat template refuses).
    #[error("invalid input: {0}")]
    InvalidInput(String),

    // ---- checkpoint problems (the deployment's fault) ----
    /// A required file of the checkpoint is absent.
    #[error("missing file {}: {what}", path.display())]
    MissingFile {
        /// The path that was looked for.
        path: PathBuf,
        /// What the file is for.
        what: String,
    },
    /// A file exists but cannot be read or parsed.
    #[error("bad file {}: {reason}", path.display())]
    BadFile {
        /// The file.
        path: PathBuf,
        /// Why it was rejected.
        reason: String,
    },
    /// The chat template is unusable.
    #[error("invalid model config: {0}")]
    Config(String),
    /// The tokenizer failed.
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
}

impl PromptError {
    /// True when the error is caused by the request (gRPC `INVALID_ARGUMENT`, HTTP 400).
    pub fn is_invalid_input(&self) -> bool {
        matches!(
            self,
            PromptError::InvalidImage(_)
                | PromptError::ImageTooLarge(_)
                | PromptError::InvalidInput(_)
        )
    }

    /// A file at `path` that cannot be read or parsed, and why.
    pub fn bad_file(path: impl Into<PathBuf>, reason: impl ToString) -> Self {
        PromptError::BadFile {
            path: path.into(),
            reason: reason.to_string(),
        }
    }
}

/// Shorthand for this crate's results.
pub type Result<T, E = PromptError> = std::result::Result<T, E>;
