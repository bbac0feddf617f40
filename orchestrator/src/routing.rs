//! Replica sets: the draft and target replicas, resolved from `host:port`
//! endpoints (a DNS name resolving to several addresses is several replicas),
//! and session pinning (least pinned sessions first).
//!
//! [`ReplicaSet::refresh`] re-resolves the endpoints; replicas that disappear
//! are marked gone (their sessions re-prefill elsewhere) and new ones join.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use tokio::sync::OnceCell;
use tonic::transport::{Channel, Endpoint};

/// One replica: an address and a lazily connected channel.
pub struct Replica {
    /// Resolved address.
    pub addr: SocketAddr,
    /// gRPC channel (connects on first use, reconnects as needed).
    pub channel: Channel,
    /// Sessions pinned to this replica.
    pinned: AtomicUsize,
    /// Set when the replica left the set (refresh) or failed.
    gone: AtomicBool,
    /// Model information, fetched once (target replicas).
    pub info: OnceCell<specllava_proto::v1::InfoResponse>,
}

impl Replica {
    fn new(addr: SocketAddr) -> Result<Self, tonic::transport::Error> {
        let channel = Endpoint::from_shared(format!("http://{addr}"))?
            .tcp_nodelay(true)
            .connect_timeout(std::time::Duration::from_secs(5))
            .connect_lazy();
        Ok(Self {
            addr,
            channel,
            pinned: AtomicUsize::new(0),
            gone: AtomicBool::new(false),
            info: OnceCell::new(),
        })
    }

    /// Whether the replica left the set.
    pub fn is_gone(&self) -> bool {
        self.gone.load(Ordering::Relaxed)
    }

    /// Sessions pinned now.
    pub fn pinned(&self) -> usize {
        self.pinned.load(Ordering::Relaxed)
    }
}

/// A session's pin on a replica; unpins on drop.
pub struct Pin {
    replica: Arc<Replica>,
}

impl Pin {
    /// The pinned replica.
    pub fn replica(&self) -> &Arc<Replica> {
        &self.replica
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        self.replica.pinned.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The replicas of one kind.
pub struct ReplicaSet {
    kind: &'static str,
    endpoints: Vec<String>,
    replicas: RwLock<Vec<Arc<Replica>>>,
}

/// Strips an optional `http://` scheme.
fn host_port(endpoint: &str) -> &str {
    endpoint
        .trim()
        .trim_start_matches("http://")
        .trim_end_matches('/')
}

impl ReplicaSet {
    /// An unresolved set; call [`ReplicaSet::refresh`] to resolve.
    pub fn new(kind: &'static str, endpoints: Vec<String>) -> Self {
        let endpoints = endpoints
            .into_iter()
            .filter(|e| !e.trim().is_empty())
            .collect();
        Self {
            kind,
            endpoints,
            replicas: RwLock::new(Vec::new()),
        }
    }

    /// `draft` or `target`.
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// Whether no endpoint is configured.
    pub fn is_unconfigured(&self) -> bool {
        self.endpoints.is_empty()
    }

    /// Resolves every endpoint (DNS) and updates the set: new addresses join,
    /// vanished ones are marked gone. Returns the number of replicas.
    pub async fn refresh(&self) -> usize {
        let mut addrs: Vec<SocketAddr> = Vec::new();
        for ep in &self.endpoints {
            match tokio::net::lookup_host(host_port(ep)).await {
                Ok(found) => addrs.extend(found),
                Err(e) => {
                    tracing::warn!(kind = self.kind, endpoint = %ep, error = %e, "cannot resolve endpoint")
                }
            }
        }
        let wanted: HashSet<SocketAddr> = addrs.iter().copied().collect();
        let mut replicas = self.replicas.write().expect("replica lock poisoned");
        for r in replicas.iter() {
            if !wanted.contains(&r.addr) {
                r.gone.store(true, Ordering::Relaxed);
            }
        }
        replicas.retain(|r| wanted.contains(&r.addr));
        let known: HashSet<SocketAddr> = replicas.iter().map(|r| r.addr).collect();
        let mut seen = HashSet::new();
        for addr in addrs {
            if known.contains(&addr) || !seen.insert(addr) {
                continue;
            }
            match Replica::new(addr) {
                Ok(r) => {
                    tracing::info!(kind = self.kind, %addr, "replica added");
                    replicas.push(Arc::new(r));
                }
                Err(e) => {
                    tracing::warn!(kind = self.kind, %addr, error = %e, "bad replica address")
                }
            }
        }
        replicas.len()
    }

    /// Pins a new session to the replica with the fewest pinned sessions,
    /// avoiding `exclude` when another replica exists.
    pub fn pin(&self, exclude: Option<SocketAddr>) -> Option<Pin> {
        let replicas = self.replicas.read().expect("replica lock poisoned");
        let pick = replicas
            .iter()
            .filter(|r| !r.is_gone())
            .min_by_key(|r| (Some(r.addr) == exclude, r.pinned(), r.addr))?;
        pick.pinned.fetch_add(1, Ordering::Relaxed);
        Some(Pin {
            replica: Arc::clone(pick),
        })
    }

    /// All replicas now in the set.
    pub fn replicas(&self) -> Vec<Arc<Replica>> {
        self.replicas.read().expect("replica lock poisoned").clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn resolves_and_balances_pins() {
        let set = ReplicaSet::new(
            "target",
            vec![
                "127.0.0.1:7001".into(),
                "http://127.0.0.1:7002".into(),
                " ".into(),
            ],
        );
        assert_eq!(set.refresh().await, 2);
        let a = set.pin(None).unwrap();
        let b = set.pin(None).unwrap();
        assert_ne!(a.replica().addr, b.replica().addr);
        let c = set.pin(Some(a.replica().addr)).unwrap();
        assert_eq!(c.replica().addr, b.replica().addr);
        drop(c);
        assert_eq!(b.replica().pinned(), 1);
        assert_eq!(set.refresh().await, 2);
    }

    #[tokio::test]
    async fn empty_set_has_no_replica() {
        let set = ReplicaSet::new("draft", vec![]);
        assert!(set.is_unconfigured());
        assert_eq!(set.refresh().await, 0);
        assert!(set.pin(None).is_none());
    }
}
