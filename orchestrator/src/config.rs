//! Command-line / environment configuration of the orchestrator.

use std::{net::SocketAddr, path::PathBuf};

use clap::Parser;

/// Orchestrator: the public Generation API; routes sessions to draft and target replicas.
#[derive(Debug, Clone, Parser)]
#[command(name = "specllava-orchestrator", version)]
pub struct Args {
    /// Address to listen on.
    #[arg(long, env = "SPECLLAVA_LISTEN", default_value = "0.0.0.0:50050")]
    pub listen: SocketAddr,
    /// Draft replicas, comma-separated `host:port` (a name resolving to several
    /// addresses is several replicas). Empty: target-only decoding.
    #[arg(
        long,
        env = "SPECLLAVA_DRAFT_ENDPOINTS",
        value_delimiter = ',',
        default_value = "127.0.0.1:50051"
    )]
    pub draft_endpoints: Vec<String>,
    /// Target replicas, comma-separated `host:port`.
    #[arg(
        long,
        env = "SPECLLAVA_TARGET_ENDPOINTS",
        value_delimiter = ',',
        default_value = "127.0.0.1:50052"
    )]
    pub target_endpoints: Vec<String>,
    /// Target model directory: its tokenizer.json is the one the services speak.
    #[arg(long, env = "SPECLLAVA_MODEL_DIR", default_value = "models/target")]
    pub model_dir: PathBuf,
    /// Maximum live multi-turn sessions.
    #[arg(long, env = "SPECLLAVA_MAX_SESSIONS", default_value_t = 256)]
    pub max_sessions: usize,
    /// Maximum concurrent Generate requests (more answer RESOURCE_EXHAUSTED).
    #[arg(long, env = "SPECLLAVA_MAX_CONCURRENT_REQUESTS", default_value_t = 128)]
    pub max_concurrent_requests: usize,
    /// Maximum encoded image size, in bytes.
    #[arg(long, env = "SPECLLAVA_MAX_IMAGE_BYTES", default_value_t = 20 * 1024 * 1024)]
    pub max_image_bytes: usize,
    /// Maximum decoded image size, in pixels.
    #[arg(long, env = "SPECLLAVA_MAX_IMAGE_PIXELS", default_value_t = 40_000_000)]
    pub max_image_pixels: u64,
    /// Maximum prompt tokens of one turn.
    #[arg(long, env = "SPECLLAVA_MAX_PROMPT_TOKENS", default_value_t = 2048)]
    pub max_prompt_tokens: usize,
    /// max_new_tokens when a request leaves it 0.
    #[arg(long, env = "SPECLLAVA_DEFAULT_MAX_NEW_TOKENS", default_value_t = 128)]
    pub default_max_new_tokens: u32,
    /// Upper bound on max_new_tokens.
    #[arg(long, env = "SPECLLAVA_MAX_NEW_TOKENS_LIMIT", default_value_t = 4096)]
    pub max_new_tokens_limit: u32,
    /// Multi-turn sessions unused this long are closed, in seconds.
    #[arg(long, env = "SPECLLAVA_SESSION_TTL_S", default_value_t = 600)]
    pub session_ttl_s: u64,
    /// Timeout of one draft step before falling back to target-only, in milliseconds.
    #[arg(long, env = "SPECLLAVA_DRAFT_TIMEOUT_MS", default_value_t = 10_000)]
    pub draft_timeout_ms: u64,
    /// Timeout of one call to a target replica, in milliseconds.
    #[arg(long, env = "SPECLLAVA_TARGET_TIMEOUT_MS", default_value_t = 60_000)]
    pub target_timeout_ms: u64,
    /// Re-resolve the draft and target endpoints (DNS) this often, in seconds, so new
    /// replicas take new sessions and vanished ones hand theirs over (re-prefilled from
    /// the history); 0 = only at start and after a replica failure.
    #[arg(long, env = "SPECLLAVA_DISCOVERY_INTERVAL_SECS", default_value_t = 10)]
    pub discovery_interval_secs: u64,
    /// Serve Prometheus metrics at `GET /metrics` on this address (e.g. `0.0.0.0:9090`,
    /// or `127.0.0.1:0` for any free port). Unset: no metrics endpoint.
    #[arg(long, env = "SPECLLAVA_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Log one JSON object per line.
    #[arg(long, env = "SPECLLAVA_LOG_JSON")]
    pub log_json: bool,
}
