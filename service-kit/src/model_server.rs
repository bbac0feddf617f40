//! What the two model services (draft and target) share: their common flags and
//! model loading.

use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use anyhow::Context;
use specllava_model::{Backend, CpuKernel, CpuSettings, ImageLimits, Llava};
use specllava_proto::v1 as pb;
use specllava_server::ImageLimitArgs;
use specllava_wire::convert::any_resolution_to_proto;

use crate::{
    BatchLimits, SessionBackend, SessionLimits, SessionRpc, SessionStore, VisionEncoder,
    WorkerConfig, WorkerHandle, parse_device, parse_dtype,
};

/// Flags common to the draft and the target service (every flag is also an
/// environment variable). Each service flattens this into its own `Args`, next to
/// the flags whose defaults differ (listen address, model directory, KV budget).
#[derive(Debug, Clone, clap::Args)]
pub struct ModelServerArgs {
    /// Device: `cpu` or `cuda` (or `cuda:N`).
    #[arg(long, env = "SPECLLAVA_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Dtype of weights, activations and KV: `auto` (f32 on the CPU, the checkpoint's dtype on
    /// a GPU), `f32`, `f16` or `bf16` (f16 / bf16 need a GPU or `--backend candle`).
    #[arg(long, env = "SPECLLAVA_DTYPE", default_value = "auto")]
    pub dtype: String,
    /// Maximum live sessions (more evicts the least recently used).
    #[arg(long, env = "SPECLLAVA_MAX_SESSIONS", default_value_t = 256)]
    pub max_sessions: usize,
    /// Sessions unused this long are dropped, in seconds.
    #[arg(long, env = "SPECLLAVA_SESSION_TTL_S", default_value_t = 600)]
    pub session_ttl_s: u64,
    /// Capacity of the model worker's queue (full answers RESOURCE_EXHAUSTED).
    #[arg(long, env = "SPECLLAVA_QUEUE_CAPACITY", default_value_t = 1024)]
    pub queue_capacity: usize,
    /// Image limits.
    #[command(flatten)]
    pub images: ImageLimitArgs,
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
    /// Largest gRPC message accepted (images travel in OpenSession / Append), in bytes.
    #[arg(long, env = "SPECLLAVA_MAX_MESSAGE_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub max_message_bytes: usize,
    /// How often the model worker sweeps sessions past their TTL, in milliseconds.
    #[arg(long, env = "SPECLLAVA_SESSION_SWEEP_MS", default_value_t = 1000)]
    pub session_sweep_ms: u64,
    /// TLS of the gRPC endpoint (`--tls-cert`, `--tls-key`, `--tls-client-ca`).
    #[command(flatten)]
    pub tls: specllava_server::tls::ServerTlsArgs,
    /// Threads of the CPU backend's products (0: every core). A service sharing its machine
    /// with another (the draft next to the target) runs best on its own share of the cores.
    #[arg(long, env = "SPECLLAVA_CPU_THREADS", default_value_t = 0)]
    pub cpu_threads: usize,
    /// The best instruction set the CPU backend may use: `avx512` (the CPU's best: AVX-512F,
    /// else AVX2 + FMA + F16C, else portable code), `avx2` or `portable` (same results,
    /// slower; for comparisons).
    #[arg(long, env = "SPECLLAVA_CPU_KERNEL", default_value = "avx512")]
    pub cpu_kernel: CpuKernel,
    /// Kernels of the decoder: `cpu` (the CPU backend; CPU device only) or `candle` (candle's
    /// kernels: the GPU path, or on the CPU for comparison). Unset: `cpu` on the CPU, `candle`
    /// on a GPU.
    #[arg(long, env = "SPECLLAVA_BACKEND")]
    pub backend: Option<Backend>,
    /// Bytes of vision features the encoder cache keeps, in MiB (the tower's output for recent
    /// image lists; 0 keeps none, calls asking for the same images at once still share a run).
    #[arg(long, env = "SPECLLAVA_VISION_CACHE_MIB", default_value_t = 64)]
    pub vision_cache_mib: usize,
    /// Measure this replica's forward cost at start-up and report it through `Info` (the
    /// orchestrator's budget policy starts from it: the target's verify cost, the draft's
    /// cost per level); `false` skips those forwards.
    #[arg(long, env = "SPECLLAVA_CALIBRATE", default_value_t = true, action = clap::ArgAction::Set)]
    pub calibrate: bool,
}

