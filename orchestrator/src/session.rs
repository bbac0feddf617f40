//! Conversations: the orchestrator's authoritative per-session state (image
//! bytes and token history) and where the session lives on the replicas.

use bytes::Bytes;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use specllava_prompt::{ImageLimits, check_image_header};
use specllava_proto::v1 as pb;
use specllava_wire::convert::image_tokens_from_proto;

use crate::error::OrchestratorError;
use crate::routing::Pin;

/// A session's state on one replica.
pub struct ReplicaSession {
    /// The replica the session is pinned to.
    pub pin: Pin,
    /// Whether the session is open there.
    pub opened: bool,
    /// History tokens the replica knows: its KV holds `history[..synced-1]`
    /// (the last one is the uncomputed root).
    pub synced: usize,
    /// The replica's KV length (rows), as last reported.
    pub kv_len: u64,
    /// KV rows each of the conversation's images became on that replica, as it reported
    /// them (in order; any-resolution models count by the image's size).
    pub image_rows: Vec<u64>,
    /// Images the conversation held when the replica last prefilled (LLaVA-OneVision tiles
    /// an image only as its conversation's only one).
    pub conversation_images: usize,
}

impl ReplicaSession {
    /// A pin with nothing opened yet.
    pub fn new(pin: Pin) -> Self {
        Self {
            pin,
            opened: false,
            synced: 0,
            kv_len: 0,
            image_rows: Vec::new(),
            conversation_images: 0,
        }
    }
}

/// One conversation (one-shot requests use a throwaway one).
pub struct Conversation {
    /// Id, also used as the replica session id.
    pub id: String,
    /// Encoded images, one per image placeholder in the history.
    pub images: Vec<Bytes>,
    /// Token history: prompts (one placeholder per image) and generated tokens.
    pub history: Vec<u32>,
    /// Completed turns.
    pub turns: usize,
    /// The target replica session.
    pub target: Option<ReplicaSession>,
    /// The draft replica session.
    pub draft: Option<ReplicaSession>,
}

impl Conversation {
    /// A new conversation around `images`.
    pub fn new(id: String, images: Vec<Bytes>) -> Self {
        Self {
            id,
            images,
            history: Vec::new(),
            turns: 0,
            target: None,
            draft: None,
        }
    }

    /// Truncates the history to `len` tokens (stop-string cut); replicas that
    /// know more will be rolled back on the next sync.
    pub fn truncate_history(&mut self, len: usize) {
        self.history.truncate(len);
        for r in [self.target.as_mut(), self.draft.as_mut()]
            .into_iter()
            .flatten()
        {
            r.synced = r.synced.min(len);
        }
    }
}

/// A fresh random session id.
pub fn new_session_id() -> String {
    let a: u64 = rand::random();
    let b: u64 = rand::random();
    format!("{a:016x}{b:016x}")
}

/// KV rows of `history[..h]` on a replica where the `i`-th image placeholder becomes
/// `image_rows[i]` rows (one row for an image not listed).
pub fn kv_rows(history: &[u32], h: usize, image_token_id: u32, image_rows: &[u64]) -> u64 {
    let mut rows = h as u64;
    let placeholders = history[..h].iter().filter(|&&t| t == image_token_id);
    for (i, _) in placeholders.enumerate() {
        rows += image_rows.get(i).copied().unwrap_or(1).saturating_sub(1);
    }
    rows
}

/// KV rows each of `images` (of a conversation of `conversation_images` images) becomes on a
/// replica of `model`, counted from the images' headers without decoding them (their limits
/// were checked when they were admitted); an image whose header cannot be read counts as the
/// most an image can become.
pub fn image_rows_on(
    model: &pb::ModelInfo,
    images: &[Bytes],
    conversation_images: usize,
) -> Vec<u64> {
    let rule = image_tokens_from_proto(model);
    let unbounded = ImageLimits {
        max_bytes: usize::MAX,
        max_pixels: u64::MAX,
        max_side: u32::MAX,
        max_alloc_bytes: u64::MAX,
        max_images: usize::MAX,
        max_image_tokens: usize::MAX,
    };
    images
        .iter()
        .map(|bytes| {
            let n = match check_image_header(bytes, &unbounded) {
                Ok((w, h)) => rule.count(h as usize, w as usize, conversation_images),
                Err(_) => rule.max_count(),
            };
            n as u64
        })
        .collect()
}

