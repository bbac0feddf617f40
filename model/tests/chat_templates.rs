//! Chat templates rendered as `transformers`' `apply_chat_template` renders them: the
//! templates of the committed demo pair and Hugging Face-style templates under
//! `tests/fixtures/templates/`, against `tests/fixtures/chat_templates.json` (written by
//! `tools/chat_template_refs.py`), single- and multi-turn. No Python needed.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use specllava_model::LlavaTokenizer;
use specllava_model::chat::{ChatTemplate, Message, TemplateSource};

#[derive(Deserialize)]
struct Case {
    template: String,
    conversation: String,
    messages: Vec<Message>,
    add_generation_prompt: bool,
    text: String,
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn template(name: &str) -> ChatTemplate {
    let tok = LlavaTokenizer::from_file(root().join("models/target/tokenizer.json")).unwrap();
    let path = root().join(name);
    if path.is_dir() {
        let t = ChatTemplate::from_model_dir(&path, tok.special_tokens()).unwrap();
        assert_eq!(
            t.source(),
            &TemplateSource::File(path.join("chat_template.jinja"))
        );
        t
    } else {
        let text = std::fs::read_to_string(&path).unwrap();
        ChatTemplate::new(&text, TemplateSource::File(path), tok.special_tokens()).unwrap()
    }
}

#[test]
fn templates_render_as_transformers_does() {
    let refs = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat_templates.json");
    let cases: Vec<Case> = serde_json::from_str(&std::fs::read_to_string(refs).unwrap()).unwrap();
    assert!(cases.len() >= 20);
    for case in &cases {
        let t = template(&case.template);
        let got = t
            .render(&case.messages, case.add_generation_prompt)
            .unwrap();
        assert_eq!(
            got, case.text,
            "{} / {} (generation prompt: {})",
            case.template, case.conversation, case.add_generation_prompt
        );
    }
}

#[test]
fn a_follow_up_turn_extends_the_rendered_conversation() {
    // What the gRPC API appends for a session's next turn: the answered conversation followed
    // by the continuation is the whole conversation's rendering.
    for name in ["models/target", "models/draft"] {
        let t = template(name);
        let refs = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat_templates.json");
        let cases: Vec<Case> =
            serde_json::from_str(&std::fs::read_to_string(refs).unwrap()).unwrap();
        let full = cases
            .iter()
            .find(|c| {
                c.template == name && c.conversation == "two_turns" && c.add_generation_prompt
            })
            .unwrap();
        let answered = t.render(&full.messages[..2], false).unwrap();
        let cont = t.continuation(&full.messages[2]).unwrap();
        let eos = "</s>";
        let joined = match (answered.strip_suffix(eos), cont.starts_with(eos)) {
            (Some(a), true) => format!("{a}{cont}"),
            _ => format!("{answered}{cont}"),
        };
        assert_eq!(joined, full.text, "{name}");
    }
}
