//! The public `specllava.v1.Generation` gRPC service: validation, limits,
//! sessions, and the streaming Generate handler.

use std::pin::Pin;
use std::sync::Arc;

use specllava_prompt::Message;
use specllava_proto::v1 as pb;
use specllava_proto::v1::generation_server::Generation;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::engine::Interrupted;
use crate::error::OrchestratorError;
use crate::frontend::{Frontend, spec_settings};
use crate::session::{Conversation, new_session_id};

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
        let r = request.into_inner();
        if r.prompt.trim().is_empty() {
            return Err(
                OrchestratorError::InvalidArgument("prompt must not be empty".into()).into(),
            );
        }
        let front = &self.front;
        // Before anything costly (the image, tokenizing).
        front.prompter.check_bytes(r.prompt.len())?;
        let params = front.gen_params(r.params.unwrap_or_default())?;
        let spec = spec_settings(r.speculation)?;
        let permit = front.admit()?;
        let (conv, one_shot) = if r.session_id.is_empty() {
            if !r.image.is_empty() {
                front.check_image(&r.image)?;
            }
            let images = if r.image.is_empty() {
                vec![]
            } else {
                vec![r.image]
            };
            let c = Conversation::new(new_session_id(), images);
            (Arc::new(tokio::sync::Mutex::new(c)), true)
        } else {
            if !r.image.is_empty() {
                return Err(OrchestratorError::InvalidArgument(
                    "a session request must not carry an image (the session has one)".into(),
                )
                .into());
            }
            (front.sessions.get(&r.session_id)?, false)
        };
        let mut guard = conv
            .clone()
            .try_lock_owned()
            .map_err(|_| OrchestratorError::SessionBusy(r.session_id.clone()))?;
        let (first_turn, images) = (guard.history.is_empty(), guard.images.len());
        let last_token = guard.history.last().copied();
        let text = r.prompt;
        let prompt = front
            .prompt(move |p| {
                if first_turn {
                    p.conversation(&[Message::user(&text, images > 0)], images)
                } else {
                    p.follow_up(last_token, &text)
                }
            })
            .await?;
        let prompt_tokens = prompt.len() as u32;
        let front = Arc::clone(&self.front);
        let (tx, rx) = mpsc::channel(32);
        // One span per turn, child of the request span; the draft and target calls made
        // inside it carry its trace context, so the turn is one trace across the services.
        let span = tracing::info_span!("generate", session = %guard.id, one_shot, prompt_tokens);
        tokio::spawn(
            async move {
                let _permit = permit;
                let conv = &mut *guard;
                let res = front
                    .run_turn(conv, &prompt, prompt_tokens, &params, &spec, &tx)
                    .await;
                if let Err(Interrupted::Failed(e)) = res {
                    let _ = tx.send(Err(e.into())).await;
                }
                if one_shot {
                    front.engine.close_replicas(conv);
                }
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn create_session(
        &self,
        request: Request<pb::CreateSessionRequest>,
    ) -> Result<Response<pb::CreateSessionResponse>, Status> {
        specllava_telemetry::metrics().record_request("CreateSession");
        let r = request.into_inner();
        if !r.image.is_empty() {
            self.front.check_image(&r.image)?;
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
