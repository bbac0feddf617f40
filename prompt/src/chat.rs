//! Chat templates: the checkpoint's own Jinja template, rendered as Hugging Face
//! `transformers` renders it (`apply_chat_template`), with LLaVA-1.5 as the fallback.
//!
//! A checkpoint carries its template in `chat_template.jinja`, in `chat_template.json`, or as
//! `chat_template` in `processor_config.json` / `tokenizer_config.json` (looked up in that
//! order, as `transformers` does). The template is compiled with [`minijinja`] configured like
//! `transformers`' sandbox: `trim_blocks` and `lstrip_blocks`, loop controls, Python string and
//! dict methods (`.upper()`, `.items()`, ...), `raise_exception`, `strftime_now`, and the
//! `{% generation %}` block (assistant-mask tracking in `transformers`; here it renders its
//! body).
//!
//! Messages are in the processor's format: `content` is a string or a list of parts,
//! `{"type": "text", "text": ...}` and `{"type": "image"}`; each image part becomes the image
//! placeholder (`<image>`), which the model expands into the image's features.
//!
//! Without a template, LLaVA-1.5's is used: `USER: <image>\n{prompt} ASSISTANT:` for the first
//! turn; every answered turn is followed by ` {answer}</s>` and the next turn starts with
//! `USER: {prompt} ASSISTANT:`.

use std::path::{Path, PathBuf};

use minijinja::{Environment, Error as JinjaError, ErrorKind};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{PromptError, Result};

/// The LLaVA-1.5 conversation template, used when a checkpoint has none.
pub const LLAVA15_TEMPLATE: &str = "{% for message in messages %}{% if message['role'] == 'user' %}USER: {% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %} {% elif message['role'] == 'assistant' %}ASSISTANT: {% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}{{ c['text'] }}{% endfor %}{% endif %}</s>{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}";

/// Stands for an answer while the text between two turns is worked out.
const ANSWER_SENTINEL: &str = "\u{E000}answer\u{E000}";

/// One part of a message's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Part {
    /// Text.
    Text {
        /// The text.
        text: String,
    },
    /// An image (its placeholder goes here).
    Image,
}

/// A message's content: a plain string or a list of parts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Text and image parts, in order.
    Parts(Vec<Part>),
}

/// One message of a conversation, as templates see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// What was said.
    pub content: Content,
}

impl Message {
    /// A message whose content is a list of parts.
    pub fn parts(role: &str, parts: Vec<Part>) -> Self {
        Self {
            role: role.to_owned(),
            content: Content::Parts(parts),
        }
    }

    /// A user message with an optional leading image.
    pub fn user(text: &str, image: bool) -> Self {
        let mut parts = Vec::with_capacity(2);
        if image {
            parts.push(Part::Image);
        }
        parts.push(Part::Text {
            text: text.to_owned(),
        });
        Self::parts("user", parts)
    }

    /// An assistant message.
    pub fn assistant(text: &str) -> Self {
        Self::parts(
            "assistant",
            vec![Part::Text {
                text: text.to_owned(),
            }],
        )
    }
}

/// One exchange of a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatTurn {
    /// What the user said.
    pub user: String,
    /// The model's answer, `None` for the turn being generated.
    pub assistant: Option<String>,
}

/// The messages of `turns`; the image goes into the first user message.
pub fn turns_to_messages(turns: &[ChatTurn], has_image: bool) -> Vec<Message> {
    let mut out = Vec::with_capacity(turns.len() * 2);
    for (i, t) in turns.iter().enumerate() {
        out.push(Message::user(&t.user, i == 0 && has_image));
        if let Some(a) = &t.assistant {
            out.push(Message::assistant(a));
        }
    }
    out
}

/// Where a template came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateSource {
    /// A file of the checkpoint (and the key inside it, for JSON files).
    File(PathBuf),
    /// The built-in LLaVA-1.5 template.
    Llava15,
}

impl std::fmt::Display for TemplateSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TemplateSource::File(p) => write!(f, "{}", p.display()),
            TemplateSource::Llava15 => f.write_str("built-in LLaVA-1.5"),
        }
    }
}

/// Special token strings a template may use (`{{ bos_token }}` ...).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SpecialTokens {
    /// `<s>`, if the tokenizer has one.
    pub bos_token: Option<String>,
    /// `</s>`.
    pub eos_token: String,
    /// `<image>`.
    pub image_token: String,
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: TemplateSource,
    tokens: SpecialTokens,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .finish()
    }
}

