//! Per-service session store: sessions keyed by id under a byte budget, a
//! maximum count and a TTL, with least-recently-used eviction.
//!
//! The store is owned by the model worker (no locking); memory is released
//! when a session is dropped. A store made with [`SessionStore::with_metrics`]
//! publishes its size to the process-wide `specllava_active_sessions` and
//! `specllava_kv_cache_bytes` gauges and counts evictions in
//! `specllava_evictions_total{reason="ttl"|"lru"|"memory"}`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// What a session must tell the store.
pub trait SessionState {
    /// Bytes of memory the session holds (its KV cache).
    fn bytes(&self) -> usize;
}

/// Limits of a session store.
#[derive(Debug, Clone, Copy)]
pub struct SessionLimits {
    /// Maximum number of sessions; opening one more evicts the least recently used.
    pub max_sessions: usize,
    /// Maximum total bytes; going over evicts least recently used sessions.
    pub max_bytes: usize,
    /// Sessions unused for this long are dropped.
    pub ttl: Duration,
}

/// Errors of the session store.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SessionStoreError {
    /// No session with this id (never opened, closed, expired or evicted).
    #[error("unknown session {0:?} (never opened, closed, expired or evicted)")]
    NotFound(String),
    /// A session with this id already exists.
    #[error("session {0:?} already exists")]
    AlreadyExists(String),
    /// The session alone is larger than the whole budget.
    #[error("session {id:?} needs {bytes} bytes, over the store budget of {budget} bytes")]
    TooLarge {
        /// The session.
        id: String,
        /// Its size.
        bytes: usize,
        /// The budget.
        budget: usize,
    },
}

impl SessionStoreError {
    /// Short stable label for metrics (`errors_total{type=...}`).
    pub fn error_type(&self) -> &'static str {
        match self {
            SessionStoreError::NotFound(_) => "session_not_found",
            SessionStoreError::AlreadyExists(_) => "session_exists",
            SessionStoreError::TooLarge { .. } => "session_too_large",
        }
    }

    /// The gRPC status code this error is answered with.
    pub fn code(&self) -> tonic::Code {
        match self {
            SessionStoreError::NotFound(_) => tonic::Code::NotFound,
            SessionStoreError::AlreadyExists(_) => tonic::Code::AlreadyExists,
            SessionStoreError::TooLarge { .. } => tonic::Code::ResourceExhausted,
        }
    }
}

struct Entry<S> {
    state: S,
    last_used: Instant,
    bytes: usize,
}

/// Sessions by id, with accounting.
pub struct SessionStore<S> {
    limits: SessionLimits,
    sessions: HashMap<String, Entry<S>>,
    total_bytes: usize,
    evictions: u64,
    metrics: Option<&'static specllava_telemetry::Metrics>,
}

impl<S: SessionState> SessionStore<S> {
    /// An empty store.
    pub fn new(limits: SessionLimits) -> Self {
        Self {
            limits,
            sessions: HashMap::new(),
            total_bytes: 0,
            evictions: 0,
            metrics: None,
        }
    }

    /// Publishes this store to the process-wide metrics (one store per process).
    pub fn with_metrics(mut self) -> Self {
        self.metrics = Some(specllava_telemetry::metrics());
        self.publish();
        self
    }

    /// Sets the session and KV gauges from the store's accounting.
    fn publish(&self) {
        if let Some(m) = self.metrics {
            m.active_sessions
                .set(i64::try_from(self.sessions.len()).unwrap_or(i64::MAX));
            m.kv_cache_bytes
                .set(i64::try_from(self.total_bytes).unwrap_or(i64::MAX));
        }
    }

    fn record_eviction(&mut self, reason: &str) {
        self.evictions += 1;
        if let Some(m) = self.metrics {
            m.record_eviction(reason);
        }
    }

    /// Number of live sessions.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// Whether no session is live.
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// Total bytes held by the sessions (as of their last update).
    pub fn total_bytes(&self) -> usize {
        self.total_bytes
    }

    /// Sessions evicted (LRU or TTL) since start.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    /// Whether a session exists.
    pub fn contains(&self, id: &str) -> bool {
        self.sessions.contains_key(id)
    }

