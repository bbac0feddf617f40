//! One `Generate` call on the orchestrator's public API, timed on the client.

use std::time::Instant;

use serde::Serialize;
use specllava_proto::v1::generate_response::Event;
use specllava_proto::v1::generation_client::GenerationClient;
use specllava_proto::v1::{GenerateRequest, SpeculationStats};
use thiserror::Error;
use tokio_stream::StreamExt;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::evalset::EvalItem;
use crate::modes::{Mode, Sampling};

/// A failed request.
#[derive(Debug, Error)]
pub enum DriverError {
    /// The server answered with an error status.
    #[error("Generate failed: {0}")]
    Status(#[from] tonic::Status),
    /// The stream ended without a summary.
    #[error("Generate stream ended without a summary after {0} tokens")]
    NoSummary(usize),
}

/// What one request produced, timed on the client.
#[derive(Debug, Clone, Serialize)]
pub struct RequestResult {
    /// Generated token ids.
    pub tokens: Vec<u32>,
    /// Generated text (from the summary).
    pub text: String,
    /// Arrival of each chunk, ns since the request was sent, with its token count.
    pub chunks: Vec<(u64, u32)>,
    /// ns from sending the request to the end of the stream.
    pub total_ns: u64,
    /// Server-side statistics from the final message.
    pub stats: ServerStats,
}

/// The server's speculation statistics (a serialisable copy of the proto message).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ServerStats {
    /// Verification steps.
    pub steps: u32,
    /// Draft nodes proposed.
    pub drafted: u32,
    /// Draft tokens accepted.
    pub accepted: u32,
    /// Acceptance rate per depth (index 0 = depth 1).
    pub acceptance_per_depth: Vec<f32>,
    /// Time drafting, ns.
    pub draft_ns: u64,
    /// Time verifying, ns.
    pub verify_ns: u64,
    /// Time in network and queues, ns.
    pub network_ns: u64,
    /// Time in prefill, ns.
    pub prefill_ns: u64,
    /// Wall time on the orchestrator, ns.
    pub total_ns: u64,
    /// Time to first token on the orchestrator, ns.
    pub time_to_first_token_ns: u64,
    /// Whether the draft was used.
    pub speculative: bool,
    /// Draft-ahead guesses that were right.
    pub ahead_hits: u32,
    /// Draft-ahead guesses that were wrong.
    pub ahead_misses: u32,
    /// Spare-time drafting the hits saved, ns.
    pub ahead_saved_ns: u64,
}

impl From<SpeculationStats> for ServerStats {
    fn from(s: SpeculationStats) -> Self {
        Self {
            steps: s.steps,
            drafted: s.drafted,
            accepted: s.accepted,
            acceptance_per_depth: s.acceptance_per_depth,
            draft_ns: s.draft_ns,
            verify_ns: s.verify_ns,
            network_ns: s.network_ns,
            prefill_ns: s.prefill_ns,
            total_ns: s.total_ns,
            ahead_hits: s.ahead_hits,
            ahead_misses: s.ahead_misses,
            ahead_saved_ns: s.ahead_saved_ns,
            time_to_first_token_ns: s.time_to_first_token_ns,
            speculative: s.speculative,
        }
    }
}

impl RequestResult {
    /// Client-side time to first token, ns.
    pub fn ttft_ns(&self) -> Option<u64> {
        self.chunks.first().map(|c| c.0)
    }

    /// Tokens decoded after the first chunk: a first chunk of several tokens (a tree
    /// verified before anything was streamed) arrives with the first token's latency, and
    /// its tokens are no part of the decode time.
    pub fn decode_tokens(&self) -> usize {
        let first = self.chunks.first().map_or(0, |c| c.1 as usize);
        self.tokens.len().saturating_sub(first.max(1))
    }

    /// Decode time: from the first token to the last, ns.
    pub fn decode_ns(&self) -> u64 {
        match (self.chunks.first(), self.chunks.last()) {
            (Some(a), Some(b)) => b.0 - a.0,
            _ => 0,
        }
    }