#[derive(Serialize)]
struct Context<'a> {
    messages: &'a [Message],
    add_generation_prompt: bool,
    #[serde(flatten)]
    tokens: &'a SpecialTokens,
}

impl ChatTemplate {
    /// Compiles `source` (Hugging Face's Jinja dialect).
    pub fn new(template: &str, source: TemplateSource, tokens: SpecialTokens) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, JinjaError> {
                Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned("chat", rewrite_generation_blocks(template))
            .map_err(|e| bad_template(&source, e))?;
        Ok(Self {
            env,
            source,
            tokens,
        })
    }

    /// The LLaVA-1.5 template.
    pub fn llava15(tokens: SpecialTokens) -> Self {
        Self::new(LLAVA15_TEMPLATE, TemplateSource::Llava15, tokens)
            .expect("the built-in template compiles")
    }

    /// The template of the checkpoint in `dir`, or LLaVA-1.5 when it has none.
    pub fn from_model_dir(dir: &Path, tokens: SpecialTokens) -> Result<Self> {
        match find_template(dir)? {
            Some((text, path)) => Self::new(&text, TemplateSource::File(path), tokens),
            None => Ok(Self::llava15(tokens)),
        }
    }

    /// Where the template came from.
    pub fn source(&self) -> &TemplateSource {
        &self.source
    }

    /// The special token strings the template sees.
    pub fn tokens(&self) -> &SpecialTokens {
        &self.tokens
    }

    /// Renders a conversation; with `add_generation_prompt` it ends with the assistant's cue.
    /// A template's `raise_exception` (roles not alternating...) is the caller's fault.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let tmpl = self
            .env
            .get_template("chat")
            .expect("compiled in the constructor");
        tmpl.render(Context {
            messages,
            add_generation_prompt,
            tokens: &self.tokens,
        })
        .map_err(|e| {
            let detail = match e.kind() {
                ErrorKind::InvalidOperation => e.detail().unwrap_or_default().to_owned(),
                _ => format!("{e:#}"),
            };
            PromptError::InvalidInput(format!("the chat template refused the messages: {detail}"))
        })
    }

    /// The text of a follow-up user turn, to be appended after an answered turn: what the
    /// template puts after an assistant answer, the user's message, and the generation prompt.
    /// (A template whose rendering of earlier turns depends on later ones is not supported:
    /// an error.)
    pub fn continuation(&self, user: &Message) -> Result<String> {
        let messages = [
            Message::user("", false),
            Message::assistant(ANSWER_SENTINEL),
            user.clone(),
        ];
        let full = self.render(&messages, true)?;
        let answered = self.render(&messages[..2], false)?;
        let at = full
            .find(ANSWER_SENTINEL)
            .map(|i| i + ANSWER_SENTINEL.len())
            .filter(|_| full.starts_with(&answered))
            .ok_or_else(|| {
                PromptError::Config(format!(
                    "chat template {}: a conversation's rendering does not extend its first turn's",
                    self.source
                ))
            })?;
        Ok(full[at..].to_owned())
    }
}

fn bad_template(source: &TemplateSource, e: JinjaError) -> PromptError {
    PromptError::Config(format!("chat template {source}: {e:#}"))
}

/// `strftime_now(format)`: the local time, formatted (templates print today's date).
fn strftime_now(format: String) -> std::result::Result<String, JinjaError> {
    use std::fmt::Write;
    let mut out = String::new();
    write!(out, "{}", chrono::Local::now().format(&format)).map_err(|_| {
        JinjaError::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: bad format {format:?}"),
        )
    })?;
    Ok(out)
}

/// Rewrites `transformers`' `{% generation %}` / `{% endgeneration %}` tags (which mark the
/// assistant's tokens) into `{% if true %}` / `{% endif %}`, keeping their whitespace control.
fn rewrite_generation_blocks(template: &str) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find("{%") {
        let Some(len) = rest[start..].find("%}") else {
            break;
        };
        let tag = &rest[start..start + len + 2];
        let inner = &tag[2..tag.len() - 2];
        let (open, body, close) = split_whitespace_control(inner);
        let replacement = match body.trim() {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        out.push_str(&rest[..start]);
        match replacement {
            Some(r) => out.push_str(&format!("{{%{open} {r} {close}%}}")),
            None => out.push_str(tag),
        }
        rest = &rest[start + tag.len()..];
    }
    out.push_str(rest);
    out
}

