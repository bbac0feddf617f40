//! The crate's error type.
//!
//! Errors fall into two families that services map differently: problems with a request
//! (bad image, bad tree, unknown token: `INVALID_ARGUMENT`) and problems with the model or the
//! machine (missing checkpoint file, inconsistent config, tensor failure: `INTERNAL` or a start-up
//! failure). [`ModelError::is_invalid_input`] tells them apart and [`ModelError::error_type`]
//! gives a short stable label for metrics.

use std::path::PathBuf;

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    // ---- invalid input (the caller's fault) ----
    /// The image bytes could not be decoded.
    #[error("invalid image: {0}")]
    InvalidImage(String),
    /// The image exceeds the configured byte or pixel limit.
    #[error("image too large: {0}")]
    ImageTooLarge(String),
    /// A token tree is malformed (length mismatch, parent out of range, not topological...).
    #[error("invalid tree: {0}")]
    InvalidTree(String),
    /// A token id outside the vocabulary.
    #[error("unknown token id {id} (vocabulary size {vocab_size})")]
    UnknownToken {
        /// The offending id.
        id: u32,
        /// The model's vocabulary size.
        vocab_size: usize,
    },
    /// Any other malformed request (image count mismatch, bad commit path, bad rollback...).
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
    /// The configuration is inconsistent or unsupported (also with respect to the weights).
    #[error("invalid model config: {0}")]
    Config(String),
    /// A tensor the architecture needs is not in the checkpoint.
    #[error("missing tensor {name} in checkpoint {}", dir.display())]
    MissingTensor {
        /// The tensor name (as looked up, in the checkpoint's layout).
        name: String,
        /// The checkpoint directory.
        dir: PathBuf,
    },
    /// The tokenizer failed.
    #[error("tokenizer error: {0}")]
    Tokenizer(String),

    // ---- internal ----
    /// A tensor operation failed.
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
    /// An I/O operation failed.
    #[error("io error: {0}")]
    Io(#[from] std::io::Error),
}

impl ModelError {
    /// True when the error is caused by the request (maps to gRPC `INVALID_ARGUMENT`);
    /// false for checkpoint and internal errors.
    pub fn is_invalid_input(&self) -> bool {
        matches!(
            self,
            ModelError::InvalidImage(_)
                | ModelError::ImageTooLarge(_)
                | ModelError::InvalidTree(_)
                | ModelError::UnknownToken { .. }
                | ModelError::InvalidInput(_)
        )
    }

    /// A short stable label for metrics (`errors_total{type=...}`).
    pub fn error_type(&self) -> &'static str {
        match self {
            ModelError::InvalidImage(_) => "invalid_image",
            ModelError::ImageTooLarge(_) => "image_too_large",
            ModelError::InvalidTree(_) => "invalid_tree",
            ModelError::UnknownToken { .. } => "unknown_token",
            ModelError::InvalidInput(_) => "invalid_input",
            ModelError::MissingFile { .. } => "missing_file",
            ModelError::BadFile { .. } => "bad_file",
            ModelError::Config(_) => "config",
            ModelError::MissingTensor { .. } => "missing_tensor",
            ModelError::Tokenizer(_) => "tokenizer",
            ModelError::Candle(_) => "tensor",
            ModelError::Io(_) => "io",
        }
    }

    /// A file at `path` that cannot be read, parsed or written, and why.
    pub fn bad_file(path: impl Into<PathBuf>, reason: impl ToString) -> Self {
        ModelError::BadFile {
            path: path.into(),
            reason: reason.to_string(),
        }
    }
}

impl From<specllava_prompt::PromptError> for ModelError {
    /// The same problem under this crate's error (variant for variant).
    fn from(e: specllava_prompt::PromptError) -> Self {
        use specllava_prompt::PromptError as P;
        match e {
            P::InvalidImage(m) => ModelError::InvalidImage(m),
            P::ImageTooLarge(m) => ModelError::ImageTooLarge(m),
            P::InvalidInput(m) => ModelError::InvalidInput(m),
            P::MissingFile { path, what } => ModelError::MissingFile { path, what },
            P::BadFile { path, reason } => ModelError::BadFile { path, reason },
            P::Config(m) => ModelError::Config(m),
            P::Tokenizer(m) => ModelError::Tokenizer(m),
        }
    }
}

/// Shorthand for this crate's results.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;
