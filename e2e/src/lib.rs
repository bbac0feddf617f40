//! Process harness of the end-to-end tests: builds the three service binaries
//! once, starts them on free loopback ports with the parity fixture
//! checkpoints, waits for gRPC health, and stops them (SIGTERM) on drop. The
//! process plumbing is [`specllava_harness`], shared with the benchmark.
//!
//! [`otlp`] holds an in-process OTLP trace collector and [`scrape_metrics`]
//! reads a service's Prometheus endpoint, for the telemetry tests; [`pki`] generates the
//! certificates of the TLS tests ([`ClusterConfig::with_tls`]).

pub mod otlp;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use specllava_harness::{Launch, ServiceProcess};

use specllava_proto::v1 as pb;
use specllava_proto::v1::draft_client::DraftClient;
use specllava_proto::v1::generation_client::GenerationClient;
use specllava_proto::v1::target_client::TargetClient;
use tonic::transport::{Channel, ClientTlsConfig};

pub use specllava_harness::pki::TestPki;

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e is inside the workspace")
        .to_path_buf()
}

/// A parity fixture checkpoint directory.
pub fn fixture(name: &str) -> PathBuf {
    workspace_root().join("model/tests/fixtures").join(name)
}

/// A fixture image's bytes.
pub fn fixture_image(name: &str) -> bytes::Bytes {
    std::fs::read(
        workspace_root()
            .join("model/tests/fixtures/images")
            .join(name),
    )
    .expect("fixture image")
    .into()
}

/// Directory holding the binaries (the test executable's profile directory),
/// after building them once per test process.
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let exe = std::env::current_exe().expect("current exe");
        // target/<profile>/deps/<test> -> target/<profile>
        let dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("profile dir")
            .to_path_buf();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        // The test's own profile (`cargo test --release` uses release binaries).
        let profile = match dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => "dev",
            Some(name) => name,
        };
        let mut cmd = Command::new(cargo);
        cmd.current_dir(workspace_root()).args([
            "build",
            "--profile",
            profile,
            "--bins",
            "-p",
            "draft-service",
            "-p",
            "target-service",
            "-p",
            "orchestrator",
        ]);
        // E.g. `draft-service/cuda,target-service/cuda` (scripts/gpu-check), with the
        // services put on the GPU by SPECLLAVA_DEVICE=cuda:0.
        if let Ok(features) = std::env::var("SPECLLAVA_CARGO_FEATURES")
            && !features.is_empty()
        {
            cmd.args(["--features", &features]);
        }
        let status = cmd.status().expect("running cargo build");
        assert!(status.success(), "building the service binaries failed");
        dir
    })
}

/// A free loopback port (bound then released).
pub fn free_port() -> u16 {
    specllava_harness::free_port().expect("a free port")
}

/// A running service process; SIGTERM then kill on drop.
pub struct Service {
    /// The process.
    pub process: ServiceProcess,
    /// `127.0.0.1:port`.
    pub addr: String,
    /// `127.0.0.1:port` of its `/metrics` endpoint, when started with one.
    pub metrics_addr: Option<String>,
    /// How it was started (for [`Service::restart`]).
    launch: Launch,
}

impl Service {
    /// Starts `bin` with `args` and `--listen` on a free port.
    pub fn start(bin: &str, args: &[String]) -> Self {
        Self::start_with(bin, args, &[], false)
    }

    /// [`Service::start`] with extra environment variables, and with
    /// `--metrics-addr` on a free port when `metrics` is set.
    pub fn start_with(bin: &str, args: &[String], env: &[(String, String)], metrics: bool) -> Self {
        Self::launch(bin, args, env, metrics, None, None)
    }

    /// [`Service::start_with`] for a service serving TLS (its `--tls-*` flags in `args`):
    /// the health checks and [`Service::channel`] connect with `tls`.
    pub fn start_tls(
        bin: &str,
        args: &[String],
        env: &[(String, String)],
        metrics: bool,
        tls: Option<ClientTlsConfig>,
    ) -> Self {
        Self::launch(bin, args, env, metrics, None, tls)
    }