struct Entry {
    conv: Arc<tokio::sync::Mutex<Conversation>>,
    last_used: Instant,
}

/// Live multi-turn conversations, bounded in number, with a TTL.
pub struct Registry {
    max_sessions: usize,
    ttl: Duration,
    sessions: Mutex<HashMap<String, Entry>>,
}

impl Registry {
    /// An empty registry.
    pub fn new(max_sessions: usize, ttl: Duration) -> Self {
        Self {
            max_sessions,
            ttl,
            sessions: Mutex::new(HashMap::new()),
        }
    }

    /// Registers a conversation; RESOURCE_EXHAUSTED when full.
    pub fn insert(&self, conv: Conversation) -> Result<(), OrchestratorError> {
        let mut s = self.sessions.lock().expect("registry lock poisoned");
        if s.len() >= self.max_sessions {
            return Err(OrchestratorError::Overloaded(format!(
                "{} sessions are open (the maximum)",
                s.len()
            )));
        }
        s.insert(
            conv.id.clone(),
            Entry {
                conv: Arc::new(tokio::sync::Mutex::new(conv)),
                last_used: Instant::now(),
            },
        );
        Ok(())
    }

    /// The conversation with this id.
    pub fn get(
        &self,
        id: &str,
    ) -> Result<Arc<tokio::sync::Mutex<Conversation>>, OrchestratorError> {
        let mut s = self.sessions.lock().expect("registry lock poisoned");
        let e = s
            .get_mut(id)
            .ok_or_else(|| OrchestratorError::SessionNotFound(id.to_owned()))?;
        e.last_used = Instant::now();
        Ok(Arc::clone(&e.conv))
    }

    /// Removes a conversation.
    pub fn remove(&self, id: &str) -> Option<Arc<tokio::sync::Mutex<Conversation>>> {
        self.sessions
            .lock()
            .expect("registry lock poisoned")
            .remove(id)
            .map(|e| e.conv)
    }

    /// Removes and returns conversations idle for longer than the TTL.
    pub fn expire(&self) -> Vec<Arc<tokio::sync::Mutex<Conversation>>> {
        let mut s = self.sessions.lock().expect("registry lock poisoned");
        let now = Instant::now();
        let ids: Vec<String> = s
            .iter()
            .filter(|(_, e)| now.duration_since(e.last_used) > self.ttl)
            .map(|(k, _)| k.clone())
            .collect();
        ids.iter()
            .filter_map(|id| s.remove(id))
            .map(|e| e.conv)
            .collect()
    }

    /// Number of live conversations.
    pub fn len(&self) -> usize {
        self.sessions.lock().expect("registry lock poisoned").len()
    }

    /// Whether no conversation is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_rows_expand_placeholders() {
        let h = [1, 5, 9, 5, 7];
        assert_eq!(kv_rows(&h, 0, 5, &[10, 10]), 0);
        assert_eq!(kv_rows(&h, 2, 5, &[10, 10]), 11);
        assert_eq!(kv_rows(&h, 5, 5, &[10, 10]), 23);
        assert_eq!(kv_rows(&h, 5, 5, &[10, 30]), 43);
        assert_eq!(kv_rows(&h, 5, 5, &[]), 5);
    }

    #[test]
    fn registry_limits_and_expiry() {
        let r = Registry::new(1, Duration::from_millis(0));
        r.insert(Conversation::new("a".into(), vec![])).unwrap();
        assert!(matches!(
            r.insert(Conversation::new("b".into(), vec![])),
            Err(OrchestratorError::Overloaded(_))
        ));
        assert!(r.get("a").is_ok());
        assert!(r.get("zz").is_err());
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(r.expire().len(), 1);
        assert!(r.is_empty());
    }
}
