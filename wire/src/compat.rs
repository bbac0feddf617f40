//! Compatibility of the services of one deployment: the orchestrator tokenizes and
//! detokenizes, the target verifies and the draft proposes token ids, so all three must
//! speak the same vocabulary with the same special ids. A mismatched deployment would
//! not fail, it would produce garbage; these checks turn it into a start-up error (the
//! orchestrator refuses a replica whose [`pb::ModelInfo`] disagrees).
//!
//! The rules, as mismatch messages in the style of mistral.rs
//! (`"vocabulary mismatch: draft=416, target=400"`):
//! - target vs the orchestrator's tokenizer: every token id fits the target's vocabulary
//!   (a model may pad its vocabulary, as llava-1.5 does: 32064 rows for 32002 tokens),
//!   the same image id, the tokenizer's EOS among the target's EOS ids, the same BOS,
//!   and the same tokenizer (fingerprint) when the target ships one;
//! - draft vs target: the same vocabulary size, image id, EOS ids and BOS, and the same
//!   tokenizer as the orchestrator's when the draft ships one.

use std::path::Path;

use specllava_prompt::{Fnv1a64, ImageTokens, LlavaTokenizer};

use crate::convert::image_tokens_from_proto;
use specllava_proto::v1 as pb;

/// What the orchestrator's tokenizer defines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizerIdentity {
    /// Tokens of the tokenizer (added tokens included).
    pub vocab_size: u32,
    /// `<s>`, if any.
    pub bos_token_id: Option<u32>,
    /// `</s>`.
    pub eos_token_id: u32,
    /// `<image>`.
    pub image_token_id: u32,
    /// [`tokenizer_fingerprint`].
    pub fingerprint: String,
}

impl TokenizerIdentity {
    /// The identity of `tok`.
    pub fn of(tok: &LlavaTokenizer) -> Self {
        Self {
            vocab_size: tok.vocab_size() as u32,
            bos_token_id: tok.bos_token_id(),
            eos_token_id: tok.eos_token_id(),
            image_token_id: tok.image_token_id(),
            fingerprint: tokenizer_fingerprint(tok),
        }
    }
}

/// A stable fingerprint of a tokenizer's vocabulary: FNV-1a (64 bits) over every token
/// string in id order, so two `tokenizer.json` files that map ids to the same strings
/// agree however they are formatted.
pub fn tokenizer_fingerprint(tok: &LlavaTokenizer) -> String {
    let mut h = Fnv1a64::default();
    let n = tok.vocab_size() as u32;
    for id in 0..n {
        let token = tok.inner().id_to_token(id).unwrap_or_default();
        h.write(&id.to_le_bytes());
        h.write(token.as_bytes());
        h.write(&[0xff]);
    }
    format!("fnv1a64:{:016x}:{n}", h.finish())
}

/// The fingerprint of `dir/tokenizer.json`, or an empty string when there is none (or it
/// does not load: logged, the replica then skips the tokenizer comparison).
pub fn model_dir_fingerprint(dir: &Path) -> String {
    let path = dir.join("tokenizer.json");
    if !path.exists() {
        return String::new();
    }
    match LlavaTokenizer::from_file(&path) {
        Ok(tok) => tokenizer_fingerprint(&tok),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot fingerprint the tokenizer");
            String::new()
        }
    }
}

/// Why a target replica cannot serve with this tokenizer (empty: compatible).
pub fn target_mismatches(tok: &TokenizerIdentity, target: &pb::ModelInfo) -> Vec<String> {
    let mut out = Vec::new();
    if tok.vocab_size > target.vocab_size {
        out.push(format!(
            "vocabulary mismatch: tokenizer={} tokens, target={}",
            tok.vocab_size, target.vocab_size
        ));
    }
    if tok.image_token_id != target.image_token_id {
        out.push(format!(
            "image token mismatch: tokenizer={}, target={}",
            tok.image_token_id, target.image_token_id
        ));
    }
    if !target.eos_token_ids.is_empty() && !target.eos_token_ids.contains(&tok.eos_token_id) {
        out.push(format!(
            "EOS mismatch: tokenizer={}, target={:?}",
            tok.eos_token_id, target.eos_token_ids
        ));
    }
    if let (Some(a), Some(b)) = (tok.bos_token_id, target.bos_token_id)
        && a != b
    {
        out.push(format!("BOS mismatch: tokenizer={a}, target={b}"));
    }
    fingerprint_mismatch(&mut out, tok, "target", &target.tokenizer_fingerprint);
    tiling_invalid(&mut out, "target", target);
    out
}

