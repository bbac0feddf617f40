//! Command-line / environment configuration of the orchestrator.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Parser;
use specllava_prompt::ImageLimits;
use specllava_server::{AuthArgs, ImageLimitArgs, ServerTlsArgs, UpstreamTlsArgs};
use speculate::PolicySpace;

use crate::engine::EngineConfig;
use crate::health::Backoff;
use crate::plan::PlanConfig;
use crate::prompt::PromptLimits;
use crate::request::ApiLimits;

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
    /// Image limits.
    #[command(flatten)]
    pub images: ImageLimitArgs,
    /// Maximum prompt tokens of one turn.
    #[arg(long, env = "SPECLLAVA_MAX_PROMPT_TOKENS", default_value_t = 2048)]
    pub max_prompt_tokens: usize,
    /// Maximum prompt text of one turn, in bytes (all messages of an HTTP request
    /// together); checked before the prompt is tokenized.
    #[arg(long, env = "SPECLLAVA_MAX_PROMPT_BYTES", default_value_t = 128 * 1024)]
    pub max_prompt_bytes: usize,
    /// max_new_tokens when a request leaves it 0 (bounded by the room left in the
    /// context: the turn then ends with finish reason `length`).
    #[arg(long, env = "SPECLLAVA_DEFAULT_MAX_NEW_TOKENS", default_value_t = 128)]
    pub default_max_new_tokens: u32,
    /// Upper bound on max_new_tokens.
    #[arg(long, env = "SPECLLAVA_MAX_NEW_TOKENS_LIMIT", default_value_t = 4096)]
    pub max_new_tokens_limit: u32,
    /// Most stop strings one request may carry (both APIs; more: INVALID_ARGUMENT / 400).
    #[arg(long, env = "SPECLLAVA_MAX_STOP_STRINGS", default_value_t = 16)]
    pub max_stop_strings: usize,
    /// Longest stop string, in bytes (both APIs; longer: INVALID_ARGUMENT / 400).
    #[arg(long, env = "SPECLLAVA_MAX_STOP_BYTES", default_value_t = 256)]
    pub max_stop_bytes: usize,
    /// Multi-turn sessions unused this long are closed, in seconds.
    #[arg(long, env = "SPECLLAVA_SESSION_TTL_S", default_value_t = 600)]
    pub session_ttl_s: u64,
    /// Deadline of every call to a draft replica and of one draft step, in milliseconds:
    /// a draft missing it is out of rotation and the turn goes on without it (or with
    /// another draft replica).
    #[arg(long, env = "SPECLLAVA_DRAFT_TIMEOUT_MS", default_value_t = EngineConfig::DEFAULT_DRAFT_TIMEOUT.as_millis() as u64)]
    pub draft_timeout_ms: u64,
    /// Ask the draft to pre-draft each session's likely next tree while the target verifies
    /// (draft-ahead); a request can still turn it off. `--draft-ahead false` turns it off.
    #[arg(long, env = "SPECLLAVA_DRAFT_AHEAD", default_value_t = EngineConfig::DEFAULT_DRAFT_AHEAD, action = clap::ArgAction::Set)]
    pub draft_ahead: bool,
    /// How long a turn's steps may wait for its draft session's set-up (which runs in the
    /// background) before decoding target-only, in milliseconds after the turn starts; 0:
    /// the first token never waits for the draft.
    #[arg(long, env = "SPECLLAVA_DRAFT_JOIN_WAIT_MS", default_value_t = EngineConfig::DEFAULT_DRAFT_JOIN_WAIT.as_millis() as u64)]
    pub draft_join_wait_ms: u64,
    /// How much longer than a root-only tree's the verification of a turn's first tree may
    /// take (at least 1): the draft drafts it while the target prefills, cut to the nodes
    /// within this (a first token sooner, carrying fewer tokens). Unset: the step's shape.
    #[arg(long, env = "SPECLLAVA_FIRST_TREE_VERIFY_SLACK")]
    pub first_tree_verify_slack: Option<f64>,
    /// Deadline of every call to a target replica (open, append, verify, close...), in
    /// milliseconds, once more for each image a call carries: a target missing it is out of
    /// rotation and its sessions fail over.
    #[arg(long, env = "SPECLLAVA_TARGET_TIMEOUT_MS", default_value_t = EngineConfig::DEFAULT_TARGET_TIMEOUT.as_millis() as u64)]
    pub target_timeout_ms: u64,
    /// How long a failed replica stays out of rotation before it is tried again, in
    /// milliseconds; doubled after each failed retry, up to --replica-backoff-max-ms.
    #[arg(long, env = "SPECLLAVA_REPLICA_BACKOFF_MS", default_value_t = Backoff::DEFAULT.base.as_millis() as u64)]
    pub replica_backoff_ms: u64,
    /// Longest time a failed replica stays out of rotation, in milliseconds.
    #[arg(
        long,
        env = "SPECLLAVA_REPLICA_BACKOFF_MAX_MS",
        default_value_t = Backoff::DEFAULT.max.as_millis() as u64
    )]
    pub replica_backoff_max_ms: u64,
    /// How often a failed replica is probed (`Info`) until it answers, in milliseconds: a
    /// replica that is up again is back in rotation within this period. Each probe waits
    /// at most this long (or 1 s, whichever is longer).
    #[arg(long, env = "SPECLLAVA_REPLICA_PROBE_MS", default_value_t = Args::DEFAULT_REPLICA_PROBE.as_millis() as u64)]
    pub replica_probe_ms: u64,
    /// Re-resolve the draft and target endpoints (DNS) this often, in seconds, so new
    /// replicas take new sessions and vanished ones hand theirs over (re-prefilled from
    /// the history); 0 = only at start and after a replica failure.
    #[arg(long, env = "SPECLLAVA_DISCOVERY_INTERVAL_SECS", default_value_t = 10)]
    pub discovery_interval_secs: u64,
    /// Serve Prometheus metrics at `GET /metrics` on this address (e.g. `0.0.0.0:9090`,
    /// or `127.0.0.1:0` for any free port). Unset: no metrics endpoint.
    #[arg(long, env = "SPECLLAVA_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Serve the OpenAI-compatible HTTP API (`/v1/chat/completions`, `/v1/models`,
    /// `/health`) on this address (e.g. `0.0.0.0:8000`). Unset: no HTTP API.
    #[arg(long, env = "SPECLLAVA_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
    /// The model name the HTTP API lists and accepts in `model` (default: the name of
    /// the model directory).
    #[arg(long, env = "SPECLLAVA_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    /// Largest HTTP request body, in bytes (413 above).
    #[arg(long, env = "SPECLLAVA_HTTP_MAX_BODY_BYTES", default_value_t = 32 * 1024 * 1024)]
    pub http_max_body_bytes: usize,
    /// Conversations kept after an HTTP request, with their replica sessions, so that a
    /// request re-sending the conversation reuses their KV (least recently used evicted;
    /// idle ones closed after --session-ttl-s). 0: none kept.
    #[arg(
        long,
        env = "SPECLLAVA_HTTP_CACHED_CONVERSATIONS",
        default_value_t = 64
    )]
    pub http_cached_conversations: usize,
    /// Fetch `http://` and `https://` image URLs in chat messages (at most
    /// --max-image-bytes, within --remote-image-timeout-ms; redirects are not followed).
    /// HTTPS trusts the Mozilla root certificates and --remote-image-ca-file. Off: only
    /// `data:` URLs are accepted.
    #[arg(long, env = "SPECLLAVA_ALLOW_REMOTE_IMAGES")]
    pub allow_remote_images: bool,
    /// PEM bundle of extra CA certificates that HTTPS image fetches trust (e.g. a private
    /// registry's CA), besides the Mozilla roots. Needs --allow-remote-images.
    #[arg(
        long,
        env = "SPECLLAVA_REMOTE_IMAGE_CA_FILE",
        requires = "allow_remote_images"
    )]
    pub remote_image_ca_file: Option<PathBuf>,
    /// Timeout of one remote image fetch (connect, TLS handshake and the whole body), in
    /// milliseconds.
    #[arg(
        long,
        env = "SPECLLAVA_REMOTE_IMAGE_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    pub remote_image_timeout_ms: u64,
    /// Bearer tokens of the public APIs (`--api-keys`, `--api-keys-file`).
    #[command(flatten)]
    pub auth: AuthArgs,
    /// TLS of the public gRPC endpoint (`--tls-cert`, `--tls-key`, `--tls-client-ca`).
    #[command(flatten)]
    pub tls: ServerTlsArgs,
    /// TLS towards the draft and target replicas (`--upstream-tls-*`).
    #[command(flatten)]
    pub upstream_tls: UpstreamTlsArgs,
    /// Log one JSON object per line.
    #[arg(long, env = "SPECLLAVA_LOG_JSON")]
    pub log_json: bool,
    /// Connect timeout of the channels to draft and target replicas, in milliseconds.
    #[arg(long, env = "SPECLLAVA_CONNECT_TIMEOUT_MS", default_value_t = 5_000)]
    pub connect_timeout_ms: u64,
    /// How often idle multi-turn sessions are looked for (and closed on their replicas),
    /// in milliseconds.
    #[arg(long, env = "SPECLLAVA_SESSION_SWEEP_MS", default_value_t = 5_000)]
    pub session_sweep_ms: u64,
    /// Attempts to sync a target replica (after an eviction, a stale session, a refused
    /// replica) before a turn fails; each target that fails is replaced on top of these.
    #[arg(long, env = "SPECLLAVA_TARGET_ATTEMPTS", default_value_t = EngineConfig::DEFAULT_TARGET_ATTEMPTS)]
    pub target_attempts: usize,
    /// Target re-prefills from the history per step (an evicted session, a failover to
    /// another replica), and draft replicas replaced per turn, before giving up.
    #[arg(long, env = "SPECLLAVA_MAX_RECOVERIES", default_value_t = EngineConfig::DEFAULT_MAX_RECOVERIES)]
    pub max_recoveries: usize,
    /// Budget policy prior: cost of one draft level, in nanoseconds (refined online).
    #[arg(long, env = "SPECLLAVA_POLICY_DRAFT_LEVEL_NS", default_value_t = PlanConfig::DEFAULT_DRAFT_LEVEL_NS)]
    pub policy_draft_level_ns: f64,
    /// Budget policy prior: cost of one drafted row, in nanoseconds (refined online).
    #[arg(long, env = "SPECLLAVA_POLICY_DRAFT_NODE_NS", default_value_t = PlanConfig::DEFAULT_DRAFT_NODE_NS)]
    pub policy_draft_node_ns: f64,
    /// Budget policy prior: tree sizes (nodes) of the verify-cost grid.
    #[arg(
        long,
        env = "SPECLLAVA_POLICY_VERIFY_NODES",
        value_delimiter = ',',
        default_values_t = PlanConfig::DEFAULT_VERIFY_NODES
    )]
    pub policy_verify_nodes: Vec<usize>,
    /// Budget policy prior: batch sizes of the verify-cost grid.
    #[arg(
        long,
        env = "SPECLLAVA_POLICY_VERIFY_BATCHES",
        value_delimiter = ',',
        default_values_t = PlanConfig::DEFAULT_VERIFY_BATCHES
    )]
    pub policy_verify_batches: Vec<usize>,
    /// Budget policy prior: verify cost over the grid, batch-major, in nanoseconds
    /// (replaced by the first target's start-up measurement when it reports one).
    #[arg(
        long,
        env = "SPECLLAVA_POLICY_VERIFY_NS",
        value_delimiter = ',',
        default_values_t = PlanConfig::DEFAULT_VERIFY_NS
    )]
    pub policy_verify_ns: Vec<f64>,
    /// Largest depth D the budget policy considers.
    #[arg(long, env = "SPECLLAVA_POLICY_MAX_DEPTH", default_value_t = PolicySpace::DEFAULT.max_depth)]
    pub policy_max_depth: usize,
    /// Largest branching K the budget policy considers.
    #[arg(long, env = "SPECLLAVA_POLICY_MAX_BRANCHING", default_value_t = PolicySpace::DEFAULT.max_branching)]
    pub policy_max_branching: usize,
    /// Largest node budget M the budget policy considers.
    #[arg(long, env = "SPECLLAVA_POLICY_MAX_BUDGET", default_value_t = PolicySpace::DEFAULT.max_budget)]
    pub policy_max_budget: usize,
    /// When the policy prefers not to draft, draft anyway every N-th step to keep
    /// learning the acceptance (dynamic trees); 0 = never.
    #[arg(long, env = "SPECLLAVA_POLICY_PROBE_PERIOD", default_value_t = PlanConfig::DEFAULT_PROBE_PERIOD)]
    pub policy_probe_period: u32,
    /// An adaptive turn the policy expects to gain nothing from drafting at the current
    /// load runs target-only without setting up a draft, except every N-th such turn
    /// while no other turn runs (to keep measuring); 1 sets up a draft for every turn.
    #[arg(long, env = "SPECLLAVA_POLICY_EXPLORE_TURNS", default_value_t = PlanConfig::DEFAULT_EXPLORE_TURNS)]
    pub policy_explore_turns: u32,
    /// Tree depth D used when neither the request nor the policy sets one.
    #[arg(long, env = "SPECLLAVA_FALLBACK_DEPTH", default_value_t = PlanConfig::DEFAULT_FALLBACK.0)]
    pub fallback_depth: usize,
    /// Branching K used when neither the request nor the policy sets one.
    #[arg(long, env = "SPECLLAVA_FALLBACK_BRANCHING", default_value_t = PlanConfig::DEFAULT_FALLBACK.1)]
    pub fallback_branching: usize,
    /// Node budget M used when neither the request nor the policy sets one.
    #[arg(long, env = "SPECLLAVA_FALLBACK_BUDGET", default_value_t = PlanConfig::DEFAULT_FALLBACK.2)]
    pub fallback_budget: usize,
}

