//! Replica sets: the draft and target replicas, resolved from `host:port`
//! endpoints (a DNS name resolving to several addresses is several replicas),
//! and session pinning (least pinned sessions first, among the replicas in rotation:
//! a replica that failed is out until its backoff ends, see [`crate::health`]).
//!
//! [`ReplicaSet::refresh`] re-resolves the endpoints; replicas that disappear
//! are marked gone (their sessions re-prefill elsewhere) and new ones join.
//! The orchestrator refreshes on a replica failure and periodically
//! ([`spawn_discovery`]), so replicas a scale-up adds take new sessions without
//! waiting for a failure. Existing sessions keep their replica while it stays.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use specllava_proto::v1 as pb;
use tokio::sync::OnceCell;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::health::{Backoff, Health};

/// The two kinds of model replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplicaKind {
    /// A draft service: proposes trees.
    Draft,
    /// A target service: verifies them.
    Target,
}

impl ReplicaKind {
    /// `draft` or `target` (logs, errors, metric labels).
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaKind::Draft => "draft",
            ReplicaKind::Target => "target",
        }
    }
}

impl std::fmt::Display for ReplicaKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Connect timeout of a replica channel unless the set says otherwise.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What a replica reported through its `Info` RPC.
#[derive(Debug, Clone)]
pub enum ReplicaInfo {
    /// A target's model and limits.
    Target(pb::InfoResponse),
    /// A draft's model and limits.
    Draft(pb::DraftInfoResponse),
}

impl ReplicaInfo {
    /// The model part (absent only from a malformed answer).
    pub fn model(&self) -> Option<&pb::ModelInfo> {
        match self {
            ReplicaInfo::Target(i) => i.model.as_ref(),
            ReplicaInfo::Draft(i) => i.model.as_ref(),
        }
    }
}

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
    /// Set when the replica's model disagrees with the deployment: never pinned.
    refused: AtomicBool,
    /// Whether it is in rotation (out for a backoff after a failure).
    health: Health,
    /// The backoff of a failure.
    backoff: Backoff,
    /// Model information, fetched once and checked by the engine.
    pub info: OnceCell<ReplicaInfo>,
}

impl Replica {
    /// A replica at `addr` whose channel connects on first use: over TLS (`https`) with
    /// `tls` (whose domain name, when set, is what the replica's certificate must name),
    /// plaintext without.
    pub fn new(
        addr: SocketAddr,
        connect_timeout: Duration,
        tls: Option<ClientTlsConfig>,
    ) -> Result<Self, tonic::transport::Error> {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))?
            .tcp_nodelay(true)
            .connect_timeout(connect_timeout);
        if let Some(tls) = tls {
            endpoint = endpoint.tls_config(tls)?;
        }
        let channel = endpoint.connect_lazy();
        Ok(Self {
            addr,
            channel,
            pinned: AtomicUsize::new(0),
            gone: AtomicBool::new(false),
            refused: AtomicBool::new(false),
            health: Health::default(),
            backoff: Backoff::default(),
            info: OnceCell::new(),
        })
    }

    /// Sets the backoff of the replica's failures.
    pub fn with_backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Whether new calls may go to the replica: in the set, compatible, and not out of
    /// rotation after a failure (a replica whose backoff is over is tried again).
    pub fn is_available(&self) -> bool {
        !self.is_gone() && !self.is_refused() && self.health.is_available(Instant::now())
    }

    /// Whether the replica failed and its backoff is over, with no success since: it takes
    /// sessions only when no healthy replica is left.
    pub fn on_probation(&self) -> bool {
        self.health.on_probation(Instant::now())
    }

    /// Whether the replica failed with no success since (in its backoff or on probation):
    /// it is probed every probe period until it answers.
    pub fn is_failing(&self) -> bool {
        !self.is_gone() && !self.is_refused() && self.health.failures() > 0
    }

    /// Takes the replica out of rotation after a failed call (transport error, timeout,
    /// UNAVAILABLE...), for a backoff that doubles with each failed retry.
    pub fn mark_down(&self, kind: ReplicaKind, why: &tonic::Status) {
        if let Some(wait) = self.health.mark_down(&self.backoff, Instant::now()) {
            tracing::warn!(%kind, addr = %self.addr, code = ?why.code(), error = why.message(), backoff_ms = wait.as_millis() as u64, "replica out of rotation");
            specllava_telemetry::metrics().record_error("replica_down", why.code());
        }
    }

    /// Puts the replica back in rotation after a call it answered.
    pub fn mark_up(&self, kind: ReplicaKind) {
        if self.health.mark_up() {
            tracing::info!(%kind, addr = %self.addr, "replica back in rotation");
        }
    }

    /// Whether the replica left the set.
    pub fn is_gone(&self) -> bool {
        self.gone.load(Ordering::Relaxed)
    }

    /// Whether the replica was refused as incompatible.
    pub fn is_refused(&self) -> bool {
        self.refused.load(Ordering::Relaxed)
    }

    /// Refuses the replica: no session is pinned to it from now on.
    pub fn refuse(&self) {
        self.refused.store(true, Ordering::Relaxed);
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
    kind: ReplicaKind,
    connect_timeout: Duration,
    backoff: Backoff,
    endpoints: Vec<String>,
    replicas: RwLock<Vec<Arc<Replica>>>,
    /// TLS towards the replicas (`None`: plaintext).
    tls: Option<ClientTlsConfig>,
    /// The name replica certificates must carry (`None`: each endpoint's host name).
    tls_domain: Option<String>,
    /// The host name each resolved address came from (the default TLS domain name).
    hosts: RwLock<HashMap<SocketAddr, String>>,
}

