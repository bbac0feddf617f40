//! `specllava-client`: sends an image + prompt to the orchestrator, prints the
//! streamed text and the final statistics.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use specllava_proto::v1 as pb;
use specllava_proto::v1::generation_client::GenerationClient;

/// Spec-LLaVA command-line client.
#[derive(Debug, Parser)]
#[command(name = "specllava-client", version)]
struct Args {
    /// Orchestrator address.
    #[arg(
        long,
        env = "SPECLLAVA_ENDPOINT",
        default_value = "http://127.0.0.1:50050"
    )]
    endpoint: String,
    /// Image file (PNG, JPEG, WebP).
    #[arg(long, env = "SPECLLAVA_IMAGE")]
    image: Option<PathBuf>,
    /// The prompt.
    #[arg(long, env = "SPECLLAVA_PROMPT", default_value = "Describe the image.")]
    prompt: String,
    /// Maximum new tokens.
    #[arg(long, env = "SPECLLAVA_MAX_NEW_TOKENS", default_value_t = 64)]
    max_new_tokens: u32,
    /// Temperature (0 = greedy).
    #[arg(long, env = "SPECLLAVA_TEMPERATURE", default_value_t = 0.0)]
    temperature: f32,
    /// Top-p.
    #[arg(long, env = "SPECLLAVA_TOP_P", default_value_t = 1.0)]
    top_p: f32,
    /// Top-k (0 = off).
    #[arg(long, env = "SPECLLAVA_TOP_K", default_value_t = 0)]
    top_k: u32,
    /// Sampling seed.
    #[arg(long, env = "SPECLLAVA_SEED", default_value_t = 0)]
    seed: u64,
    /// Speculation mode: adaptive (the budget policy shapes every tree), dynamic, chain,
    /// static or off.
    #[arg(long, env = "SPECLLAVA_MODE", default_value = "adaptive")]
    mode: String,
    /// Tree depth D (0 = policy).
    #[arg(long, env = "SPECLLAVA_DEPTH", default_value_t = 0)]
    depth: u32,
    /// Branching K (0 = policy).
    #[arg(long, env = "SPECLLAVA_BRANCHING", default_value_t = 0)]
    branching: u32,
    /// Budget M (0 = policy).
    #[arg(long, env = "SPECLLAVA_BUDGET", default_value_t = 0)]
    budget: u32,
    /// Do not let the draft pre-draft while the target verifies (draft-ahead).
    #[arg(long, env = "SPECLLAVA_NO_DRAFT_AHEAD")]
    no_draft_ahead: bool,
    /// Stop strings (repeatable; comma-separated in the environment variable).
    #[arg(long, env = "SPECLLAVA_STOP", value_delimiter = ',')]
    stop: Vec<String>,
    /// Bearer token sent as `authorization: Bearer <token>` (when the orchestrator has
    /// --api-keys / --api-keys-file).
    #[arg(long, env = "SPECLLAVA_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Connect over TLS, trusting this CA (PEM); an `http://` endpoint becomes `https://`.
    #[arg(long, env = "SPECLLAVA_CLIENT_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for an orchestrator that requires one (with --tls-key).
    #[arg(
        long,
        env = "SPECLLAVA_CLIENT_TLS_CERT",
        requires_all = ["tls_key", "tls_ca"]
    )]
    tls_cert: Option<PathBuf>,
    /// Private key of --tls-cert (PEM).
    #[arg(long, env = "SPECLLAVA_CLIENT_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Name the orchestrator's certificate must carry (default: the endpoint's host).
    #[arg(long, env = "SPECLLAVA_CLIENT_TLS_DOMAIN", requires = "tls_ca")]
    tls_domain: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let image = match &args.image {
        Some(p) => std::fs::read(p).with_context(|| format!("reading {}", p.display()))?,
        None => Vec::new(),
    };
    let mode = match args.mode.as_str() {
        "adaptive" => pb::SpeculationMode::Adaptive,
        "dynamic" => pb::SpeculationMode::Dynamic,
        "chain" => pb::SpeculationMode::Chain,
        "static" => pb::SpeculationMode::Static,
        "off" => pb::SpeculationMode::Off,
        other => anyhow::bail!("unknown mode {other:?} (adaptive, dynamic, chain, static, off)"),
    };
    let mut endpoint = args.endpoint.clone();
    if args.tls_ca.is_some()
        && let Some(rest) = endpoint.strip_prefix("http://")
    {
        endpoint = format!("https://{rest}");
    }
    let mut channel = tonic::transport::Endpoint::from_shared(endpoint.clone())
        .with_context(|| format!("endpoint {endpoint}"))?;
    if let Some(ca) = &args.tls_ca {
        let identity = args.tls_cert.as_deref().zip(args.tls_key.as_deref());
        let tls = specllava_server::tls::client_config(ca, identity, args.tls_domain.as_deref())?;
        channel = channel.tls_config(tls)?;
    }
    let channel = channel
        .connect()
        .await
        .with_context(|| format!("connecting to {endpoint}"))?;
    let mut client = GenerationClient::new(channel)
        .max_decoding_message_size(64 * 1024 * 1024)
        .max_encoding_message_size(64 * 1024 * 1024);
    let req = pb::GenerateRequest {
        session_id: String::new(),
        image: image.into(),
        prompt: args.prompt.clone(),
        params: Some(pb::GenerationParams {
            max_new_tokens: args.max_new_tokens,
            temperature: args.temperature,
            top_p: args.top_p,
            top_k: args.top_k,
            seed: args.seed,
            stop: args.stop.clone(),
            ignore_eos: false,
        }),
        speculation: Some(pb::SpeculationConfig {
            mode: mode as i32,
            depth: args.depth,
            branching: args.branching,
            budget: args.budget,
            disable_draft_ahead: args.no_draft_ahead,
        }),
    };
    println!("USER: {}", args.prompt);
    print!("ASSISTANT:");
    std::io::stdout().flush()?;
    let mut req = tonic::Request::new(req);
    if let Some(token) = &args.token {
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}")
                .parse()
                .context("the token is not a valid header value")?,
        );
    }
    let mut stream = client.generate(req).await?.into_inner();
    let mut summary = None;
    while let Some(msg) = stream.message().await? {
        match msg.event {
            Some(pb::generate_response::Event::Chunk(c)) => {
                print!("{}", c.text);
                std::io::stdout().flush()?;
            }
            Some(pb::generate_response::Event::Summary(s)) => summary = Some(s),
            None => {}
        }
    }
    println!();
    let Some(s) = summary else {
        anyhow::bail!("the stream ended without a summary")
    };
    let finish = pb::FinishReason::try_from(s.finish)
        .map(|f| f.as_str_name())
        .unwrap_or("?");
    let usage = s.usage.unwrap_or_default();
    let st = s.stats.unwrap_or_default();
    let ms = |ns: u64| ns as f64 / 1e6;
    println!("---");
    println!(
        "finish: {finish}  prompt tokens: {}  generated tokens: {}",
        usage.prompt_tokens, usage.completion_tokens
    );
    println!(
        "speculative: {}  steps: {}  drafted: {}  accepted: {}  mean tokens/step: {:.2}",
        st.speculative, st.steps, st.drafted, st.accepted, st.mean_accepted_length
    );
    let per_depth: Vec<String> = st
        .acceptance_per_depth
        .iter()
        .map(|a| format!("{a:.2}"))
        .collect();
    println!("acceptance per depth: [{}]", per_depth.join(", "));
    println!(
        "time: total {:.1} ms  first token {:.1} ms  prefill {:.1} ms  draft {:.1} ms  verify {:.1} ms  network {:.1} ms  ({:.1} tokens/s)",
        ms(st.total_ns),
        ms(st.time_to_first_token_ns),
        ms(st.prefill_ns),
        ms(st.draft_ns),
        ms(st.verify_ns),
        ms(st.network_ns),
        st.tokens_per_second
    );
    Ok(())
}
