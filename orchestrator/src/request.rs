//! One validation step for both public APIs. Each front end translates its request into a
//! [`TurnRequest`] (domain types, nothing checked yet); [`validate`] turns it into a
//! [`ValidTurn`] under the [`ApiLimits`] (prompt size, sampling, stop strings, token budget,
//! images read up to their header), before any work is queued; only then does
//! [`crate::frontend::Frontend::start_turn`] admit and run it.

use bytes::Bytes;
use specllava_prompt::{ImageLimits, Message, PromptError, check_image_header};
use speculate::SamplingParams;

use crate::engine::GenParams;
use crate::error::OrchestratorError;
use crate::plan::SpecSettings;
use crate::prompt::{PromptLimits, check_prompt_bytes, text_bytes};

/// Request limits of the public APIs.
#[derive(Debug, Clone, Copy)]
pub struct ApiLimits {
    /// Image decoding limits.
    pub image: ImageLimits,
    /// Prompt size per turn (bytes before tokenizing, tokens after).
    pub prompt: PromptLimits,
    /// max_new_tokens when the request leaves it 0.
    pub default_max_new_tokens: u32,
    /// Largest accepted max_new_tokens.
    pub max_new_tokens_limit: u32,
    /// Most stop strings a request may carry.
    pub max_stop_strings: usize,
    /// Longest stop string, in bytes.
    pub max_stop_bytes: usize,
}

/// Where a turn's conversation comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConversationSource {
    /// A new conversation, closed on the replicas after its one turn.
    OneShot,
    /// A multi-turn session of the gRPC API (`CreateSession`); the turn follows its history.
    Session(String),
    /// The kept conversation whose history shares the longest prefix with the prompt (its KV
    /// reused), else a new one; kept after the turn for the next request (the HTTP API,
    /// which carries the whole conversation in every request).
    SharedPrefix,
}

/// The new text of a turn.
#[derive(Debug, Clone, PartialEq)]
pub enum TurnInput {
    /// One user message: the prompt of a new conversation (about its image, if any), or a
    /// follow-up in a session.
    UserText(String),
    /// A whole conversation, images as image parts in order.
    Messages(Vec<Message>),
}

impl TurnInput {
    /// Bytes of text (what the prompt byte limit counts).
    pub fn text_bytes(&self) -> usize {
        match self {
            TurnInput::UserText(t) => t.len(),
            TurnInput::Messages(m) => text_bytes(m),
        }
    }
}

/// Sampling and stopping as requested, before validation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestedParams {
    /// Most tokens to generate; 0: the server's default.
    pub max_new_tokens: u32,
    /// 0: greedy.
    pub temperature: f32,
    /// 0: off.
    pub top_k: u32,
    /// 0 (unset) or 1: off.
    pub top_p: f32,
    /// Seed of the sampling.
    pub seed: u64,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Generate past EOS.
    pub ignore_eos: bool,
}

/// A turn as a front end translated it.
#[derive(Debug, Clone, PartialEq)]
pub struct TurnRequest {
    /// Where the conversation comes from.
    pub source: ConversationSource,
    /// The new text.
    pub input: TurnInput,
    /// Encoded images (PNG, JPEG, WebP), one per image part or the one of a new
    /// conversation; shared, never copied on the way to the replicas.
    pub images: Vec<Bytes>,
    /// Sampling and stopping.
    pub params: RequestedParams,
    /// Speculation mode and shape.
    pub spec: SpecSettings,
}

/// A turn within every limit: what [`crate::frontend::Frontend::start_turn`] runs.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidTurn {
    /// Where the conversation comes from.
    pub source: ConversationSource,
    /// The new text (not empty, within the byte limit).
    pub input: TurnInput,
    /// Images whose headers passed the limits.
    pub images: Vec<Bytes>,
    /// Validated generation parameters.
    pub params: GenParams,
    /// Speculation mode and shape.
    pub spec: SpecSettings,
}

/// Checks a turn against `limits`, cheapest checks first: nothing here decodes an image (its
/// header is read), renders or tokenizes (the token count is checked after tokenizing).
pub fn validate(r: TurnRequest, limits: &ApiLimits) -> Result<ValidTurn, OrchestratorError> {
    if let TurnInput::UserText(t) = &r.input
        && t.trim().is_empty()
    {
        return Err(OrchestratorError::InvalidArgument(
            "prompt must not be empty".into(),
        ));
    }
    check_prompt_bytes(r.input.text_bytes(), &limits.prompt)?;
    let params = gen_params(r.params, limits)?;
    match (&r.source, &r.input) {
        (ConversationSource::Session(_), _) if !r.images.is_empty() => {
            return Err(OrchestratorError::InvalidArgument(
                "a session request must not carry an image (the session has one)".into(),
            ));
        }
        (ConversationSource::Session(_), TurnInput::Messages(_)) => {
            return Err(OrchestratorError::Internal(
                "a session turn takes one user message".into(),
            ));
        }
        _ => {}
    }
    check_image_count(r.images.len(), &limits.image)?;
    for image in &r.images {
        check_image(image, &limits.image)?;
    }
    Ok(ValidTurn {
        source: r.source,
        input: r.input,
        images: r.images,
        params,
        spec: r.spec,
    })
}

