//! Command-line / environment configuration of the draft service.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Parser;
use specllava_service_kit::SessionLimits;

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
    /// Device: `cpu` or `cuda` (or `cuda:N`).
    #[arg(long, env = "SPECLLAVA_DEVICE", default_value = "cpu")]
    pub device: String,
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
    /// Maximum live sessions (more evicts the least recently used).
    #[arg(long, env = "SPECLLAVA_MAX_SESSIONS", default_value_t = 256)]
    pub max_sessions: usize,
    /// KV memory budget of all sessions, in MiB (over it evicts the least recently used).
    #[arg(long, env = "SPECLLAVA_KV_BUDGET_MB", default_value_t = 2048)]
    pub kv_budget_mb: usize,
    /// Sessions unused this long are dropped, in seconds.
    #[arg(long, env = "SPECLLAVA_SESSION_TTL_S", default_value_t = 600)]
    pub session_ttl_s: u64,
    /// Capacity of the model worker's queue (full answers RESOURCE_EXHAUSTED).
    #[arg(long, env = "SPECLLAVA_QUEUE_CAPACITY", default_value_t = 1024)]
    pub queue_capacity: usize,
    /// Maximum encoded image size, in bytes.
    #[arg(long, env = "SPECLLAVA_MAX_IMAGE_BYTES", default_value_t = 20 * 1024 * 1024)]
    pub max_image_bytes: usize,
    /// Maximum decoded image size, in pixels.
    #[arg(long, env = "SPECLLAVA_MAX_IMAGE_PIXELS", default_value_t = 40_000_000)]
    pub max_image_pixels: u64,
    /// Maximum context (KV rows + tree depth) of a session; 0 = the model's
    /// `max_position_embeddings`.
    #[arg(long, env = "SPECLLAVA_MAX_CONTEXT", default_value_t = 0)]
    pub max_context: usize,
    /// Serve Prometheus metrics at `GET /metrics` on this address (e.g. `0.0.0.0:9090`,
    /// or `127.0.0.1:0` for any free port). Unset: no metrics endpoint.
    #[arg(long, env = "SPECLLAVA_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Log one JSON object per line.
    #[arg(long, env = "SPECLLAVA_LOG_JSON")]
    pub log_json: bool,
}

impl Args {
    /// Session store limits from the flags.
    pub fn session_limits(&self) -> SessionLimits {
        SessionLimits {
            max_sessions: self.max_sessions,
            max_bytes: self.kv_budget_mb.saturating_mul(1024 * 1024),
            ttl: Duration::from_secs(self.session_ttl_s),
        }
    }
}