    /// [`Service::start_with`], its output in `log` instead of the test's.
    pub fn start_logged(bin: &str, args: &[String], env: &[(String, String)], log: &Path) -> Self {
        Self::launch(bin, args, env, false, Some(log), None)
    }

    fn launch(
        bin: &str,
        args: &[String],
        env: &[(String, String)],
        metrics: bool,
        log: Option<&Path>,
        tls: Option<ClientTlsConfig>,
    ) -> Self {
        let addr = format!("127.0.0.1:{}", free_port());
        let metrics_addr = metrics.then(|| format!("127.0.0.1:{}", free_port()));
        let mut launch = Launch::new(bin_dir().join(bin), addr.clone())
            .args(args)
            .args(["--listen", addr.as_str()])
            .log_filter(std::env::var("SPECLLAVA_E2E_LOG").unwrap_or_else(|_| "warn".into()))
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        if let Some(m) = &metrics_addr {
            launch = launch.args(["--metrics-addr", m.as_str()]);
        }
        if let Some(log) = log {
            launch = launch.log_file(log);
        }
        if let Some(tls) = tls {
            launch = launch.client_tls(tls);
        }
        let process = launch
            .clone()
            .spawn()
            .unwrap_or_else(|e| panic!("starting {bin}: {e}"));
        Self {
            process,
            addr,
            metrics_addr,
            launch,
        }
    }

    /// Starts the service again, same binary, flags and address (after it was killed),
    /// and waits for its health.
    pub async fn restart(&mut self) {
        self.process.kill();
        self.start_again().await;
    }

    /// Starts the service again after it exited (same binary, flags and address) and waits
    /// for its health: the second half of a rolling restart.
    pub async fn start_again(&mut self) {
        self.process = self
            .launch
            .clone()
            .spawn()
            .unwrap_or_else(|e| panic!("restarting {}: {e}", self.addr));
        wait_healthy(self, Duration::from_secs(120)).await;
    }

    /// `http://addr` (`https://addr` when it serves TLS).
    pub fn url(&self) -> String {
        self.process.url()
    }

    /// A lazily connecting channel to the service (over TLS when it serves TLS, with the
    /// client settings it was started with).
    pub fn channel(&self) -> Channel {
        self.process.channel().expect("a service channel")
    }

    /// Sends SIGTERM and waits for the exit (graceful shutdown); returns the exit status.
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        self.process.terminate()
    }
}

/// Which checkpoints and flags a cluster runs with.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// Draft model directory (`None`: no draft service; the orchestrator gets
    /// `draft_endpoints` instead).
    pub draft_model: Option<PathBuf>,
    /// Target model directory.
    pub target_model: PathBuf,
    /// Draft endpoints override (e.g. a dead port).
    pub draft_endpoints: Option<String>,
    /// Extra orchestrator flags.
    pub orchestrator_args: Vec<String>,
    /// Extra target flags.
    pub target_args: Vec<String>,
    /// Extra environment of all three services (e.g. `OTEL_*`).
    pub env: Vec<(String, String)>,
    /// Start every service with a `/metrics` endpoint on a free port.
    pub metrics: bool,
    /// Target replicas to start (at least 1), all behind the orchestrator.
    pub target_replicas: usize,
    /// Draft replicas to start (when `draft_model` is set; at least 1).
    pub draft_replicas: usize,
    /// TLS on every gRPC endpoint (see [`ClusterConfig::with_tls`]).
    pub tls: Option<ClusterTls>,
}

/// TLS of a test cluster: every service serves the PKI's server certificate, the
/// orchestrator trusts its CA; with `mutual`, the draft and target services require the
/// client certificate, which the orchestrator presents.
#[derive(Debug, Clone)]
pub struct ClusterTls {
    /// The certificates.
    pub pki: Arc<TestPki>,
    /// Mutual TLS between the orchestrator and the replicas.
    pub mutual: bool,
}

impl ClusterConfig {
    /// Draft and target from two fixtures.
    pub fn new(draft: &str, target: &str) -> Self {
        Self::from_dirs(fixture(draft), fixture(target))
    }