    /// Inserts a new session, then evicts others (least recently used first)
    /// until the limits hold again. Returns the ids evicted.
    pub fn insert(&mut self, id: &str, state: S) -> Result<Vec<String>, SessionStoreError> {
        if self.sessions.contains_key(id) {
            return Err(SessionStoreError::AlreadyExists(id.to_owned()));
        }
        let bytes = state.bytes();
        if bytes > self.limits.max_bytes {
            return Err(SessionStoreError::TooLarge {
                id: id.to_owned(),
                bytes,
                budget: self.limits.max_bytes,
            });
        }
        Ok(self.store(id, state, bytes))
    }

    /// Mutable access to a session, marking it used.
    pub fn get_mut(&mut self, id: &str) -> Result<&mut S, SessionStoreError> {
        let e = self
            .sessions
            .get_mut(id)
            .ok_or_else(|| SessionStoreError::NotFound(id.to_owned()))?;
        e.last_used = Instant::now();
        Ok(&mut e.state)
    }

    /// Takes a session out (for a batched forward over several sessions);
    /// give it back with [`SessionStore::put_back`].
    pub fn take(&mut self, id: &str) -> Result<S, SessionStoreError> {
        let e = self
            .sessions
            .remove(id)
            .ok_or_else(|| SessionStoreError::NotFound(id.to_owned()))?;
        self.total_bytes -= e.bytes;
        Ok(e.state)
    }

    /// Returns a session taken with [`SessionStore::take`] and re-accounts its
    /// size. Returns the ids evicted to stay within limits (never `id`, unless
    /// it alone exceeds the budget, in which case it is dropped too).
    pub fn put_back(&mut self, id: &str, state: S) -> Vec<String> {
        let bytes = state.bytes();
        self.store(id, state, bytes)
    }

    /// Stores `state` (of `bytes`) as session `id`, just used, then evicts others as the
    /// limits require; returns the evicted ids.
    fn store(&mut self, id: &str, state: S, bytes: usize) -> Vec<String> {
        self.total_bytes += bytes;
        self.sessions.insert(
            id.to_owned(),
            Entry {
                state,
                last_used: Instant::now(),
                bytes,
            },
        );
        let evicted = self.enforce(id);
        self.publish();
        evicted
    }

    /// Re-accounts a session's size after it changed, then evicts as needed.
    pub fn update(&mut self, id: &str) -> Vec<String> {
        if let Some(e) = self.sessions.get_mut(id) {
            let bytes = e.state.bytes();
            self.total_bytes = self.total_bytes - e.bytes + bytes;
            e.bytes = bytes;
        }
        let evicted = self.enforce(id);
        self.publish();
        evicted
    }

    /// Removes a session; returns whether it existed.
    pub fn remove(&mut self, id: &str) -> bool {
        let existed = self.remove_quiet(id);
        self.publish();
        existed
    }

    /// Removes a session without publishing the gauges.
    fn remove_quiet(&mut self, id: &str) -> bool {
        match self.sessions.remove(id) {
            Some(e) => {
                self.total_bytes -= e.bytes;
                true
            }
            None => false,
        }
    }

    /// Drops sessions unused for longer than the TTL; returns their ids.
    pub fn expire(&mut self, now: Instant) -> Vec<String> {
        let ttl = self.limits.ttl;
        let expired: Vec<String> = self
            .sessions
            .iter()
            .filter(|(_, e)| now.saturating_duration_since(e.last_used) > ttl)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &expired {
            self.remove_quiet(id);
            self.record_eviction("ttl");
        }
        if !expired.is_empty() {
            self.publish();
        }
        expired
    }

