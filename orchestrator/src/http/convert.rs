//! Translation of an OpenAI chat-completions request into what the shared front door takes:
//! chat-template messages, the images in placeholder order, and the requested parameters
//! (validated by the same code as the gRPC API's, stop-string caps included).

use serde_json::Value;
use specllava_prompt::Message;
use specllava_prompt::chat::{Content, Part};

use super::error::ApiError;
use super::types::{ChatCompletionRequest, ContentPart, MessageContent, SpeculationRequest, Stop};
use crate::frontend::spec_settings;
use crate::plan::SpecSettings;
use crate::request::{ConversationSource, RequestedParams, TurnInput, TurnRequest};
use specllava_proto::v1 as pb;

/// A request checked and translated.
#[derive(Debug)]
pub struct Translated {
    /// The conversation, images as `{"type": "image"}` parts.
    pub messages: Vec<Message>,
    /// The image URLs, one per image part, in order.
    pub image_urls: Vec<String>,
    /// Sampling and stopping (validated by the front door).
    pub params: RequestedParams,
    /// How to speculate.
    pub spec: SpecSettings,
}

/// Checks the request's fields and translates it.
pub fn translate(req: ChatCompletionRequest) -> Result<Translated, ApiError> {
    check_other_fields(&req.other)?;
    if req.n.is_some_and(|n| n != 1) {
        return Err(ApiError::bad("n", "only n = 1 is supported"));
    }
    if req.logprobs {
        return Err(ApiError::bad("logprobs", "logprobs are not supported"));
    }
    if req
        .tools
        .as_ref()
        .is_some_and(|t| !t.as_array().is_some_and(Vec::is_empty))
    {
        return Err(ApiError::bad("tools", "tools are not supported"));
    }
    let max_new_tokens = req.max_completion_tokens.or(req.max_tokens);
    if max_new_tokens == Some(0) {
        return Err(ApiError::bad(
            "max_completion_tokens",
            "max_completion_tokens must be at least 1",
        ));
    }
    // OpenAI's default temperature is 1; an unseeded sampled request gets a random seed.
    let temperature = req.temperature.unwrap_or(1.0);
    let seed = match req.seed {
        Some(s) => u64::try_from(s).map_err(|_| ApiError::bad("seed", "seed must be >= 0"))?,
        None => rand::random(),
    };
    if req.top_p == Some(0.0) {
        return Err(ApiError::bad("top_p", "top_p must be in (0, 1]"));
    }
    let stop = match req.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    let (messages, image_urls) = translate_messages(req.messages)?;
    let mut spec = match req.speculation {
        None => SpecSettings::adaptive(),
        Some(s) => speculation(s)?,
    };
    spec.report_steps = req.speculation_steps;
    Ok(Translated {
        messages,
        image_urls,
        spec,
        params: RequestedParams {
            max_new_tokens: max_new_tokens.unwrap_or(0),
            temperature,
            top_p: req.top_p.unwrap_or(0.0),
            top_k: req.top_k.unwrap_or(0),
            seed,
            stop,
            ignore_eos: req.ignore_eos,
        },
    })
}

/// Fields of OpenAI's chat-completions schema that cannot change the output: accepted and
/// ignored (bookkeeping, caching and latency hints).
pub const IGNORED_FIELDS: &[&str] = &[
    "user",
    "metadata",
    "store",
    "service_tier",
    "prompt_cache_key",
    "safety_identifier",
    "parallel_tool_calls",
    "prediction",
];

