//! Fuzzing the public APIs' request path up to the engine: `GenerateRequest` bytes (random,
//! or near-valid encodings flipped and cut) and OpenAI chat-completion bodies (JSON built
//! from edge values, then flipped and cut) go through decoding, each API's translation
//! ([`turn_request`] for gRPC, [`translate`] + `data:` image URLs + [`http_turn_request`] for
//! HTTP), the one validation both APIs run ([`validate`]: limits, sampling, stop strings,
//! image headers), and the prompt ([`prompt_ids`]: the chat template + tokenizer of the
//! committed target checkpoint), exactly as `Frontend::start_turn` runs them; generated ids go through incremental detokenization with stop strings
//! ([`TextStream`]). Each step answers or refuses cleanly: no panic, no allocation over the
//! cap. `SPECLLAVA_FUZZ_CASES` sets the case count.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use orchestrator::frontend::prompt_ids;
use orchestrator::http::convert::{translate, turn_request as http_turn_request};
use orchestrator::http::images::{self, RemoteImages};
use orchestrator::http::types::ChatCompletionRequest;
use orchestrator::prompt::{PromptLimits, Prompter};
use orchestrator::request::{ApiLimits, ConversationSource, ValidTurn, check_image, validate};
use orchestrator::service::turn_request;
use orchestrator::text::TextStream;
use proptest::prelude::*;
use proptest::test_runner::TestRunner;
use prost::Message as _;
use serde_json::{Value, json};
use specllava_harness::fuzz::{CappedAlloc, byte_edits};
use specllava_prompt::{ChatTemplate, ImageLimits, LlavaTokenizer};
use specllava_proto::v1 as pb;

#[global_allocator]
static ALLOC: CappedAlloc<{ 256 << 20 }> = CappedAlloc;

const DEFAULT_CASES: u32 = 300;

const LIMITS: ApiLimits = ApiLimits {
    image: ImageLimits {
        max_bytes: 64 << 10,
        max_pixels: 1 << 16,
        max_side: 1 << 12,
        max_alloc_bytes: 64 << 20,
        max_images: 8,
        max_image_tokens: 4096,
    },
    prompt: PromptLimits {
        max_tokens: 512,
        max_bytes: 32 << 10,
    },
    default_max_new_tokens: 64,
    max_new_tokens_limit: 4096,
    max_stop_strings: 16,
    max_stop_bytes: 256,
};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn tokenizer() -> Arc<LlavaTokenizer> {
    Arc::new(LlavaTokenizer::from_file(root().join("models/target/tokenizer.json")).unwrap())
}

fn prompter(tok: &Arc<LlavaTokenizer>) -> Prompter {
    let template =
        ChatTemplate::from_model_dir(&root().join("models/target"), tok.special_tokens()).unwrap();
    Prompter::new(Arc::clone(tok), template, LIMITS.prompt)
}

fn runner() -> (TestRunner, u32) {
    specllava_harness::fuzz::runner(DEFAULT_CASES)
}

/// Text with what templates and tokenizers find awkward: special tokens, template syntax,
/// role markers, control and multi-byte characters, long runs.
fn text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        "\\PC{0,12}",
        ".{0,6}",
        Just("<image>".to_owned()),
        Just("<s>".to_owned()),
        Just("</s>".to_owned()),
        Just("{{ messages }}".to_owned()),
        Just("{% endfor %}".to_owned()),
        Just("USER:".to_owned()),
        Just("ASSISTANT:".to_owned()),
        Just("\u{0}\u{FFFD}\u{202E}é漢🙂".to_owned()),
        Just("a".repeat(300)),
    ];
    prop::collection::vec(piece, 0..6).prop_map(|v| v.concat())
}

/// Mostly in range (so later steps are reached), sometimes at or past the edges.
fn edge_f32() -> impl Strategy<Value = f32> {
    prop_oneof![
        6 => 0f32..1.0,
        1 => Just(0.0),
        1 => Just(1.0),
        1 => -1f32..3.0,
        1 => Just(f32::NAN),
        1 => Just(f32::INFINITY),
        1 => any::<f32>(),
    ]
}

fn png() -> Vec<u8> {
    std::fs::read(root().join("model/tests/fixtures/images/red_square.png")).unwrap()
}

/// Inputs of each API that got past validation to the chat template and tokenizer (printed, so a run
/// shows the harness reaches the deep end).
static GRPC_PROMPTED: AtomicUsize = AtomicUsize::new(0);
static HTTP_PROMPTED: AtomicUsize = AtomicUsize::new(0);

/// The gRPC `Generate` handler's path up to the engine: translation, validation, prompt (a
/// session's follow-up when `last_token` is set).
fn validate_generate(p: &Prompter, r: pb::GenerateRequest, last_token: Option<u32>) {
    let Ok(turn) = turn_request(r) else { return };
    let Ok(valid) = validate(turn, &LIMITS) else {
        return;
    };
    GRPC_PROMPTED.fetch_add(1, Ordering::Relaxed);
    check_prompt(p, valid.clone(), None);
    if let Some(last) = last_token
        && valid.images.is_empty()
    {
        check_prompt(p, valid, Some(last));
    }
}

