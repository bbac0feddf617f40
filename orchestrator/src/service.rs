//! The public `specllava.v1.Generation` gRPC service: it translates requests into the front
//! door's domain types and turn events back to the wire, nothing more.

use std::pin::Pin;
use std::sync::Arc;

use specllava_proto::v1 as pb;
use specllava_proto::v1::generation_server::Generation;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::error::OrchestratorError;
use crate::events::{Finish, TurnEvent};
use crate::frontend::{Frontend, spec_settings};
use crate::request::{ConversationSource, RequestedParams, TurnInput, TurnRequest, check_image};
use crate::session::{Conversation, new_session_id};
use crate::stats::TurnStats;

/// The Generation service.
pub struct GenerationService {
    front: Arc<Frontend>,
}

impl GenerationService {
    /// A service over the shared front door.
    pub fn new(front: Arc<Frontend>) -> Self {
        Self { front }
    }
}

type GenerateStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Generation for GenerationService {
    type GenerateStream = GenerateStream;

    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        specllava_telemetry::metrics().record_request("Generate");
        let turn = turn_request(request.into_inner())?;
        let stream = self.front.start_turn(turn).await?;
        let events = ReceiverStream::new(stream.events).map(|e| match e {
            Ok(event) => Ok(event_to_proto(event)),
            Err(e) => Err(Status::from(e)),
        });
        Ok(Response::new(Box::pin(events)))
    }

    async fn create_session(
        &self,
        request: Request<pb::CreateSessionRequest>,
    ) -> Result<Response<pb::CreateSessionResponse>, Status> {
        specllava_telemetry::metrics().record_request("CreateSession");
        let r = request.into_inner();
        if !r.image.is_empty() {
            check_image(&r.image, &self.front.limits.image)?;
        }
        let id = new_session_id();
        let images = if r.image.is_empty() {
            vec![]
        } else {
            vec![r.image]
        };
        self.front
            .sessions
            .insert(Conversation::new(id.clone(), images))?;
        tracing::info!(session = %id, "session created");
        Ok(Response::new(pb::CreateSessionResponse { session_id: id }))
    }

    async fn close_session(
        &self,
        request: Request<pb::CloseSessionRequest>,
    ) -> Result<Response<pb::CloseSessionResponse>, Status> {
        specllava_telemetry::metrics().record_request("CloseSession");
        let id = request.into_inner().session_id;
        let Some(conv) = self.front.sessions.remove(&id) else {
            return Ok(Response::new(pb::CloseSessionResponse { existed: false }));
        };
        let engine = Arc::clone(&self.front.engine);
        // Waits for a running turn of this session to end, then frees the replicas.
        tokio::spawn(
            async move {
                let mut c = conv.lock().await;
                engine.close_replicas(&mut c);
            }
            .instrument(tracing::Span::current()),
        );
        tracing::info!(session = %id, "session closed");
        Ok(Response::new(pb::CloseSessionResponse { existed: true }))
    }
}

/// A `GenerateRequest` as the front door's turn request (checked by
/// [`crate::request::validate`]); an unknown speculation mode is refused here.
pub fn turn_request(r: pb::GenerateRequest) -> Result<TurnRequest, OrchestratorError> {
    Ok(TurnRequest {
        source: if r.session_id.is_empty() {
            ConversationSource::OneShot
        } else {
            ConversationSource::Session(r.session_id)
        },
        input: TurnInput::UserText(r.prompt),
        images: if r.image.is_empty() {
            vec![]
        } else {
            vec![r.image]
        },
        params: requested_params(r.params.unwrap_or_default()),
        spec: spec_settings(r.speculation)?,
    })
}

/// The wire generation parameters as requested (validated by [`crate::request::validate`]).
pub fn requested_params(p: pb::GenerationParams) -> RequestedParams {
    RequestedParams {
        max_new_tokens: p.max_new_tokens,
        temperature: p.temperature,
        top_k: p.top_k,
        top_p: p.top_p,
        seed: p.seed,
        stop: p.stop,
        ignore_eos: p.ignore_eos,
    }
}

/// A turn's event on the wire.
pub fn event_to_proto(event: TurnEvent) -> pb::GenerateResponse {
    use pb::generate_response::Event;
    let event = match event {
        TurnEvent::Tokens { ids, text, .. } => Event::Chunk(pb::TokenChunk {
            token_ids: ids,
            text,
        }),
        TurnEvent::Finished(s) => Event::Summary(pb::GenerateSummary {
            finish: match s.finish {
                Finish::Eos => pb::FinishReason::Eos,
                Finish::Length => pb::FinishReason::Length,
                Finish::StopString => pb::FinishReason::StopString,
            } as i32,
            usage: Some(pb::Usage {
                prompt_tokens: s.prompt_tokens,
                completion_tokens: s.completion_tokens,
            }),
            stats: Some(stats_to_proto(s.stats)),
            text: s.text,
        }),
    };
    pb::GenerateResponse { event: Some(event) }
}

/// A turn's statistics on the wire.
fn stats_to_proto(s: TurnStats) -> pb::SpeculationStats {
    pb::SpeculationStats {
        steps: s.steps,
        drafted: s.drafted,
        accepted: s.accepted,
        mean_accepted_length: s.mean_accepted_length,
        acceptance_per_depth: s.acceptance_per_depth,
        draft_ns: s.draft_ns,
        verify_ns: s.verify_ns,
        network_ns: s.network_ns,
        total_ns: s.total_ns,
        time_to_first_token_ns: s.time_to_first_token_ns,
        prefill_ns: s.prefill_ns,
        speculative: s.speculative,
        ahead_hits: s.ahead_hits,
        ahead_misses: s.ahead_misses,
        ahead_saved_ns: s.ahead_saved_ns,
        pipelined_steps: s.pipelined_steps,
        tokens_per_second: s.tokens_per_second,
    }
}