/// Refuses every field of `other` (the request fields not served as such) that would change
/// the output: a field of OpenAI's schema not honoured here (unless it has its no-op value,
/// e.g. `frequency_penalty: 0`, `response_format: {"type": "text"}`), or any field this
/// server does not know. A 400 names it; nothing is silently ignored.
fn check_other_fields(other: &serde_json::Map<String, Value>) -> Result<(), ApiError> {
    for (name, value) in other {
        if IGNORED_FIELDS.contains(&name.as_str()) || value.is_null() {
            continue;
        }
        let no_op = match name.as_str() {
            "frequency_penalty" | "presence_penalty" | "top_logprobs" => {
                value.as_f64() == Some(0.0)
            }
            "logit_bias" => value.as_object().is_some_and(|m| m.is_empty()),
            "response_format" => value.get("type").and_then(Value::as_str) == Some("text"),
            "tool_choice" => value.as_str() == Some("none"),
            "functions" => value.as_array().is_some_and(|a| a.is_empty()),
            "modalities" => *value == serde_json::json!(["text"]),
            _ => false,
        };
        if no_op {
            continue;
        }
        let why = match name.as_str() {
            "response_format" => "structured output (json_object / json_schema) is not supported",
            "logit_bias" => "logit_bias is not supported",
            "frequency_penalty" | "presence_penalty" => "penalties are not supported (0 only)",
            "top_logprobs" => "logprobs are not supported",
            "tool_choice" | "functions" | "function_call" => "tools are not supported",
            "modalities" | "audio" => "only text output is served",
            "reasoning_effort" | "verbosity" | "web_search_options" => {
                "not supported by this model"
            }
            _ => "unknown field (not part of the served API; see the README for the fields)",
        };
        return Err(ApiError::bad(name.clone(), format!("{name}: {why}")));
    }
    Ok(())
}

/// The front door's turn request for a translated request: the whole conversation,
/// continuing a kept one where it can. Its images (`image_urls`, in order) are added once
/// the turn is admitted ([`crate::frontend::Frontend::add_image`]).
pub fn turn_request(t: Translated) -> TurnRequest {
    TurnRequest {
        source: ConversationSource::SharedPrefix,
        input: TurnInput::Messages(t.messages),
        images: Vec::new(),
        params: t.params,
        spec: t.spec,
    }
}

/// The `speculation` extension as the gRPC API's settings (the same checks).
fn speculation(s: SpeculationRequest) -> Result<SpecSettings, ApiError> {
    let mode = match s.mode.as_deref().unwrap_or("adaptive") {
        "adaptive" => pb::SpeculationMode::Adaptive,
        "dynamic" => pb::SpeculationMode::Dynamic,
        "static" => pb::SpeculationMode::Static,
        "chain" => pb::SpeculationMode::Chain,
        "off" => pb::SpeculationMode::Off,
        other => {
            return Err(ApiError::bad(
                "speculation.mode",
                format!("speculation.mode {other:?}: one of adaptive, dynamic, static, chain, off"),
            ));
        }
    };
    spec_settings(Some(pb::SpeculationConfig {
        mode: mode as i32,
        depth: s.depth,
        branching: s.branching,
        budget: s.budget,
        disable_draft_ahead: s.disable_draft_ahead,
    }))
    .map_err(|e| ApiError::bad("speculation", e.to_string()))
}