/// The prompt of a valid turn: within the token limit, or refused cleanly.
fn check_prompt(p: &Prompter, v: ValidTurn, follows: Option<u32>) {
    assert!(
        v.images.is_empty() || !matches!(v.source, ConversationSource::Session(_)),
        "a session turn carries no image"
    );
    let images = v.images.len();
    if let Ok(ids) = prompt_ids(p, v.input, images, follows) {
        assert!(ids.len() <= LIMITS.prompt.max_tokens);
        assert!(follows.is_some() || !ids.is_empty());
    }
}

#[test]
fn fuzz_grpc_generate_request() {
    let tok = tokenizer();
    let p = prompter(&tok);
    let png = png();
    let image = prop_oneof![
        Just(Vec::new()),
        Just(png),
        prop::collection::vec(any::<u8>(), 0..32)
    ];
    let req = (
        text(),
        image,
        (
            prop_oneof![4 => 0u32..200, 1 => any::<u32>()],
            edge_f32(),
            edge_f32(),
            prop_oneof![4 => 0u32..50, 1 => any::<u32>()],
            any::<u64>(),
        ),
        prop::collection::vec(text(), 0..3),
        (
            // Mostly known modes (adaptive refuses shape overrides), sometimes garbage.
            prop_oneof![6 => 0i32..5, 1 => any::<i32>()],
            prop_oneof![1 => Just(0u32), 1 => 0u32..20],
            prop_oneof![1 => Just(0u32), 1 => 0u32..20],
            prop_oneof![1 => Just(0u32), 1 => 0u32..80],
            any::<bool>(),
        ),
    )
        .prop_map(|(prompt, image, g, stop, s)| pb::GenerateRequest {
            session_id: String::new(),
            image: image.into(),
            prompt,
            params: Some(pb::GenerationParams {
                max_new_tokens: g.0,
                temperature: g.1,
                top_p: g.2,
                top_k: g.3,
                seed: g.4,
                stop,
                ignore_eos: false,
            }),
            speculation: Some(pb::SpeculationConfig {
                mode: s.0,
                depth: s.1,
                branching: s.2,
                budget: s.3,
                disable_draft_ahead: s.4,
            }),
        });
    let raw = prop::collection::vec(any::<u8>(), 0..200);
    let last = prop::option::of(0u32..40_000);
    let (mut runner, n) = runner();
    runner
        .run(&(req, byte_edits(), raw, last), |(r, f, raw, last)| {
            let bytes = f.apply(r.encode_to_vec());
            validate_generate(&p, r, last);
            for b in [bytes, raw] {
                if let Ok(d) = pb::GenerateRequest::decode(&b[..]) {
                    validate_generate(&p, d, last);
                }
            }
            let _ = pb::CreateSessionRequest::decode(&f.apply(vec![0x0a, 3, 1, 2, 3])[..]);
            Ok(())
        })
        .unwrap();
    let deep = GRPC_PROMPTED.load(Ordering::Relaxed);
    println!("fuzz_grpc_generate_request: {n} cases ({deep} inputs reached the prompt)");
}

/// A chat-completions body from edge values: roles valid and not, text and part contents,
/// `data:` URLs well-formed or not, parameters at and past their ranges.
fn chat_body() -> impl Strategy<Value = Value> {
    let png = png();
    let b64 = base64_encode(&png);
    let url = prop_oneof![
        6 => Just(format!("data:image/png;base64,{b64}")),
        1 => Just("data:image/png;base64,!!!!".to_owned()),
        1 => Just("data:image/png,raw".to_owned()),
        1 => Just("data:".to_owned()),
        1 => Just("http://127.0.0.1:9/x.png".to_owned()),
        1 => Just("https://example.com/x.png".to_owned()),
        1 => "\\PC{0,20}",
    ];
    let part = prop_oneof![
        12 => text().prop_map(|t| json!({"type": "text", "text": t})),
        4 => url.prop_map(|u| json!({"type": "image_url", "image_url": {"url": u}})),
        1 => Just(json!({"type": "video"})),
    ];
    let content = prop_oneof![
        6 => text().prop_map(Value::from),
        6 => prop::collection::vec(part, 0..3).prop_map(Value::from),
        1 => Just(Value::Null),
        1 => Just(json!(7)),
    ];
    let role = prop_oneof![
        Just("user"),
        Just("user"),
        Just("user"),
        Just("user"),
        Just("assistant"),
        Just("system"),
        Just("developer"),
        Just("tool"),
        Just("")
    ];
    let message = (role, content).prop_map(|(r, c)| json!({"role": r, "content": c}));
    // Mostly absent or plausible (so most bodies parse), sometimes wrong in type or range.
    let int = prop_oneof![
        40 => Just(json!(null)),
        4 => Just(json!(1)),
        4 => (0u32..300).prop_map(Value::from),
        1 => Just(json!(0)),
        1 => Just(json!(-1)),
        1 => Just(json!(0.5)),
        1 => Just(json!(u64::MAX)),
        1 => Just(json!("1")),
    ];
    let float = prop_oneof![
        30 => Just(json!(null)),
        8 => (0.0f64..1.0).prop_map(Value::from),
        1 => Just(json!(0)),
        1 => Just(json!(-1)),
        1 => Just(json!(1e39)),
        1 => Just(json!("1")),
    ];
    (
        prop::collection::vec(message, 0..4),
        prop::collection::vec(int, 5),
        prop::collection::vec(float, 2),
        prop_oneof![
            4 => Just(None),
            2 => prop::collection::vec(text(), 0..4).prop_map(Some),
            1 => prop::collection::vec(text(), 0..20).prop_map(Some),
        ],
        prop::bool::weighted(0.1),
    )
        .prop_map(|(messages, n, f, stop, logprobs)| {
            json!({
                "model": "m",
                "messages": messages,
                "max_tokens": n[0],
                "temperature": f[0],
                "top_p": f[1],
                "top_k": n[1],
                "seed": n[2],
                "n": n[3],
                "max_completion_tokens": n[4],
                "stop": stop,
                "logprobs": logprobs,
            })
        })
}