impl Args {
    /// Probe period of failed replicas: 500 ms.
    pub const DEFAULT_REPLICA_PROBE: Duration = Duration::from_millis(500);

    /// How often failed replicas are probed (at least 10 ms).
    pub fn replica_probe(&self) -> Duration {
        Duration::from_millis(self.replica_probe_ms.max(10))
    }

    /// The backoff of failed replicas these flags give.
    pub fn backoff(&self) -> Backoff {
        let base = Duration::from_millis(self.replica_backoff_ms);
        Backoff {
            base,
            max: Duration::from_millis(self.replica_backoff_max_ms).max(base),
        }
    }

    /// The image limits these flags give.
    pub fn image_limits(&self) -> ImageLimits {
        self.images.limits()
    }

    /// The request limits of the public APIs these flags give.
    pub fn api_limits(&self) -> ApiLimits {
        ApiLimits {
            image: self.image_limits(),
            prompt: PromptLimits {
                max_tokens: self.max_prompt_tokens,
                max_bytes: self.max_prompt_bytes,
            },
            default_max_new_tokens: self.default_max_new_tokens,
            max_new_tokens_limit: self.max_new_tokens_limit,
            max_stop_strings: self.max_stop_strings,
            max_stop_bytes: self.max_stop_bytes,
        }
    }