fn translate_messages(
    messages: Vec<super::types::ChatMessage>,
) -> Result<(Vec<Message>, Vec<String>), ApiError> {
    if messages.is_empty() {
        return Err(ApiError::bad("messages", "messages must not be empty"));
    }
    if !messages.iter().any(|m| m.role == "user") {
        return Err(ApiError::bad("messages", "no user message"));
    }
    let mut out = Vec::with_capacity(messages.len());
    let mut urls = Vec::new();
    for (i, m) in messages.into_iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            other => {
                return Err(ApiError::bad(
                    "messages",
                    format!(
                        "messages[{i}]: role {other:?} is not supported (system, user, assistant)"
                    ),
                ));
            }
        };
        let content = match m.content {
            Some(MessageContent::Text(t)) => Content::Text(t),
            Some(MessageContent::Parts(parts)) => {
                let mut out_parts = Vec::with_capacity(parts.len());
                for p in parts {
                    match p {
                        ContentPart::Text { text } => out_parts.push(Part::Text { text }),
                        ContentPart::ImageUrl { image_url } if role == "user" => {
                            urls.push(image_url.url().to_owned());
                            out_parts.push(Part::Image);
                        }
                        ContentPart::ImageUrl { .. } => {
                            return Err(ApiError::bad(
                                "messages",
                                format!("messages[{i}]: only user messages may carry images"),
                            ));
                        }
                    }
                }
                Content::Parts(out_parts)
            }
            None if role == "assistant" => Content::Text(String::new()),
            None => {
                return Err(ApiError::bad(
                    "messages",
                    format!("messages[{i}]: content is missing"),
                ));
            }
        };
        out.push(Message {
            role: role.to_owned(),
            content,
        });
    }
    Ok((out, urls))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(json: serde_json::Value) -> Result<Translated, ApiError> {
        translate(serde_json::from_value(json).unwrap())
    }

    #[test]
    fn translates_parts_params_and_defaults() {
        let t = req(serde_json::json!({
            "model": "m",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                    {"type": "text", "text": "What is this?"}]},
                {"role": "assistant", "content": "A square."},
                {"role": "user", "content": "Sure?"}],
            "max_tokens": 7, "temperature": 0, "seed": 3, "stop": "\n"
        }))
        .unwrap();
        assert_eq!(t.image_urls, ["data:image/png;base64,AAAA"]);
        assert_eq!(t.messages.len(), 4);
        assert_eq!(t.messages[1], Message::user("What is this?", true));
        assert_eq!(
            (t.params.max_new_tokens, t.params.temperature, t.params.seed),
            (7, 0.0, 3)
        );
        assert_eq!(t.params.stop, ["\n"]);
        let d = req(serde_json::json!({"messages": [{"role": "user", "content": "hi"}]})).unwrap();
        assert_eq!((d.params.max_new_tokens, d.params.temperature), (0, 1.0));
    }

    #[test]
    fn refuses_what_is_not_served() {
        let bad = |j: serde_json::Value, param: &str| match req(j) {
            Err(ApiError::BadRequest { param: Some(p), .. }) => assert_eq!(p, param),
            other => panic!("{other:?}"),
        };
        let user = serde_json::json!([{"role": "user", "content": "hi"}]);
        bad(serde_json::json!({"messages": user, "n": 2}), "n");
        bad(serde_json::json!({"messages": user, "seed": -1}), "seed");
        bad(
            serde_json::json!({"messages": user, "max_tokens": 0}),
            "max_completion_tokens",
        );
        bad(serde_json::json!({"messages": []}), "messages");
        bad(
            serde_json::json!({"messages": [{"role": "tool", "content": "x"}]}),
            "messages",
        );
        // Fields that would change the output are refused by name, unless they have their
        // no-op value; bookkeeping fields are accepted; unknown fields are refused.
        for (field, value) in [
            (
                "response_format",
                serde_json::json!({"type": "json_object"}),
            ),
            ("logit_bias", serde_json::json!({"42": 5})),
            ("frequency_penalty", serde_json::json!(0.5)),
            ("presence_penalty", serde_json::json!(-1)),
            ("tool_choice", serde_json::json!("auto")),
            ("modalities", serde_json::json!(["text", "audio"])),
            ("no_such_field", serde_json::json!(1)),
        ] {
            bad(serde_json::json!({"messages": user, field: value}), field);
        }
        for (field, value) in [
            ("response_format", serde_json::json!({"type": "text"})),
            ("logit_bias", serde_json::json!({})),
            ("frequency_penalty", serde_json::json!(0)),
            ("presence_penalty", serde_json::json!(0.0)),
            ("user", serde_json::json!("u-1")),
            ("metadata", serde_json::json!({"k": "v"})),
            ("store", serde_json::json!(false)),
        ] {
            assert!(
                req(serde_json::json!({"messages": user, field: value})).is_ok(),
                "{field}"
            );
        }
    }
}