fn base64_encode(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in bytes.chunks(3) {
        let v = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[(v >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The `/v1/chat/completions` route's path up to the engine: parsing, translation, image
/// URLs, validation, prompt.
fn validate_chat(p: &Prompter, body: &[u8]) {
    let Ok(req) = serde_json::from_slice::<ChatCompletionRequest>(body) else {
        return;
    };
    let Ok(t) = translate(req) else { return };
    let remote = RemoteImages::refused();
    let mut images: Vec<bytes::Bytes> = Vec::new();
    for url in &t.image_urls {
        let load = images::load(url, LIMITS.image.max_bytes, &remote);
        let Ok(bytes) = futures::executor::block_on(load) else {
            return;
        };
        images.push(bytes.into());
    }
    let Ok(mut valid) = validate(http_turn_request(t), &LIMITS) else {
        return;
    };
    // What `Frontend::add_image` checks as each image is added.
    if images
        .iter()
        .any(|i| check_image(i, &LIMITS.image).is_err())
    {
        return;
    }
    valid.images = images;
    HTTP_PROMPTED.fetch_add(1, Ordering::Relaxed);
    check_prompt(p, valid, None);
}

#[test]
fn fuzz_http_chat_request() {
    let tok = tokenizer();
    let p = prompter(&tok);
    let raw = prop::collection::vec(any::<u8>(), 0..200);
    let (mut runner, n) = runner();
    runner
        .run(&(chat_body(), byte_edits(), raw), |(body, f, raw)| {
            let bytes = serde_json::to_vec(&body).unwrap();
            validate_chat(&p, &bytes);
            validate_chat(&p, &f.apply(bytes));
            validate_chat(&p, &raw);
            Ok(())
        })
        .unwrap();
    let deep = HTTP_PROMPTED.load(Ordering::Relaxed);
    println!("fuzz_http_chat_request: {n} cases ({deep} inputs reached the prompt)");
}

/// Incremental detokenization: any ids (out of the vocabulary too) and stop strings, pushed
/// in any grouping, stream the same text as one id at a time, and what was streamed is the
/// final text.
#[test]
fn fuzz_text_stream() {
    let tok = tokenizer();
    let vocab = tok.vocab_size() as u32;
    let id = prop_oneof![8 => 0..vocab, 1 => vocab..vocab + 5, 1 => Just(tok.eos_token_id())];
    let stop = prop::collection::vec(
        prop_oneof![".{0,3}", Just(" the".to_owned()), Just("\n".to_owned())],
        0..3,
    );
    let (mut runner, n) = runner();
    runner
        .run(
            &(prop::collection::vec(id, 0..40), stop, 1usize..6),
            |(ids, stop, group)| {
                let run = |chunk: usize| -> Result<(String, String), String> {
                    let mut s = TextStream::new(stop.clone());
                    let mut streamed = String::new();
                    for c in ids.chunks(chunk) {
                        let d = s.push(&*tok, c)?;
                        streamed.push_str(&d.text);
                        if d.stopped {
                            break;
                        }
                    }
                    streamed.push_str(&s.finish(&*tok)?.text);
                    Ok((streamed, s.text().to_owned()))
                };
                match (run(1), run(group)) {
                    (Ok(one), Ok(grouped)) => {
                        prop_assert_eq!(&one.0, &one.1);
                        prop_assert_eq!(one, grouped);
                    }
                    (Err(_), Err(_)) => {}
                    (a, b) => prop_assert!(false, "one at a time {a:?}, grouped {b:?}"),
                }
                Ok(())
            },
        )
        .unwrap();
    println!("fuzz_text_stream: {n} cases");
}
