//! The tokenizer: a thin wrapper over `tokenizers::Tokenizer` loaded from `tokenizer.json`,
//! with the special token ids LLaVA needs.

use std::path::Path;

use serde_json::Value;
use tokenizers::Tokenizer;

use crate::error::{PromptError, Result};

/// `tokenizer.json` plus the ids of `<s>`, `</s>` and `<image>`.
pub struct LlavaTokenizer {
    inner: Tokenizer,
    bos: Option<u32>,
    eos: u32,
    image: u32,
}

/// A special-token entry of `tokenizer_config.json`: a string or `{"content": ...}`.
fn token_name(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(m) => m.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

impl LlavaTokenizer {
    /// Loads `tokenizer.json`; special token names come from a sibling `tokenizer_config.json`
    /// when present (`bos_token`, `eos_token`, `image_token`), else `<s>`, `</s>`, `<image>`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if !path.exists() {
            return Err(PromptError::MissingFile {
                path: path.to_path_buf(),
                what: "the tokenizer".into(),
            });
        }
        let inner = Tokenizer::from_file(path).map_err(|e| PromptError::bad_file(path, e))?;
        let mut names = (
            Some("<s>".to_string()),
            "</s>".to_string(),
            "<image>".to_string(),
        );
        let cfg_path = path.with_file_name("tokenizer_config.json");
        if let Ok(text) = std::fs::read_to_string(&cfg_path) {
            let cfg: Value =
                serde_json::from_str(&text).map_err(|e| PromptError::bad_file(&cfg_path, e))?;
            if let Some(b) = token_name(cfg.get("bos_token")) {
                names.0 = Some(b);
            } else if cfg.get("bos_token").is_some_and(Value::is_null) {
                names.0 = None;
            }
            if let Some(e) = token_name(cfg.get("eos_token")) {
                names.1 = e;
            }
            if let Some(i) = token_name(cfg.get("image_token")) {
                names.2 = i;
            }
        }
        let id = |name: &str| {
            inner.token_to_id(name).ok_or_else(|| {
                PromptError::bad_file(
                    path,
                    format!("special token {name} is not in the vocabulary"),
                )
            })
        };
        Ok(LlavaTokenizer {
            bos: names.0.as_deref().map(id).transpose()?,
            eos: id(&names.1)?,
            image: id(&names.2)?,
            inner,
        })
    }

    /// Tokenizes `text`; `<image>` becomes one image token id (the model expands it).
    /// With `add_bos`, `<s>` is prepended as Llama's tokenizer does.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| PromptError::Tokenizer(e.to_string()))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_bos && let Some(b) = self.bos {
            ids.push(b);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Tokenizes `text` as it would be tokenized right after `</s>` inside a longer text (no
    /// word-start marker is added to its first word), so that encoding a multi-turn
    /// conversation turn by turn gives the same ids as encoding it whole.
    pub fn encode_continuation(&self, text: &str) -> Result<Vec<u32>> {
        let eos = self
            .inner
            .id_to_token(self.eos)
            .ok_or_else(|| PromptError::Tokenizer("eos token has no text".into()))?;
        let ids = self.encode(&format!("{eos}{text}"), false)?;
        match ids.split_first() {
            Some((&first, rest)) if first == self.eos => Ok(rest.to_vec()),
            _ => Err(PromptError::Tokenizer(
                "eos token did not tokenize to its own id".into(),
            )),
        }
    }

    /// Detokenizes, skipping special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| PromptError::Tokenizer(e.to_string()))
    }

    /// `</s>`.
    pub fn eos_token_id(&self) -> u32 {
        self.eos
    }

    /// `<s>`, if the tokenizer has one.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos
    }

    /// `<image>`.
    pub fn image_token_id(&self) -> u32 {
        self.image
    }

    /// The special token strings (what a chat template's `bos_token`... are).
    pub fn special_tokens(&self) -> crate::chat::SpecialTokens {
        let text = |id: u32| self.inner.id_to_token(id).unwrap_or_default();
        crate::chat::SpecialTokens {
            bos_token: self.bos.map(text),
            eos_token: text(self.eos),
            image_token: text(self.image),
        }
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The wrapped tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }
}