    /// The engine settings these flags give.
    pub fn engine_config(&self) -> EngineConfig {
        EngineConfig {
            draft_timeout: Duration::from_millis(self.draft_timeout_ms),
            draft_ahead: self.draft_ahead,
            draft_join_wait: Duration::from_millis(self.draft_join_wait_ms),
            first_tree_verify_slack: self.first_tree_verify_slack.map(|s| s.max(1.0)),
            target_timeout: Duration::from_millis(self.target_timeout_ms),
            target_attempts: self.target_attempts.max(1),
            max_recoveries: self.max_recoveries,
            plan: PlanConfig {
                draft_level_ns: self.policy_draft_level_ns,
                draft_node_ns: self.policy_draft_node_ns,
                verify_nodes: self.policy_verify_nodes.clone(),
                verify_batches: self.policy_verify_batches.clone(),
                verify_ns: self.policy_verify_ns.clone(),
                space: PolicySpace {
                    max_depth: self.policy_max_depth,
                    max_branching: self.policy_max_branching,
                    max_budget: self.policy_max_budget,
                },
                probe_period: self.policy_probe_period,
                explore_turns: self.policy_explore_turns.max(1),
                fallback: (
                    self.fallback_depth,
                    self.fallback_branching,
                    self.fallback_budget,
                ),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_flag_defaults_are_the_model_defaults() {
        let args = Args::parse_from(["specllava-orchestrator"]);
        assert_eq!(args.image_limits(), ImageLimits::default());
    }

    #[test]
    fn flag_defaults_are_the_engine_defaults() {
        let args = Args::parse_from(["specllava-orchestrator"]);
        let cfg = args.engine_config();
        let defaults = EngineConfig::default();
        assert_eq!(cfg.plan, defaults.plan);
        assert_eq!(args.backoff(), Backoff::default());
        assert_eq!(
            (
                cfg.draft_timeout,
                cfg.draft_ahead,
                cfg.draft_join_wait,
                cfg.target_timeout,
                cfg.target_attempts,
                cfg.max_recoveries
            ),
            (
                defaults.draft_timeout,
                defaults.draft_ahead,
                defaults.draft_join_wait,
                defaults.target_timeout,
                defaults.target_attempts,
                defaults.max_recoveries
            )
        );
    }
}