/// Why a draft replica cannot propose for this target and tokenizer (empty: compatible).
pub fn draft_mismatches(
    tok: &TokenizerIdentity,
    target: &pb::ModelInfo,
    draft: &pb::ModelInfo,
) -> Vec<String> {
    let mut out = Vec::new();
    if draft.vocab_size != target.vocab_size {
        out.push(format!(
            "vocabulary mismatch: draft={}, target={}",
            draft.vocab_size, target.vocab_size
        ));
    }
    if draft.image_token_id != target.image_token_id {
        out.push(format!(
            "image token mismatch: draft={}, target={}",
            draft.image_token_id, target.image_token_id
        ));
    }
    let sorted = |v: &[u32]| {
        let mut v = v.to_vec();
        v.sort_unstable();
        v.dedup();
        v
    };
    if sorted(&draft.eos_token_ids) != sorted(&target.eos_token_ids) {
        out.push(format!(
            "EOS mismatch: draft={:?}, target={:?}",
            draft.eos_token_ids, target.eos_token_ids
        ));
    }
    if draft.bos_token_id != target.bos_token_id {
        out.push(format!(
            "BOS mismatch: draft={:?}, target={:?}",
            draft.bos_token_id, target.bos_token_id
        ));
    }
    fingerprint_mismatch(&mut out, tok, "draft", &draft.tokenizer_fingerprint);
    tiling_invalid(&mut out, "draft", draft);
    out
}

/// A replica's any-resolution tiling that cannot be counted with (no pinpoints, a zero tile).
fn tiling_invalid(out: &mut Vec<String>, who: &str, model: &pb::ModelInfo) {
    if let ImageTokens::AnyRes(a) = image_tokens_from_proto(model)
        && let Err(e) = a.validate()
    {
        out.push(format!("{who} any_resolution: {e}"));
    }
}

fn fingerprint_mismatch(out: &mut Vec<String>, tok: &TokenizerIdentity, who: &str, fp: &str) {
    if !fp.is_empty() && !tok.fingerprint.is_empty() && fp != tok.fingerprint {
        out.push(format!(
            "tokenizer mismatch: orchestrator={}, {who}={fp}",
            tok.fingerprint
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok() -> TokenizerIdentity {
        TokenizerIdentity {
            vocab_size: 400,
            bos_token_id: Some(1),
            eos_token_id: 2,
            image_token_id: 398,
            fingerprint: "fnv1a64:abc:400".into(),
        }
    }

    fn info(vocab_size: u32) -> pb::ModelInfo {
        pb::ModelInfo {
            vocab_size,
            image_token_id: 398,
            num_image_tokens: 16,
            eos_token_ids: vec![2],
            bos_token_id: Some(1),
            max_context: 512,
            tokenizer_fingerprint: "fnv1a64:abc:400".into(),
            vision_fingerprint: String::new(),
            any_resolution: None,
        }
    }

    #[test]
    fn an_uncountable_tiling_is_refused() {
        let mut bad = info(400);
        bad.any_resolution = Some(pb::AnyResolution {
            tile: 336,
            grid: 24,
            base_tokens: 576,
            ..Default::default()
        });
        let m = target_mismatches(&tok(), &bad);
        assert!(
            m.iter().any(|m| m.contains("image_grid_pinpoints")),
            "{m:?}"
        );
    }

    #[test]
    fn matching_replicas_pass() {
        assert!(target_mismatches(&tok(), &info(400)).is_empty());
        // A padded model vocabulary is fine (llava-1.5: 32064 rows for 32002 tokens).
        assert!(target_mismatches(&tok(), &info(416)).is_empty());
        assert!(draft_mismatches(&tok(), &info(400), &info(400)).is_empty());
        // Replicas without a tokenizer skip that comparison.
        let mut bare = info(400);
        bare.tokenizer_fingerprint.clear();
        assert!(draft_mismatches(&tok(), &info(400), &bare).is_empty());
    }

    #[test]
    fn mismatches_are_named() {
        assert_eq!(
            draft_mismatches(&tok(), &info(400), &info(416)),
            vec!["vocabulary mismatch: draft=416, target=400".to_owned()]
        );
        let mut t = info(300);
        t.image_token_id = 7;
        t.eos_token_ids = vec![9];
        t.bos_token_id = None;
        t.tokenizer_fingerprint = "other".into();
        let m = target_mismatches(&tok(), &t);
        assert_eq!(m.len(), 4, "{m:?}");
        assert!(m[0].starts_with("vocabulary mismatch"));
        assert!(m[3].starts_with("tokenizer mismatch"));
        let mut d = info(400);
        d.bos_token_id = None;
        d.eos_token_ids = vec![2, 5];
        assert_eq!(draft_mismatches(&tok(), &info(400), &d).len(), 2);
    }
}
