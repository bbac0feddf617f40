//! Command-line / environment configuration of the draft service.

use std::{net::SocketAddr, path::PathBuf};

use clap::Parser;
use specllava_service_kit::{ModelServerArgs, SessionLimits};

/// Draft service: holds the small draft model, streams token trees.
#[derive(Debug, Clone, Parser)]
#[command(name = "specllava-draft", version)]
pub struct Args {
    /// Address to listen on.
    #[arg(long, env = "SPECLLAVA_LISTEN", default_value = "0.0.0.0:50051")]
    pub listen: SocketAddr,
    /// LLaVA draft model directory (HF format).
    #[arg(long, env = "SPECLLAVA_MODEL_DIR", default_value = "models/draft")]
    pub model_dir: PathBuf,
    /// KV memory budget of all sessions, in MiB (over it evicts the least recently used).
    #[arg(long, env = "SPECLLAVA_KV_BUDGET_MB", default_value_t = 2048)]
    pub kv_budget_mb: usize,
    /// Longest wait for other sessions' requests before drafting, in microseconds.
    #[arg(long, env = "SPECLLAVA_MAX_BATCH_WAIT_US", default_value_t = 200)]
    pub max_batch_wait_us: u64,
    /// Maximum sessions drafted together (one batched forward per level).
    #[arg(long, env = "SPECLLAVA_MAX_BATCH_SESSIONS", default_value_t = 64)]
    pub max_batch_sessions: usize,
    /// Maximum tree depth D a request may ask for.
    #[arg(long, env = "SPECLLAVA_MAX_DEPTH", default_value_t = 16)]
    pub max_depth: usize,
    /// Maximum branching K a request may ask for.
    #[arg(long, env = "SPECLLAVA_MAX_BRANCHING", default_value_t = 16)]
    pub max_branching: usize,
    /// Maximum node budget M a request may ask for.
    #[arg(long, env = "SPECLLAVA_MAX_BUDGET", default_value_t = 255)]
    pub max_budget: usize,
    /// Pre-draft each session's likely next tree in spare time while the target verifies
    /// (draft-ahead), for requests that ask for it. `--draft-ahead false` turns it off.
    #[arg(long, env = "SPECLLAVA_DRAFT_AHEAD", default_value_t = true, action = clap::ArgAction::Set)]
    pub draft_ahead: bool,
    /// Flags shared with the target service.
    #[command(flatten)]
    pub server: ModelServerArgs,
}

impl Args {
    /// Session store limits from the flags.
    pub fn session_limits(&self) -> SessionLimits {
        self.server.session_limits(self.kv_budget_mb)
    }
}