    /// Latency of each generated token after the first chunk: the gap between its chunk and the
    /// previous one, shared by the chunk's tokens. In ns.
    pub fn per_token_latencies_ns(&self) -> Vec<f64> {
        self.chunks
            .windows(2)
            .flat_map(|w| {
                let n = w[1].1.max(1);
                let each = (w[1].0 - w[0].0) as f64 / f64::from(n);
                std::iter::repeat_n(each, n as usize)
            })
            .collect()
    }

    /// Tokens emitted per step: the token count of each chunk (the orchestrator streams one chunk
    /// per verification step).
    pub fn tokens_per_step(&self) -> impl Iterator<Item = u32> + '_ {
        self.chunks.iter().map(|c| c.1)
    }
}

/// The public API's transport as the benchmark uses it: a channel that adds the bearer
/// token (`--token`), if any, to every call.
pub type ApiChannel = InterceptedService<Channel, BearerToken>;

/// A client of the public API over an [`ApiChannel`].
pub type ApiClient = GenerationClient<ApiChannel>;

/// Adds `authorization: Bearer <token>` to every call (nothing without a token).
#[derive(Debug, Clone, Default)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl BearerToken {
    /// The header for `token` (`None`: no header); fails on a token that is no valid
    /// header value.
    pub fn new(token: Option<&str>) -> Result<Self, tonic::metadata::errors::InvalidMetadataValue> {
        token
            .map(|t| format!("Bearer {t}").parse())
            .transpose()
            .map(Self)
    }
}

impl Interceptor for BearerToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            request.metadata_mut().insert("authorization", v.clone());
        }
        Ok(request)
    }
}

/// `channel` carrying `token` on every call.
pub fn api_channel(channel: Channel, token: BearerToken) -> ApiChannel {
    InterceptedService::new(channel, token)
}

/// Sends one request and reads the stream to the end.
pub async fn generate(
    client: &mut ApiClient,
    item: &EvalItem,
    mode: Mode,
    sampling: Sampling,
    max_new_tokens: u32,
) -> Result<RequestResult, DriverError> {
    let request = GenerateRequest {
        session_id: String::new(),
        image: item.image.clone().into(),
        prompt: item.prompt.clone(),
        params: Some(sampling.params(max_new_tokens, item.seed)),
        speculation: Some(mode.speculation()),
    };
    send(client, request).await
}

/// Sends `request` and reads the stream to the end.
pub async fn send(
    client: &mut ApiClient,
    request: GenerateRequest,
) -> Result<RequestResult, DriverError> {
    let start = Instant::now();
    let mut stream = client.generate(request).await?.into_inner();
    let (mut tokens, mut chunks) = (Vec::new(), Vec::new());
    while let Some(msg) = stream.next().await {
        match msg?.event {
            Some(Event::Chunk(c)) if !c.token_ids.is_empty() => {
                chunks.push((start.elapsed().as_nanos() as u64, c.token_ids.len() as u32));
                tokens.extend_from_slice(&c.token_ids);
            }
            Some(Event::Summary(s)) => {
                let total_ns = start.elapsed().as_nanos() as u64;
                // Drain (the summary is the last message).
                while stream.next().await.is_some() {}
                return Ok(RequestResult {
                    tokens,
                    text: s.text,
                    chunks,
                    total_ns,
                    stats: s.stats.map(ServerStats::from).unwrap_or_default(),
                });
            }
            _ => {}
        }
    }
    Err(DriverError::NoSummary(tokens.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_token_latency_shares_a_chunk_gap_among_its_tokens() {
        let r = RequestResult {
            tokens: vec![1; 6],
            text: String::new(),
            chunks: vec![(100, 1), (400, 3), (500, 2)],
            total_ns: 600,
            stats: ServerStats::default(),
        };
        assert_eq!(r.ttft_ns(), Some(100));
        assert_eq!(r.decode_ns(), 400);
        assert_eq!(r.decode_tokens(), 5);
        let several_first = RequestResult {
            chunks: vec![(100, 3), (400, 3)],
            ..r.clone()
        };
        assert_eq!(
            several_first.decode_tokens(),
            3,
            "the first chunk's are not decoded"
        );
        assert_eq!(
            r.per_token_latencies_ns(),
            vec![100.0, 100.0, 100.0, 50.0, 50.0]
        );
        assert_eq!(r.tokens_per_step().collect::<Vec<_>>(), vec![1, 3, 2]);
    }
}