/// Strips an optional `http://` / `https://` scheme.
fn host_port(endpoint: &str) -> &str {
    endpoint
        .trim()
        .trim_start_matches("http://")
        .trim_start_matches("https://")
        .trim_end_matches('/')
}

/// The host of a `host:port` endpoint when it is a name (not an IP address).
fn host_name(host_port: &str) -> Option<&str> {
    let host = host_port.rsplit_once(':').map_or(host_port, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty() && host.parse::<IpAddr>().is_err()).then_some(host)
}

impl ReplicaSet {
    /// An unresolved set; call [`ReplicaSet::refresh`] to resolve.
    pub fn new(kind: ReplicaKind, endpoints: Vec<String>) -> Self {
        let endpoints = endpoints
            .into_iter()
            .filter(|e| !e.trim().is_empty())
            .collect();
        Self {
            kind,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            backoff: Backoff::default(),
            endpoints,
            replicas: RwLock::new(Vec::new()),
            tls: None,
            tls_domain: None,
            hosts: RwLock::new(HashMap::new()),
        }
    }

    /// Reaches the replicas over TLS with `tls` (`None`: plaintext), checking their
    /// certificates against `domain`, or when `None` against the host name of the endpoint
    /// each replica was resolved from (an IP endpoint: its IP address).
    pub fn with_tls(mut self, tls: Option<ClientTlsConfig>, domain: Option<String>) -> Self {
        self.tls = tls;
        self.tls_domain = domain;
        self
    }

    /// The TLS configuration of the replica at `addr`.
    fn tls_for(&self, addr: SocketAddr) -> Option<ClientTlsConfig> {
        let tls = self.tls.clone()?;
        let host = self
            .hosts
            .read()
            .expect("hosts lock poisoned")
            .get(&addr)
            .cloned();
        Some(match self.tls_domain.clone().or(host) {
            Some(domain) => tls.domain_name(domain),
            None => tls,
        })
    }

    /// Sets the connect timeout of the replicas' channels.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets the backoff of failed replicas (replicas resolved from now on).
    pub fn with_backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Draft or target.
    pub fn kind(&self) -> ReplicaKind {
        self.kind
    }

