//! Conversations kept after an HTTP request for KV reuse.
//!
//! OpenAI-style clients re-send the whole conversation each turn. After a request, its
//! conversation (prompt + answer, with its sessions still open on the replicas) is kept here;
//! the next request whose prompt shares the longest token prefix with a kept conversation
//! takes it over, so only the new tokens are prefilled (the replicas roll back the rest).
//! Bounded in number (the least recently used is evicted) and by a TTL; evicted
//! conversations are handed back for their replica sessions to be closed.

use bytes::Bytes;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::session::Conversation;

struct Entry {
    conv: Conversation,
    last_used: Instant,
}

/// Kept conversations.
pub struct PrefixCache {
    capacity: usize,
    ttl: Duration,
    entries: Mutex<Vec<Entry>>,
}

/// A conversation taken from the cache and how much of its history the new prompt shares.
pub struct Reuse {
    /// The conversation (its history still holds the old tail).
    pub conv: Conversation,
    /// Tokens of the new prompt already in the history (and in the replicas' KV).
    pub shared: usize,
}

/// The tokens `ids` (with `images`, one per placeholder) share with `history` (with
/// `history_images`): the common token prefix, cut before the first placeholder whose image
/// differs.
pub fn shared_prefix(
    history: &[u32],
    history_images: &[Bytes],
    ids: &[u32],
    images: &[Bytes],
    image_token_id: u32,
) -> usize {
    let mut image = 0;
    for (i, (a, b)) in history.iter().zip(ids).enumerate() {
        if a != b {
            return i;
        }
        if *a == image_token_id {
            if history_images.get(image) != images.get(image) {
                return i;
            }
            image += 1;
        }
    }
    history.len().min(ids.len())
}

impl PrefixCache {
    /// A cache of at most `capacity` conversations, each kept at most `ttl` unused.
    pub fn new(capacity: usize, ttl: Duration) -> Self {
        Self {
            capacity,
            ttl,
            entries: Mutex::new(Vec::new()),
        }
    }

    /// Takes the conversation sharing the longest prefix with the prompt `ids`, if any shares
    /// a token. At most `ids.len() - 1` tokens count as shared: a turn always appends at least
    /// one token (its last prompt token is the root of the first step).
    pub fn take(&self, ids: &[u32], images: &[Bytes], image_token_id: u32) -> Option<Reuse> {
        let mut entries = self.entries.lock().expect("prefix cache lock poisoned");
        let (best, shared) = entries
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let n = shared_prefix(&e.conv.history, &e.conv.images, ids, images, image_token_id);
                (i, n.min(ids.len().saturating_sub(1)))
            })
            .max_by_key(|&(_, n)| n)?;
        if shared == 0 {
            return None;
        }
        let conv = entries.swap_remove(best).conv;
        Some(Reuse { conv, shared })
    }

    /// Keeps a conversation; returns the one evicted to make room (its replica sessions must
    /// be closed), or `conv` itself when the capacity is 0.
    pub fn put(&self, conv: Conversation) -> Option<Conversation> {
        if self.capacity == 0 {
            return Some(conv);
        }
        let mut entries = self.entries.lock().expect("prefix cache lock poisoned");
        let evicted = if entries.len() >= self.capacity {
            let lru = entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.last_used)
                .map(|(i, _)| i)
                .expect("capacity > 0");
            Some(entries.swap_remove(lru).conv)
        } else {
            None
        };
        entries.push(Entry {
            conv,
            last_used: Instant::now(),
        });
        evicted
    }

    /// Removes and returns conversations unused for longer than the TTL.
    pub fn expire(&self) -> Vec<Conversation> {
        let mut entries = self.entries.lock().expect("prefix cache lock poisoned");
        let now = Instant::now();
        let (old, keep): (Vec<Entry>, Vec<Entry>) = entries
            .drain(..)
            .partition(|e| now.duration_since(e.last_used) > self.ttl);
        *entries = keep;
        old.into_iter().map(|e| e.conv).collect()
    }

    /// Number of kept conversations.
    pub fn len(&self) -> usize {
        self.entries
            .lock()
            .expect("prefix cache lock poisoned")
            .len()
    }

    /// Whether none is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IMG: u32 = 9;

    fn conv(id: &str, history: &[u32], images: &[&[u8]]) -> Conversation {
        let mut c = Conversation::new(
            id.into(),
            images.iter().map(|i| Bytes::copy_from_slice(i)).collect(),
        );
        c.history = history.to_vec();
        c
    }

    #[test]
    fn shared_prefix_stops_at_a_different_image() {
        let a = vec![Bytes::from_static(b"a")];
        let b = vec![Bytes::from_static(b"b")];
        assert_eq!(
            shared_prefix(&[1, IMG, 3, 4], &a, &[1, IMG, 3, 5], &a, IMG),
            3
        );
        assert_eq!(
            shared_prefix(&[1, IMG, 3, 4], &a, &[1, IMG, 3, 5], &b, IMG),
            1
        );
        assert_eq!(shared_prefix(&[1, 2], &[], &[1, 2, 3], &[], IMG), 2);
    }

    #[test]
    fn takes_the_longest_prefix_and_always_leaves_one_token() {
        let cache = PrefixCache::new(4, Duration::from_secs(60));
        assert!(cache.put(conv("short", &[1, 2, 7], &[])).is_none());
        assert!(cache.put(conv("long", &[1, 2, 3, 4, 8], &[])).is_none());
        let r = cache.take(&[1, 2, 3, 4, 5], &[], IMG).unwrap();
        assert_eq!((r.conv.id.as_str(), r.shared), ("long", 4));
        // The exact same prompt again: the last token is appended anew.
        let r = cache.take(&[1, 2, 7], &[], IMG).unwrap();
        assert_eq!((r.conv.id.as_str(), r.shared), ("short", 2));
        assert!(cache.is_empty());
        assert!(cache.take(&[1, 2], &[], IMG).is_none());
    }

    #[test]
    fn evicts_the_least_recently_used_and_expires() {
        let cache = PrefixCache::new(2, Duration::from_millis(0));
        assert!(cache.put(conv("a", &[1], &[])).is_none());
        std::thread::sleep(Duration::from_millis(2));
        assert!(cache.put(conv("b", &[2], &[])).is_none());
        assert_eq!(cache.put(conv("c", &[3], &[])).unwrap().id, "a");
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(cache.expire().len(), 2);
        assert!(cache.is_empty());
        assert_eq!(
            PrefixCache::new(0, Duration::ZERO)
                .put(conv("z", &[1], &[]))
                .unwrap()
                .id,
            "z"
        );
    }
}