    /// Draft and target from two checkpoint directories (e.g. the shipped `models/`).
    pub fn from_dirs(draft: PathBuf, target: PathBuf) -> Self {
        Self {
            draft_model: Some(draft),
            target_model: target,
            draft_endpoints: None,
            orchestrator_args: Vec::new(),
            target_args: Vec::new(),
            env: Vec::new(),
            metrics: false,
            target_replicas: 1,
            draft_replicas: 1,
            tls: None,
        }
    }

    /// TLS on every gRPC endpoint with `pki`'s certificates; with `mutual`, the draft and
    /// target require the orchestrator's client certificate.
    pub fn with_tls(mut self, pki: Arc<TestPki>, mutual: bool) -> Self {
        self.tls = Some(ClusterTls { pki, mutual });
        self
    }

    /// Every speculative turn sets up its draft (adaptive ones too, even where the policy
    /// expects no gain) and its steps wait for the draft session's background set-up (up
    /// to 10 s) instead of decoding target-only meanwhile: for tests that assert that a
    /// turn speculated, on a machine too loaded for the set-up to finish before a short
    /// turn does.
    pub fn wait_for_draft(mut self) -> Self {
        self.orchestrator_args.extend([
            "--draft-join-wait-ms=10000".to_owned(),
            "--policy-explore-turns=1".to_owned(),
        ]);
        self
    }

    /// The orchestrator fetches remote `http(s)://` image URLs (`--allow-remote-images`),
    /// its HTTPS trusting the PEM CA bundle `ca_file` too when given
    /// (`--remote-image-ca-file`). Call after setting `orchestrator_args` wholesale.
    pub fn remote_images(mut self, ca_file: Option<&Path>) -> Self {
        self.orchestrator_args
            .push("--allow-remote-images".to_owned());
        if let Some(ca) = ca_file {
            self.orchestrator_args
                .push(format!("--remote-image-ca-file={}", ca.to_string_lossy()));
        }
        self
    }

    /// `targets` target and `drafts` draft replicas behind the orchestrator.
    pub fn replicas(mut self, targets: usize, drafts: usize) -> Self {
        self.target_replicas = targets.max(1);
        self.draft_replicas = drafts.max(1);
        self
    }
}

/// The three services.
pub struct Cluster {
    /// Draft service (if started): the first draft replica.
    pub draft: Option<Service>,
    /// Target service: the first target replica.
    pub target: Service,
    /// Draft replicas beyond the first.
    pub more_drafts: Vec<Service>,
    /// Target replicas beyond the first.
    pub more_targets: Vec<Service>,
    /// Orchestrator.
    pub orchestrator: Service,
}

/// Waits until the service answers SERVING on the health protocol; panics when it
/// exits first or `timeout` passes.
pub async fn wait_healthy(svc: &mut Service, timeout: Duration) {
    if let Err(e) = specllava_harness::wait_healthy(&mut svc.process, timeout).await {
        panic!("service at {} not healthy: {e}", svc.addr);
    }
}