impl ModelServerArgs {
    /// Session store limits: these flags plus the service's KV budget in MiB.
    pub fn session_limits(&self, kv_budget_mb: usize) -> SessionLimits {
        SessionLimits {
            max_sessions: self.max_sessions,
            max_bytes: kv_budget_mb.saturating_mul(1024 * 1024),
            ttl: Duration::from_secs(self.session_ttl_s),
        }
    }

    /// Settings of the session worker: these flags plus the service's batch limits, the
    /// context sessions are held to and the KV rows one image becomes.
    pub fn worker_config(&self, batch: BatchLimits, max_context: usize) -> WorkerConfig {
        WorkerConfig {
            queue_capacity: self.queue_capacity.max(1),
            batch,
            expiry_tick: Duration::from_millis(self.session_sweep_ms.max(1)),
            max_context,
        }
    }

    /// Limits on uploaded images.
    pub fn image_limits(&self) -> ImageLimits {
        self.images.limits()
    }
}

/// A model loaded for serving, with the context length sessions are held to.
pub struct LoadedModel {
    /// The model, shared by the gRPC handlers and the worker thread.
    pub model: Arc<Llava>,
    /// `--max-context`, or the model's `max_position_embeddings` when that is 0.
    pub max_context: usize,
    /// What `Info` reports of the model (ids, limits, tokenizer fingerprint).
    pub info: specllava_proto::v1::ModelInfo,
}

impl LoadedModel {
    /// Starts the `role` service's session worker over this model (`backend` batches its
    /// jobs, `limits` bound its sessions) and returns the session RPCs around it.
    pub fn start_sessions<B: SessionBackend>(
        &self,
        role: &'static str,
        backend: B,
        limits: SessionLimits,
        args: &ModelServerArgs,
        batch: BatchLimits,
    ) -> std::io::Result<SessionRpc<B>> {
        let worker = WorkerHandle::spawn(
            role,
            backend,
            SessionStore::new(limits).with_metrics(),
            args.worker_config(batch, self.max_context),
        )?;
        let encoder = VisionEncoder::new(
            Arc::clone(&self.model),
            args.image_limits(),
            args.vision_cache_mib.saturating_mul(1024 * 1024),
            // As many images may wait for the tower as prefills for the worker.
            args.queue_capacity,
        );
        Ok(SessionRpc::new(worker, encoder, self.max_context))
    }
}

/// Loads the LLaVA checkpoint in `dir` onto the `--device` (off the async runtime).
/// `role` ("draft" / "target") only names the model in logs and errors.
pub async fn load_model(
    role: &str,
    dir: &Path,
    args: &ModelServerArgs,
) -> anyhow::Result<LoadedModel> {
    let device = parse_device(&args.device)?;
    let dtype = parse_dtype(&args.dtype)?;
    let cpu = CpuSettings {
        threads: args.cpu_threads,
        kernel_cap: args.cpu_kernel,
    };
    if !cpu.apply() {
        tracing::warn!(
            ?cpu,
            "--cpu-threads / --cpu-kernel ignored: the CPU backend had started"
        );
    }
    tracing::info!(model_dir = %dir.display(), device = %args.device, dtype = %args.dtype, "loading {role} model");
    let owned = dir.to_path_buf();
    let backend = args.backend;
    let (model, fingerprint) = tokio::task::spawn_blocking(move || {
        let backend = backend.unwrap_or_else(|| Backend::for_device(&device));
        Llava::load_with(&owned, &device, backend, dtype)
            .map(|m| (m, specllava_wire::compat::model_dir_fingerprint(&owned)))
    })
    .await?
    .with_context(|| format!("loading the {role} model from {}", dir.display()))?;
    tracing::info!(backend = ?model.backend(), dtype = ?model.dtype(), "{role} model loaded");
    let max_context = match args.max_context {
        0 => model.config().text.max_position_embeddings,
        n => n,
    };
    let info = model_info(&model, max_context, fingerprint);
    Ok(LoadedModel {
        model: Arc::new(model),
        max_context,
        info,
    })
}

/// What `Info` reports of a loaded model.
pub fn model_info(
    model: &Llava,
    max_context: usize,
    tokenizer_fingerprint: String,
) -> pb::ModelInfo {
    let cfg = model.config();
    pb::ModelInfo {
        vocab_size: cfg.text.vocab_size as u32,
        image_token_id: cfg.image_token_id,
        num_image_tokens: model.tile_tokens() as u32,
        any_resolution: any_resolution_to_proto(model.image_tokens()),
        eos_token_ids: cfg.eos_token_ids.clone(),
        bos_token_id: cfg.bos_token_id,
        max_context: max_context as u64,
        tokenizer_fingerprint,
        vision_fingerprint: model.vision_fingerprint().to_owned(),
    }
}