    /// Whether no endpoint is configured.
    pub fn is_unconfigured(&self) -> bool {
        self.endpoints.is_empty()
    }

    /// Resolves every endpoint (DNS) and updates the set: new addresses join,
    /// vanished ones are marked gone. Returns the number of replicas.
    ///
    /// When an endpoint does not resolve (a DNS hiccup), replicas are only added,
    /// never removed: a failed lookup is no evidence that a replica went away.
    pub async fn refresh(&self) -> usize {
        let mut addrs: Vec<SocketAddr> = Vec::new();
        let mut complete = true;
        for ep in &self.endpoints {
            match tokio::net::lookup_host(host_port(ep)).await {
                Ok(found) => {
                    let found: Vec<SocketAddr> = found.collect();
                    if let Some(host) = host_name(host_port(ep)) {
                        let mut hosts = self.hosts.write().expect("hosts lock poisoned");
                        for a in &found {
                            hosts.insert(*a, host.to_owned());
                        }
                    }
                    addrs.extend(found);
                }
                Err(e) => {
                    complete = false;
                    tracing::warn!(kind = %self.kind, endpoint = %ep, error = %e, "cannot resolve endpoint")
                }
            }
        }
        self.apply_resolved(addrs, complete)
    }

    /// Updates the set to the resolved `addrs`: unknown ones join; when the resolution
    /// is `complete`, replicas not among them are marked gone and leave the set.
    /// Returns the number of replicas.
    pub fn apply_resolved(&self, addrs: Vec<SocketAddr>, complete: bool) -> usize {
        let wanted: HashSet<SocketAddr> = addrs.iter().copied().collect();
        let mut replicas = self.replicas.write().expect("replica lock poisoned");
        if complete {
            for r in replicas.iter() {
                if !wanted.contains(&r.addr) {
                    tracing::info!(kind = %self.kind, addr = %r.addr, pinned = r.pinned(), "replica gone");
                    r.gone.store(true, Ordering::Relaxed);
                }
            }
            replicas.retain(|r| wanted.contains(&r.addr));
        }
        let known: HashSet<SocketAddr> = replicas.iter().map(|r| r.addr).collect();
        let mut seen = HashSet::new();
        for addr in addrs {
            if known.contains(&addr) || !seen.insert(addr) {
                continue;
            }
            match Replica::new(addr, self.connect_timeout, self.tls_for(addr)) {
                Ok(r) => {
                    let r = r.with_backoff(self.backoff);
                    tracing::info!(kind = %self.kind, %addr, "replica added");
                    replicas.push(Arc::new(r));
                }
                Err(e) => {
                    tracing::warn!(kind = %self.kind, %addr, error = %e, "bad replica address")
                }
            }
        }
        replicas.len()
    }

    /// Pins a new session to the available replica with the fewest pinned sessions,
    /// avoiding `exclude` and replicas on probation when another one is available; `None`
    /// when no replica is in rotation (gone, refused, or out after a failure).
    pub fn pin(&self, exclude: Option<SocketAddr>) -> Option<Pin> {
        let replicas = self.replicas.read().expect("replica lock poisoned");
        let pick = replicas
            .iter()
            .filter(|r| r.is_available())
            .min_by_key(|r| {
                (
                    Some(r.addr) == exclude,
                    r.on_probation(),
                    r.pinned(),
                    r.addr,
                )
            })?;
        pick.pinned.fetch_add(1, Ordering::Relaxed);
        Some(Pin {
            replica: Arc::clone(pick),
        })
    }