impl Cluster {
    /// Starts the services and waits for their health.
    pub async fn start(cfg: ClusterConfig) -> Self {
        let path = |p: &Path| p.to_string_lossy().into_owned();
        let mut target_args = vec![
            "--model-dir".into(),
            path(&cfg.target_model),
            "--max-batch-wait-us".into(),
            "2000".into(),
        ];
        target_args.extend(cfg.target_args.iter().cloned());
        let mut draft_args = Vec::new();
        let mut replica_tls = None;
        let mut orch_tls = None;
        let mut orch_tls_args = Vec::new();
        if let Some(t) = &cfg.tls {
            let server = t.pki.server_args(t.mutual);
            target_args.extend(server.iter().cloned());
            draft_args.extend(server);
            replica_tls = Some(t.pki.client_tls(t.mutual));
            orch_tls = Some(t.pki.client_tls(false));
            orch_tls_args = t.pki.server_args(false);
            orch_tls_args.extend(t.pki.upstream_args(t.mutual));
        }
        let mut targets: Vec<Service> = (0..cfg.target_replicas.max(1))
            .map(|_| {
                Service::start_tls(
                    "specllava-target",
                    &target_args,
                    &cfg.env,
                    cfg.metrics,
                    replica_tls.clone(),
                )
            })
            .collect();
        let mut drafts: Vec<Service> = match &cfg.draft_model {
            Some(m) => (0..cfg.draft_replicas.max(1))
                .map(|_| {
                    let mut args = vec!["--model-dir".into(), path(m)];
                    args.extend(draft_args.iter().cloned());
                    Service::start_tls(
                        "specllava-draft",
                        &args,
                        &cfg.env,
                        cfg.metrics,
                        replica_tls.clone(),
                    )
                })
                .collect(),
            None => Vec::new(),
        };
        for svc in targets.iter_mut().chain(drafts.iter_mut()) {
            wait_healthy(svc, Duration::from_secs(120)).await;
        }
        let addrs = |svcs: &[Service]| {
            svcs.iter()
                .map(|s| s.addr.as_str())
                .collect::<Vec<_>>()
                .join(",")
        };
        let draft_endpoints = cfg
            .draft_endpoints
            .clone()
            .unwrap_or_else(|| addrs(&drafts));

        let mut orch_args = vec![
            "--model-dir".into(),
            path(&cfg.target_model),
            "--target-endpoints".into(),
            addrs(&targets),
            format!("--draft-endpoints={draft_endpoints}"),
        ];
        orch_args.extend(orch_tls_args);
        orch_args.extend(cfg.orchestrator_args.iter().cloned());
        let mut orchestrator = Service::start_tls(
            "specllava-orchestrator",
            &orch_args,
            &cfg.env,
            cfg.metrics,
            orch_tls,
        );
        wait_healthy(&mut orchestrator, Duration::from_secs(60)).await;
        let target = targets.remove(0);
        let draft = (!drafts.is_empty()).then(|| drafts.remove(0));
        Self {
            draft,
            target,
            more_drafts: drafts,
            more_targets: targets,
            orchestrator,
        }
    }

    /// Every target replica, the first one first.
    pub fn targets(&self) -> Vec<&Service> {
        std::iter::once(&self.target)
            .chain(&self.more_targets)
            .collect()
    }

    /// Every draft replica, the first one first.
    pub fn drafts(&self) -> Vec<&Service> {
        self.draft.iter().chain(&self.more_drafts).collect()
    }

    /// A client of the public API.
    pub async fn client(&self) -> GenerationClient<Channel> {
        GenerationClient::new(connected(&self.orchestrator).await)
    }

    /// A direct client of the target service.
    pub async fn target_client(&self) -> TargetClient<Channel> {
        TargetClient::new(connected(&self.target).await)
    }

    /// The (first) target's model, as its `Info` reports it.
    pub async fn target_model(&self) -> pb::ModelInfo {
        self.target_client()
            .await
            .info(pb::InfoRequest {})
            .await
            .expect("target Info")
            .into_inner()
            .model
            .expect("the target reports its model")
    }

    /// A direct client of the draft service.
    pub async fn draft_client(&self) -> DraftClient<Channel> {
        DraftClient::new(connected(self.draft.as_ref().expect("draft started")).await)
    }

    /// Whether the (first) target still holds `session`.
    pub async fn target_has(&self, session: &str) -> bool {
        target_holds(&self.target, session).await
    }

    /// Whether the (first) draft still holds `session`.
    pub async fn draft_has(&self, session: &str) -> bool {
        draft_holds(self.draft.as_ref().expect("draft started"), session).await
    }
}

/// A connected channel to `svc` (over TLS when it serves TLS); panics when it cannot
/// connect.
pub async fn connected(svc: &Service) -> Channel {
    let endpoint = tonic::transport::Endpoint::from_shared(svc.url()).expect("an endpoint");
    let endpoint = match &svc.process.tls {
        Some(tls) => endpoint
            .tls_config(tls.clone())
            .expect("a TLS configuration"),
        None => endpoint,
    };
    endpoint
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connecting to {}: {e}", svc.addr))
}