    /// Evicts least recently used sessions other than `keep` while over a
    /// limit; drops `keep` too if it alone is over the byte budget.
    fn enforce(&mut self, keep: &str) -> Vec<String> {
        let mut evicted = Vec::new();
        while self.sessions.len() > self.limits.max_sessions
            || self.total_bytes > self.limits.max_bytes
        {
            let victim = self
                .sessions
                .iter()
                .filter(|(id, _)| id.as_str() != keep)
                .min_by_key(|(_, e)| e.last_used)
                .map(|(id, _)| id.clone());
            let Some(victim) =
                victim.or_else(|| self.sessions.contains_key(keep).then(|| keep.to_owned()))
            else {
                break;
            };
            let reason = if self.sessions.len() > self.limits.max_sessions {
                "lru"
            } else {
                "memory"
            };
            self.remove_quiet(&victim);
            self.record_eviction(reason);
            evicted.push(victim);
        }
        evicted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake(usize);
    impl SessionState for Fake {
        fn bytes(&self) -> usize {
            self.0
        }
    }

    fn limits(max_sessions: usize, max_bytes: usize) -> SessionLimits {
        SessionLimits {
            max_sessions,
            max_bytes,
            ttl: Duration::from_secs(60),
        }
    }

    #[test]
    fn evicts_least_recently_used_over_count() {
        let mut s = SessionStore::new(limits(2, 1000));
        s.insert("a", Fake(1)).unwrap();
        std::thread::sleep(Duration::from_millis(2));
        s.insert("b", Fake(1)).unwrap();
        std::thread::sleep(Duration::from_millis(2));
        s.get_mut("a").unwrap();
        let evicted = s.insert("c", Fake(1)).unwrap();
        assert_eq!(evicted, vec!["b".to_owned()]);
        assert!(s.contains("a") && s.contains("c"));
        assert_eq!(s.evictions(), 1);
    }

    #[test]
    fn evicts_over_bytes_and_tracks_growth() {
        let mut s = SessionStore::new(limits(10, 100));
        s.insert("a", Fake(40)).unwrap();
        std::thread::sleep(Duration::from_millis(2));
        s.insert("b", Fake(40)).unwrap();
        s.get_mut("b").unwrap().0 = 70;
        assert_eq!(s.update("b"), vec!["a".to_owned()]);
        assert_eq!(s.total_bytes(), 70);
        assert_eq!(
            s.get_mut("a").err(),
            Some(SessionStoreError::NotFound("a".into()))
        );
    }

    #[test]
    fn rejects_duplicates_and_oversized() {
        let mut s = SessionStore::new(limits(10, 100));
        s.insert("a", Fake(1)).unwrap();
        assert!(matches!(
            s.insert("a", Fake(1)),
            Err(SessionStoreError::AlreadyExists(_))
        ));
        assert!(matches!(
            s.insert("b", Fake(101)),
            Err(SessionStoreError::TooLarge { .. })
        ));
        let taken = s.take("a").unwrap();
        assert_eq!(s.total_bytes(), 0);
        assert!(s.put_back("a", taken).is_empty());
        assert!(s.remove("a"));
        assert!(!s.remove("a"));
    }

    #[test]
    fn expires_after_ttl() {
        let mut s = SessionStore::new(SessionLimits {
            max_sessions: 10,
            max_bytes: 100,
            ttl: Duration::from_millis(1),
        });
        s.insert("a", Fake(1)).unwrap();
        let later = Instant::now() + Duration::from_millis(50);
        assert_eq!(s.expire(later), vec!["a".to_owned()]);
        assert!(s.is_empty());
    }

    #[test]
    fn publishes_gauges_and_evictions() {
        // The only test of this process that publishes to the global metrics.
        let m = specllava_telemetry::metrics();
        let lru_before = m
            .evictions
            .get_or_create(&specllava_telemetry::metrics::ReasonLabel("lru".into()))
            .get();
        let mut s = SessionStore::new(limits(1, 1000)).with_metrics();
        s.insert("a", Fake(10)).unwrap();
        assert_eq!((m.active_sessions.get(), m.kv_cache_bytes.get()), (1, 10));
        s.insert("b", Fake(30)).unwrap();
        assert_eq!((m.active_sessions.get(), m.kv_cache_bytes.get()), (1, 30));
        let lru = m
            .evictions
            .get_or_create(&specllava_telemetry::metrics::ReasonLabel("lru".into()))
            .get();
        assert_eq!(lru, lru_before + 1);
        s.remove("b");
        assert_eq!((m.active_sessions.get(), m.kv_cache_bytes.get()), (0, 0));
    }
}
