//! Command-line / environment configuration of the target service.

use std::{net::SocketAddr, path::PathBuf};

use clap::Parser;
use specllava_service_kit::{ModelServerArgs, SessionLimits};

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
    /// KV memory budget of all sessions, in MiB (over it evicts the least recently used).
    #[arg(long, env = "SPECLLAVA_KV_BUDGET_MB", default_value_t = 4096)]
    pub kv_budget_mb: usize,
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
    /// Time the start-up verify-cost measurement may take beyond its first round, in
    /// milliseconds (it times a few points, one round at least, and fills in the rest of the
    /// grid; the orchestrator refines the costs online from the forwards this replica serves).
    #[arg(long, env = "SPECLLAVA_CALIBRATION_BUDGET_MS", default_value_t = 1500)]
    pub calibration_budget_ms: u64,
    /// Flags shared with the draft service.
    #[command(flatten)]
    pub server: ModelServerArgs,
}

impl Args {
    /// Session store limits from the flags.
    pub fn session_limits(&self) -> SessionLimits {
        self.server.session_limits(self.kv_budget_mb)
    }
}