/// Refuses more images than a request may carry (before any is fetched or decoded).
pub fn check_image_count(n: usize, limits: &ImageLimits) -> Result<(), OrchestratorError> {
    limits
        .check_count(n)
        .map_err(|e| OrchestratorError::InvalidArgument(e.to_string()))
}

/// Checks an image's header under the limits (format, size, dimensions): oversized or
/// unreadable images are refused before any pixel is decoded; the replicas decode it.
pub fn check_image(bytes: &[u8], limits: &ImageLimits) -> Result<(), OrchestratorError> {
    check_image_header(bytes, limits)
        .map(|_| ())
        .map_err(|e| match e {
            PromptError::ImageTooLarge(m) => OrchestratorError::TooLarge(m),
            e => OrchestratorError::InvalidArgument(e.to_string()),
        })
}

/// Validated generation parameters (the server default for `max_new_tokens` 0); stop
/// strings capped in number and length (checked before any text is matched against them;
/// empty ones are ignored later).
fn gen_params(p: RequestedParams, limits: &ApiLimits) -> Result<GenParams, OrchestratorError> {
    if p.stop.len() > limits.max_stop_strings {
        return Err(OrchestratorError::InvalidArgument(format!(
            "{} stop strings: at most {} are accepted",
            p.stop.len(),
            limits.max_stop_strings
        )));
    }
    if let Some((i, s)) = p
        .stop
        .iter()
        .enumerate()
        .find(|(_, s)| s.len() > limits.max_stop_bytes)
    {
        return Err(OrchestratorError::InvalidArgument(format!(
            "stop string {i} is {} bytes long: at most {} are accepted",
            s.len(),
            limits.max_stop_bytes
        )));
    }
    let sampling = SamplingParams {
        temperature: p.temperature,
        top_k: p.top_k as usize,
        top_p: if p.top_p == 0.0 { 1.0 } else { p.top_p },
        seed: p.seed,
    };
    sampling
        .validate()
        .map_err(|e| OrchestratorError::InvalidArgument(e.to_string()))?;
    if p.max_new_tokens > limits.max_new_tokens_limit {
        return Err(OrchestratorError::InvalidArgument(format!(
            "max_new_tokens {} exceeds the limit of {}",
            p.max_new_tokens, limits.max_new_tokens_limit
        )));
    }
    Ok(GenParams {
        max_new_tokens: match p.max_new_tokens {
            0 => limits.default_max_new_tokens,
            n => n,
        },
        sampling,
        stop: p.stop,
        ignore_eos: p.ignore_eos,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ApiLimits {
        ApiLimits {
            image: ImageLimits::default(),
            prompt: PromptLimits {
                max_tokens: 16,
                max_bytes: 32,
            },
            default_max_new_tokens: 8,
            max_new_tokens_limit: 64,
            max_stop_strings: 2,
            max_stop_bytes: 4,
        }
    }

    fn request(text: &str, stop: &[&str]) -> TurnRequest {
        TurnRequest {
            source: ConversationSource::OneShot,
            input: TurnInput::UserText(text.into()),
            images: vec![],
            params: RequestedParams {
                stop: stop.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            },
            spec: SpecSettings::adaptive(),
        }
    }

    #[test]
    fn stop_strings_are_capped_in_number_and_length() {
        let l = limits();
        assert!(validate(request("hi", &["ab", "abcd"]), &l).is_ok());
        assert!(
            validate(request("hi", &["", "x"]), &l).is_ok(),
            "empty ones are ignored later"
        );
        for bad in [&["a", "b", "c"][..], &["abcde"], &["a", "ééé"]] {
            let err = validate(request("hi", bad), &l).unwrap_err();
            assert!(
                matches!(&err, OrchestratorError::InvalidArgument(m) if m.contains("at most")),
                "{bad:?}: {err}"
            );
        }
    }

    #[test]
    fn empty_long_and_misplaced_inputs_are_refused_before_any_work() {
        let l = limits();
        let err = validate(request("  ", &[]), &l).unwrap_err();
        assert!(err.to_string().contains("empty"), "{err}");
        let err = validate(request(&"x".repeat(33), &[]), &l).unwrap_err();
        assert!(matches!(err, OrchestratorError::TooLarge(_)), "{err}");
        let mut r = request("hi", &[]);
        r.source = ConversationSource::Session("s".into());
        r.images = vec![Bytes::from_static(b"\x89PNG")];
        let err = validate(r, &l).unwrap_err();
        assert!(err.to_string().contains("session"), "{err}");
        let mut r = request("hi", &[]);
        r.images = vec![Bytes::from_static(b"not an image")];
        let err = validate(r, &l).unwrap_err();
        assert!(
            matches!(err, OrchestratorError::InvalidArgument(_)),
            "{err}"
        );
        let mut r = request("hi", &[]);
        r.params.max_new_tokens = 65;
        assert!(validate(r, &l).is_err());
        let mut r = request("hi", &[]);
        r.params.top_p = 1.5;
        assert!(validate(r, &l).is_err());
    }

    #[test]
    fn defaults_apply_where_the_request_leaves_them_unset() {
        let v = validate(request("hi", &[]), &limits()).unwrap();
        assert_eq!(v.params.max_new_tokens, 8);
        assert_eq!(v.params.sampling.top_p, 1.0);
    }
}