/// `"- generation -"` -> `("-", " generation ", "-")`.
fn split_whitespace_control(inner: &str) -> (&str, &str, &str) {
    let open = if inner.starts_with(['-', '+']) {
        &inner[..1]
    } else {
        ""
    };
    let rest = &inner[open.len()..];
    let close = if rest.ends_with(['-', '+']) {
        &rest[rest.len() - 1..]
    } else {
        ""
    };
    (open, &rest[..rest.len() - close.len()], close)
}

/// The checkpoint's template text and the file it came from, if it has one.
fn find_template(dir: &Path) -> Result<Option<(String, PathBuf)>> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.exists() {
        let text = std::fs::read_to_string(&jinja).map_err(|e| PromptError::bad_file(&jinja, e))?;
        return Ok(Some((text, jinja)));
    }
    for name in [
        "chat_template.json",
        "processor_config.json",
        "tokenizer_config.json",
    ] {
        let path = dir.join(name);
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let v: Value = serde_json::from_str(&text).map_err(|e| PromptError::bad_file(&path, e))?;
        match v.get("chat_template") {
            None | Some(Value::Null) => {}
            Some(Value::String(t)) => return Ok(Some((t.clone(), path))),
            // A list of named templates: the one named "default".
            Some(Value::Array(list)) => {
                let default = list.iter().find(|t| t["name"] == "default");
                match default.and_then(|t| t["template"].as_str()) {
                    Some(t) => return Ok(Some((t.to_owned(), path))),
                    None => {
                        return Err(PromptError::bad_file(
                            &path,
                            "chat_template lists no template named \"default\"",
                        ));
                    }
                }
            }
            Some(_) => {
                return Err(PromptError::bad_file(
                    &path,
                    "chat_template is neither a string nor a list",
                ));
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> SpecialTokens {
        SpecialTokens {
            bos_token: Some("<s>".into()),
            eos_token: "</s>".into(),
            image_token: "<image>".into(),
        }
    }

    #[test]
    fn llava15_single_and_multi_turn() {
        let t = ChatTemplate::llava15(tokens());
        let t1 = ChatTurn {
            user: "What is this?".into(),
            assistant: None,
        };
        let one = turns_to_messages(std::slice::from_ref(&t1), true);
        assert_eq!(
            t.render(&one, true).unwrap(),
            "USER: <image>\nWhat is this? ASSISTANT:"
        );
        let turns = [
            ChatTurn {
                user: "prompt1".into(),
                assistant: Some("answer1".into()),
            },
            ChatTurn {
                user: "prompt2".into(),
                assistant: None,
            },
        ];
        let full = t.render(&turns_to_messages(&turns, true), true).unwrap();
        assert_eq!(
            full,
            "USER: <image>\nprompt1 ASSISTANT: answer1</s>USER: prompt2 ASSISTANT:"
        );
        let cont = t.continuation(&Message::user("prompt2", false)).unwrap();
        assert_eq!(cont, "</s>USER: prompt2 ASSISTANT:");
        let plain = [Message {
            role: "user".into(),
            content: Content::Text("What is this?".into()),
        }];
        assert_eq!(
            t.render(&plain, true).unwrap(),
            "USER: What is this? ASSISTANT:"
        );
    }

    #[test]
    fn hugging_face_dialect() {
        let src = "{%- for m in messages -%}\n  {%- if m.role == 'system' -%}{{ raise_exception('no system role') }}{%- endif -%}\n  {%- if loop.index > 2 %}{% break %}{% endif -%}\n  {{ m.role.upper() }}:{% for p in m.content %}{% generation %}{{ p.text | default('<image>') }}{% endgeneration %}{% endfor %}|\n{%- endfor %}{{ bos_token }}{{ strftime_now('%Y') | length }}";
        let t = ChatTemplate::new(src, TemplateSource::Llava15, tokens()).unwrap();
        let msgs = [
            Message::user("hi", true),
            Message::assistant("yo"),
            Message::user("again", false),
        ];
        assert_eq!(
            t.render(&msgs, false).unwrap(),
            "USER:<image>hi|ASSISTANT:yo|<s>4"
        );
        let sys = [Message {
            role: "system".into(),
            content: Content::Text("x".into()),
        }];
        let err = t.render(&sys, false).unwrap_err();
        assert!(
            matches!(&err, PromptError::InvalidInput(m) if m.ends_with("no system role")),
            "{err}"
        );
    }

    #[test]
    fn generation_tags_keep_whitespace_control() {
        assert_eq!(
            rewrite_generation_blocks("a {%- generation +%}b{% endgeneration -%} c{% if x %}"),
            "a {%- if true +%}b{% endif -%} c{% if x %}"
        );
    }
}
