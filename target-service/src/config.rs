//! Command-line / environment configuration of the target service.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Parser;
use specllava_service_kit::SessionLimits;

/// Target service: holds the large model, verifies token trees in batches.
#[derive(Debug, Clone, Parser)]
#[command(name = "specllava-target", version)]
pub struct Args {
    /// Address to listen on.
    #[arg(long, env = "SPECLLAVA_LISTEN", default_value = "0.0.0.0:50052")]
    pub listen: SocketAddr,
    /// LLaVA model directory (HF format).
    #[arg(long, env = "SPECLLAVA_MODEL_DIR", default_value = "models/target")]
    pub model_dir: PathBuf,
    /// Device: `cpu` or `cuda` (or `cuda:N`).
    #[arg(long, env = "SPECLLAVA_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Maximum tree nodes of all sessions in one batched forward.
    #[arg(long, env = "SPECLLAVA_MAX_BATCH_NODES", default_value_t = 512)]
    pub max_batch_nodes: usize,
    /// Longest wait for more requests before running a batch, in microseconds.
    #[arg(long, env = "SPECLLAVA_MAX_BATCH_WAIT_US", default_value_t = 500)]
    pub max_batch_wait_us: u64,
    /// Maximum nodes in one tree.
    #[arg(long, env = "SPECLLAVA_MAX_TREE_NODES", default_value_t = 256)]
    pub max_tree_nodes: usize,
    /// Maximum depth of one tree (levels below the root).
    #[arg(long, env = "SPECLLAVA_MAX_TREE_DEPTH", default_value_t = 32)]
    pub max_tree_depth: usize,
    /// Maximum live sessions (more evicts the least recently used).
    #[arg(long, env = "SPECLLAVA_MAX_SESSIONS", default_value_t = 256)]
    pub max_sessions: usize,
    /// KV memory budget of all sessions, in MiB (over it evicts the least recently used).
    #[arg(long, env = "SPECLLAVA_KV_BUDGET_MB", default_value_t = 4096)]
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