    /// When no replica is in rotation: pins a new session to the replica most likely to be
    /// up (fewest consecutive failures, then the earliest end of backoff), skipping those in
    /// `tried` (which failed this request already), gone and refused ones. A request tries
    /// it rather than failing at once: a replica that restarted may be up before its backoff
    /// or the next probe says so.
    pub fn pin_likeliest(&self, tried: &[SocketAddr]) -> Option<Pin> {
        let replicas = self.replicas.read().expect("replica lock poisoned");
        let pick = replicas
            .iter()
            .filter(|r| !r.is_gone() && !r.is_refused() && !tried.contains(&r.addr))
            .min_by_key(|r| (r.health.failures(), r.health.down_until(), r.addr))?;
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

/// Refreshes every set in `sets` each `interval` (the first refresh one interval from
/// now) until the returned task is aborted. A zero interval starts nothing.
pub fn spawn_discovery(
    sets: Vec<Arc<ReplicaSet>>,
    interval: Duration,
) -> Option<tokio::task::JoinHandle<()>> {
    if interval.is_zero() {
        return None;
    }
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            for set in sets.iter().filter(|s| !s.is_unconfigured()) {
                let n = set.refresh().await;
                tracing::debug!(kind = %set.kind(), replicas = n, "replicas refreshed");
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn resolves_and_balances_pins() {
        let set = ReplicaSet::new(
            ReplicaKind::Target,
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
    async fn a_failed_replica_is_out_of_rotation_until_its_backoff_ends() {
        let backoff = Backoff {
            base: Duration::from_millis(200),
            max: Duration::from_secs(1),
        };
        let set = ReplicaSet::new(ReplicaKind::Target, vec![]).with_backoff(backoff);
        set.apply_resolved(vec![addr("10.0.0.1:7000"), addr("10.0.0.2:7000")], true);
        let a = set.pin(None).unwrap();
        assert_eq!(a.replica().addr, addr("10.0.0.1:7000"));
        a.replica()
            .mark_down(ReplicaKind::Target, &tonic::Status::unavailable("dead"));
        assert!(!a.replica().is_available());
        // New sessions and re-pins avoid it, however few sessions it has.
        for _ in 0..3 {
            assert_eq!(set.pin(None).unwrap().replica().addr, addr("10.0.0.2:7000"));
        }
        let moved = set.pin(Some(a.replica().addr)).unwrap();
        assert_eq!(moved.replica().addr, addr("10.0.0.2:7000"));
        // None in rotation: no pin in rotation; the likeliest to be up is the one with fewer
        // failures, then the earlier end of backoff (here the first to fail), unless this
        // request tried it.
        moved.replica().mark_down(
            ReplicaKind::Target,
            &tonic::Status::deadline_exceeded("stuck"),
        );
        assert!(set.pin(None).is_none());
        let likeliest = set.pin_likeliest(&[]).unwrap();
        assert_eq!(likeliest.replica().addr, addr("10.0.0.1:7000"));
        let other = set.pin_likeliest(&[addr("10.0.0.1:7000")]).unwrap();
        assert_eq!(other.replica().addr, addr("10.0.0.2:7000"));
        assert!(
            set.pin_likeliest(&[addr("10.0.0.1:7000"), addr("10.0.0.2:7000")])
                .is_none()
        );
        drop((likeliest, other));
        // After the backoff both are on probation and may be tried again; an answer puts
        // one back for good, and it is preferred to the one still on probation.
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(a.replica().on_probation() && moved.replica().on_probation());
        let retry = set.pin(Some(moved.replica().addr)).unwrap();
        assert_eq!(retry.replica().addr, addr("10.0.0.1:7000"));
        retry.replica().mark_up(ReplicaKind::Target);
        assert!(retry.replica().is_available() && !retry.replica().on_probation());
        for _ in 0..2 {
            assert_eq!(
                set.pin(None).unwrap().replica().addr,
                addr("10.0.0.1:7000"),
                "the healthy replica first, however many sessions it has"
            );
        }
    }

    #[tokio::test]
    async fn empty_set_has_no_replica() {
        let set = ReplicaSet::new(ReplicaKind::Draft, vec![]);
        assert!(set.is_unconfigured());
        assert_eq!(set.refresh().await, 0);
        assert!(set.pin(None).is_none());
    }

    #[test]
    fn tls_domains_are_endpoint_host_names() {
        assert_eq!(
            host_name("specllava-target:50051"),
            Some("specllava-target")
        );
        assert_eq!(
            host_name(host_port("https://localhost:7/")),
            Some("localhost")
        );
        assert_eq!(host_name("127.0.0.1:50051"), None);
        assert_eq!(host_name("[::1]:50051"), None);
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn addrs_of(set: &ReplicaSet) -> Vec<SocketAddr> {
        let mut a: Vec<SocketAddr> = set.replicas().iter().map(|r| r.addr).collect();
        a.sort();
        a
    }

    #[tokio::test]
    async fn new_replicas_take_new_sessions_and_old_sessions_stay() {
        let set = ReplicaSet::new(ReplicaKind::Draft, vec!["replicas.invalid:7000".into()]);
        assert_eq!(set.apply_resolved(vec![addr("10.0.0.1:7000")], true), 1);
        let a = set.pin(None).unwrap();
        let b = set.pin(None).unwrap();
        // Scale-up: a second replica appears; new sessions go there (fewest pinned).
        assert_eq!(
            set.apply_resolved(vec![addr("10.0.0.1:7000"), addr("10.0.0.2:7000")], true),
            2
        );
        let c = set.pin(None).unwrap();
        let d = set.pin(None).unwrap();
        assert_eq!(c.replica().addr, addr("10.0.0.2:7000"));
        assert_eq!(d.replica().addr, addr("10.0.0.2:7000"));
        // Existing sessions keep their replica.
        assert_eq!(a.replica().addr, addr("10.0.0.1:7000"));
        assert!(!a.replica().is_gone() && !b.replica().is_gone());
        // Scale-down: the first replica vanishes; its sessions see it gone (and
        // re-prefill elsewhere), new sessions avoid it.
        assert_eq!(set.apply_resolved(vec![addr("10.0.0.2:7000")], true), 1);
        assert!(a.replica().is_gone() && b.replica().is_gone());
        assert!(!c.replica().is_gone());
        let e = set.pin(None).unwrap();
        assert_eq!(e.replica().addr, addr("10.0.0.2:7000"));
        // An incomplete resolution (DNS error) adds but never removes.
        assert_eq!(set.apply_resolved(vec![addr("10.0.0.3:7000")], false), 2);
        assert!(!c.replica().is_gone());
        assert_eq!(
            addrs_of(&set),
            vec![addr("10.0.0.2:7000"), addr("10.0.0.3:7000")]
        );
    }

    #[tokio::test]
    async fn unresolvable_endpoint_keeps_the_known_replicas() {
        let set = ReplicaSet::new(
            ReplicaKind::Target,
            vec!["no-such-host.invalid:7000".into()],
        );
        set.apply_resolved(vec![addr("10.0.0.1:7000")], true);
        let pin = set.pin(None).unwrap();
        assert_eq!(set.refresh().await, 1);
        assert!(!pin.replica().is_gone());
    }

    #[tokio::test]
    async fn periodic_discovery_follows_dns() {
        // The set's view is stale (an old address); the endpoint resolves to another.
        let set = Arc::new(ReplicaSet::new(
            ReplicaKind::Target,
            vec!["127.0.0.1:7003".into()],
        ));
        set.apply_resolved(vec![addr("127.0.0.2:7003")], true);
        let stale = set.pin(None).unwrap();
        let task = spawn_discovery(vec![Arc::clone(&set)], Duration::from_millis(200)).unwrap();
        // Nothing happens before the first interval.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(addrs_of(&set), vec![addr("127.0.0.2:7003")]);
        // After it, the set follows the resolution without any failure.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while addrs_of(&set) != vec![addr("127.0.0.1:7003")] {
            assert!(tokio::time::Instant::now() < deadline, "not refreshed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(stale.replica().is_gone());
        assert_eq!(
            set.pin(None).unwrap().replica().addr,
            addr("127.0.0.1:7003")
        );
        task.abort();
        assert!(spawn_discovery(vec![set], Duration::ZERO).is_none());
    }
}