/// Whether the target replica `svc` holds `session` (a stale Verify is rejected without
/// side effects: FAILED_PRECONDITION if it exists, NOT_FOUND if not).
pub async fn target_holds(svc: &Service, session: &str) -> bool {
    let req = pb::VerifyRequest {
        session_id: session.into(),
        expected_kv_len: u64::MAX,
        tree: Some(pb::TokenTree {
            tokens: vec![1],
            parents: vec![-1],
            scores: vec![],
        }),
        sampling: None,
        stop: None,
    };
    let mut client = TargetClient::new(connected(svc).await);
    match client.verify(req).await {
        Err(s) if s.code() == tonic::Code::NotFound => false,
        Err(s) if s.code() == tonic::Code::FailedPrecondition => true,
        other => panic!("unexpected {other:?}"),
    }
}

/// Whether the draft replica `svc` holds `session` (an Append beyond its length is
/// rejected without side effects: INVALID_ARGUMENT if it exists, NOT_FOUND if not).
pub async fn draft_holds(svc: &Service, session: &str) -> bool {
    let req = pb::AppendRequest {
        session_id: session.into(),
        keep_kv_len: u64::MAX,
        token_ids: vec![1],
        images: vec![],
        image_features: vec![],
        first_step: None,
        conversation_images: 0,
    };
    let mut client = DraftClient::new(connected(svc).await);
    match client.append(req).await {
        Err(s) if s.code() == tonic::Code::NotFound => false,
        Err(s) if s.code() == tonic::Code::InvalidArgument => true,
        other => panic!("unexpected {other:?}"),
    }
}

/// `GET /metrics` of a service started with a metrics endpoint: the exposition text.
pub async fn scrape_metrics(svc: &Service) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = svc.metrics_addr.as_ref().expect("started with metrics");
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    stream
        .write_all(
            format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .expect("sending the scrape");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .expect("reading the scrape");
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "scrape of {addr}: {head}");
    // Connection: close without chunking: hyper sends a Content-Length body.
    body.to_owned()
}

/// Generation parameters for `max_new_tokens` tokens, EOS ignored: greedy without a seed,
/// seeded sampling (T = 0.8, top-p 0.95) with one.
pub fn gen_params(max_new_tokens: u32, seed: Option<u64>) -> pb::GenerationParams {
    pb::GenerationParams {
        max_new_tokens,
        temperature: if seed.is_some() { 0.8 } else { 0.0 },
        top_p: if seed.is_some() { 0.95 } else { 0.0 },
        seed: seed.unwrap_or(0),
        ignore_eos: true,
        ..Default::default()
    }
}

/// A speculation config of `mode` with no shape set (the mode's defaults).
pub fn speculation(mode: pb::SpeculationMode) -> pb::SpeculationConfig {
    pb::SpeculationConfig {
        mode: mode as i32,
        ..Default::default()
    }
}

/// Reads a Generate stream to its end: the generated tokens and the final summary.
pub async fn collect_generation(
    mut stream: tonic::Streaming<pb::GenerateResponse>,
) -> Result<(Vec<u32>, pb::GenerateSummary), tonic::Status> {
    let (mut tokens, mut summary) = (Vec::new(), None);
    while let Some(msg) = stream.message().await? {
        match msg.event {
            Some(pb::generate_response::Event::Chunk(c)) => tokens.extend(c.token_ids),
            Some(pb::generate_response::Event::Summary(s)) => summary = Some(s),
            None => {}
        }
    }
    Ok((tokens, summary.expect("a final summary")))
}

/// One `Generate` call's tokens, read to the stream's end, or its error.
pub async fn generate_tokens(
    client: &mut GenerationClient<Channel>,
    req: pb::GenerateRequest,
) -> Result<Vec<u32>, tonic::Status> {
    let stream = client.generate(req).await?.into_inner();
    Ok(collect_generation(stream).await?.0)
}

/// Sends one HTTP/1.1 request (`Connection: close`, JSON body, the given `Authorization`
/// header value if any) to `addr` and returns the open connection to read the answer from.
pub fn http_send(
    addr: &str,
    method: &str,
    path: &str,
    authorization: Option<&str>,
    body: &[u8],
) -> std::net::TcpStream {
    use std::io::Write as _;
    let mut s = std::net::TcpStream::connect(addr).expect("connect the HTTP API");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let auth = authorization.map_or(String::new(), |a| format!("Authorization: {a}\r\n"));
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    s
}
