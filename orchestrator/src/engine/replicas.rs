//! The engine's replicas: each replica's `Info` checked against the deployment (refused for
//! good when its model disagrees), its measured costs adopted by the budget policy, and a
//! conversation's target session pinned, opened or brought up to date (failing over to
//! another target when one fails).

use std::net::SocketAddr;

use super::*;
use bytes::Bytes;

impl Engine {
    /// The replica's `Info` (fetched once), checked against the orchestrator's tokenizer
    /// and, for a draft, against `target` (or the first compatible target). A replica that
    /// disagrees is refused for good: logged once, counted in
    /// `specllava_replicas_refused_total{kind}`, never pinned again.
    pub(super) async fn checked_info<'r>(
        &self,
        kind: ReplicaKind,
        r: &'r Replica,
        target: Option<&pb::ModelInfo>,
    ) -> Result<&'r ReplicaInfo, OrchestratorError> {
        let info = r
            .info
            .get_or_try_init(|| async {
                match kind {
                    ReplicaKind::Target => {
                        self.replicas.target_info(r).await.map(ReplicaInfo::Target)
                    }
                    ReplicaKind::Draft => self.replicas.draft_info(r).await.map(ReplicaInfo::Draft),
                }
            })
            .await
            .map_err(|s| replica_err(kind, r, s))?;
        let problems = match (kind, info.model()) {
            (_, None) => vec!["its Info has no model description".to_owned()],
            (ReplicaKind::Target, Some(m)) => target_mismatches(&self.identity, m),
            (ReplicaKind::Draft, Some(m)) => match target.or(self.reference.get()) {
                Some(t) => draft_mismatches(&self.identity, t, m),
                // No target to compare with yet: checked again when one is at hand.
                None => Vec::new(),
            },
        };
        if problems.is_empty() {
            if let (ReplicaKind::Target, Some(m), ReplicaInfo::Target(t)) =
                (kind, info.model(), info)
            {
                let _ = self.reference.set(m.clone());
                self.adopt_verify_costs(r, &t.verify_costs);
            }
            if let ReplicaInfo::Draft(d) = info {
                self.adopt_level_costs(r, &d.level_costs);
            }
            return Ok(info);
        }
        let reason = problems.join("; ");
        if !r.is_refused() {
            r.refuse();
            tracing::error!(%kind, replica = %r.addr, %reason, "replica refused: its model is incompatible with this deployment");
            specllava_telemetry::metrics().record_refused_replica(kind.as_str());
        }
        Err(OrchestratorError::Incompatible {
            kind,
            addr: r.addr.to_string(),
            reason,
        })
    }

    /// Checks every replica of `set` now (targets before drafts, so that drafts have a
    /// target to compare with): at start-up and after discovery adds replicas.
    pub async fn check_replicas(&self, kind: ReplicaKind) -> CheckReport {
        let set = match kind {
            ReplicaKind::Draft => &self.drafts,
            ReplicaKind::Target => &self.targets,
        };
        let mut report = CheckReport::default();
        for r in set.replicas() {
            match self.checked_info(kind, &r, None).await {
                Ok(_) => report.compatible += 1,
                Err(OrchestratorError::Incompatible { addr, reason, .. }) => {
                    report.refused.push(format!("{addr}: {reason}"));
                }
                Err(e) => {
                    tracing::debug!(%kind, replica = %r.addr, error = %e, "replica not checked (unreachable)");
                    report.unreachable += 1;
                }
            }
        }
        report
    }

    /// The targets' model (the first compatible target's), once one was checked: its context
    /// and image tokens, what a turn's prompt is counted against before any work.
    pub fn target_model(&self) -> Option<&pb::ModelInfo> {
        self.reference.get()
    }

    /// Probes every failed replica (out of rotation or on probation) with an `Info` call,
    /// all at once, each waiting at most `timeout`: an answer puts it back in rotation at
    /// once, a failure is recorded as any call's (a replica in its backoff stays there; one
    /// on probation has its backoff doubled), no answer in time changes nothing (a stopped
    /// process is not probed into a longer backoff). Run every probe period, so that a
    /// replica that came back takes sessions again without a client's request being the test.
    pub async fn probe_replicas(&self, timeout: Duration) {
        let probes = [
            (ReplicaKind::Target, &self.targets),
            (ReplicaKind::Draft, &self.drafts),
        ]
        .into_iter()
        .flat_map(|(kind, set)| set.replicas().into_iter().map(move |r| (kind, r)))
        .filter(|(_, r)| r.is_failing())
        .map(|(kind, r)| async move {
            // The outcome is recorded by the call itself ([`Guarded`]).
            let call = async {
                match kind {
                    ReplicaKind::Target => self.replicas.target_info(&r).await.is_ok(),
                    ReplicaKind::Draft => self.replicas.draft_info(&r).await.is_ok(),
                }
            };
            let answered = tokio::time::timeout(timeout, call).await.ok();
            tracing::debug!(%kind, replica = %r.addr, ?answered, "replica probed");
        });
        futures::future::join_all(probes).await;
    }

    /// Replaces the budget policy's verify-cost prior by the first target replica's
    /// start-up measurement (online updates refine it from then on). Replicas are assumed
    /// to run on the same kind of device.
    pub(super) fn adopt_verify_costs(&self, r: &Replica, costs: &[pb::VerifyCost]) {
        if costs.is_empty() || self.verify_cost_measured.swap(true, Ordering::SeqCst) {
            return;
        }
        match verify_cost_table(costs) {
            Ok(table) => {
                if let Ok(mut policy) = self.policy.lock() {
                    policy.cost.verify = table;
                }
                tracing::info!(replica = %r.addr, points = costs.len(), "budget policy uses the target's measured verify cost");
            }
            Err(e) => {
                self.verify_cost_measured.store(false, Ordering::SeqCst);
                tracing::warn!(replica = %r.addr, error = %e, "ignoring the target's verify cost report");
            }
        }
    }

    /// Replaces the budget policy's draft-cost prior by the first draft replica's start-up
    /// measurement of its cost per level (online updates refine it from then on).
    pub(super) fn adopt_level_costs(&self, r: &Replica, costs: &[pb::LevelCost]) {
        if costs.is_empty() || self.draft_cost_calibrated.swap(true, Ordering::SeqCst) {
            return;
        }
        let points: Vec<(usize, f64)> = costs
            .iter()
            .map(|c| (c.rows as usize, c.forward_ns as f64))
            .collect();
        let fitted = self.policy.lock().map(|mut policy| {
            policy
                .cost
                .calibrate_draft(&points)
                .map(|()| (policy.cost.draft_level_ns, policy.cost.draft_node_ns))
        });
        match fitted {
            Ok(Ok((level_ns, node_ns))) => {
                self.draft_cost_measured.store(true, Ordering::Relaxed);
                tracing::info!(replica = %r.addr, points = costs.len(), level_ns, node_ns, "budget policy uses the draft's measured cost per level");
            }
            Ok(Err(e)) => {
                self.draft_cost_calibrated.store(false, Ordering::SeqCst);
                tracing::warn!(replica = %r.addr, error = %e, "ignoring the draft's cost report");
            }
            Err(_) => self.draft_cost_calibrated.store(false, Ordering::SeqCst),
        }
    }

    /// Opens the session on `rs` or brings it up to date with the history (with `first_step`,
    /// a target's prefill also picks the token after it); the replica's answer, `None` when
    /// the session was in sync already.
    pub(super) async fn sync(
        &self,
        kind: ReplicaKind,
        rs: &mut ReplicaSession,
        conv_id: &str,
        history: &[u32],
        images: &[Bytes],
        first_step: Option<pb::FirstStepRequest>,
    ) -> Result<Option<SyncReply>, OrchestratorError> {
        let image_id = self.identity.image_token_id;
        let planned = plan_sync(kind, rs, conv_id, history, images, image_id, first_step)?;
        let Some(planned) = planned else {
            return Ok(None);
        };
        let target = planned.target.clone();
        let reply = planned.run(self.replicas.as_ref()).await;
        self.finish_sync(rs, conv_id, &target, reply)
            .await
            .map(Some)
    }

    /// Records a sync's answer in `rs`. A session that already exists where it was to be
    /// opened (a previous incarnation) is closed, so that the next attempt replaces it.
    pub(super) async fn finish_sync(
        &self,
        rs: &mut ReplicaSession,
        conv_id: &str,
        planned: &SyncTarget,
        reply: Result<SyncReply, Status>,
    ) -> Result<SyncReply, OrchestratorError> {
        match reply {
            Ok(reply) => {
                planned.apply(rs, &reply);
                Ok(reply)
            }
            Err(s) => {
                if planned.opens && s.code() == Code::AlreadyExists {
                    close_session(
                        self.replicas.as_ref(),
                        planned.kind,
                        &planned.replica,
                        conv_id,
                    )
                    .await;
                    rs.opened = false;
                }
                Err(replica_err(planned.kind, &planned.replica, s))
            }
        }
    }

    /// Closes a session on a replica in the background (best effort, under the call's
    /// deadline): a stuck replica never holds up the caller.
    pub(super) fn close_in_background(&self, kind: ReplicaKind, r: Arc<Replica>, id: &str) {
        let replicas = Arc::clone(&self.replicas);
        let id = id.to_owned();
        tokio::spawn(async move { close_session(replicas.as_ref(), kind, &r, &id).await });
    }

    /// Closes the conversation's sessions on both replicas, in the background (they
    /// reopen from the history if the conversation continues).
    pub fn close_replicas(&self, conv: &mut Conversation) {
        for (kind, rs) in [
            (ReplicaKind::Target, conv.target.as_mut()),
            (ReplicaKind::Draft, conv.draft.as_mut()),
        ] {
            if let Some(rs) = rs.filter(|rs| rs.opened) {
                rs.opened = false;
                self.close_in_background(kind, Arc::clone(rs.pin.replica()), &conv.id);
            }
        }
    }

    /// Keeps `slot` pinned to a `kind` replica in rotation: when its replica is out
    /// (failed, gone, refused), the session moves to another one, avoiding the one it
    /// leaves (where it is closed in the background). Whether a replica is pinned.
    pub(super) fn ensure_pinned(
        &self,
        kind: ReplicaKind,
        slot: &mut Option<ReplicaSession>,
        id: &str,
    ) -> bool {
        if slot
            .as_ref()
            .is_some_and(|rs| rs.pin.replica().is_available())
        {
            return true;
        }
        let set = match kind {
            ReplicaKind::Draft => &self.drafts,
            ReplicaKind::Target => &self.targets,
        };
        let left = slot.take();
        let exclude = left.as_ref().map(|rs| rs.pin.replica().addr);
        if let Some(rs) = left.filter(|rs| rs.opened) {
            self.close_in_background(kind, Arc::clone(rs.pin.replica()), id);
        }
        *slot = set.pin(exclude).map(ReplicaSession::new);
        if let (Some(from), Some(to)) = (exclude, slot.as_ref()) {
            tracing::info!(%kind, %from, to = %to.pin.replica().addr, session = id, "session re-pinned");
        }
        slot.is_some()
    }

    /// Pins a compatible target, checks it and syncs it, re-pinning / re-prefilling on
    /// failure; returns the target's `Info` and, when `first` asked for it (a turn's start)
    /// and the sync prefilled, the token its prefill picked after the history (the turn's
    /// first token: not yet in the history). `failed`: a replica that just failed this turn
    /// (tried no more).
    pub(super) async fn ensure_target(
        &self,
        conv: &mut Conversation,
        stats: &mut Stats,
        first: Option<&GenParams>,
        failed: Option<SocketAddr>,
    ) -> Result<(pb::InfoResponse, Option<pb::FirstStep>), OrchestratorError> {
        let mut last_err = None;
        // Replicas that failed this request: each one costs one attempt at most.
        let mut tried: Vec<SocketAddr> = failed.into_iter().collect();
        // A failed replica is out of rotation: the turn fails over to every target in
        // rotation before it fails; with none in rotation, it tries the one most likely to
        // be up (one that restarted may be up before a probe says so).
        let attempts = self.cfg.target_attempts + self.targets.replicas().len();
        for _attempt in 0..attempts {
            // With no target in rotation, a pinned one this request has not tried yet stays
            // pinned (its session kept, not closed and reopened on the same replica).
            let keep_pin = conv.target.as_ref().is_some_and(|t| {
                let r = t.pin.replica();
                !r.is_gone() && !r.is_refused() && !tried.contains(&r.addr)
            }) && !self.targets.replicas().iter().any(|r| r.is_available());
            if !keep_pin && !self.ensure_pinned(ReplicaKind::Target, &mut conv.target, &conv.id) {
                conv.target = self.targets.pin_likeliest(&tried).map(ReplicaSession::new);
            }
            if conv.target.is_none() {
                if let Some(e) = &last_err {
                    tracing::warn!(error = %e, "no target replica left");
                }
                return Err(OrchestratorError::NoReplica(ReplicaKind::Target));
            }
            let t = conv.target.as_mut().expect("pinned above");
            let r = Arc::clone(t.pin.replica());
            let synced = match self.checked_info(ReplicaKind::Target, &r, None).await {
                Ok(ReplicaInfo::Target(info)) => {
                    let model = info.model.clone().unwrap_or_default();
                    // A budget of no tokens asks for none (on the wire, 0 means no limit),
                    // nor does a prompt that fills the context (the steps' rule: a token is
                    // emitted while a position is left past the root).
                    let image_id = self.identity.image_token_id;
                    let rows = kv_rows(
                        &conv.history,
                        conv.history.len(),
                        image_id,
                        &image_rows_on(&model, &conv.images, conv.images.len()),
                    );
                    let first = first
                        .filter(|params| params.max_new_tokens > 0 && rows < model.max_context);
                    let first_step = first.map(|params| pb::FirstStepRequest {
                        sampling: Some(sampling_to_proto(&params.sampling)),
                        stop: Some(pb::StopConditions {
                            eos_token_ids: self.eos_ids(params, &model),
                            max_new_tokens: params.max_new_tokens,
                        }),
                    });
                    self.sync(
                        ReplicaKind::Target,
                        t,
                        &conv.id,
                        &conv.history,
                        &conv.images,
                        first_step,
                    )
                    .await
                    .map(|reply| (reply, info.clone()))
                }
                Ok(ReplicaInfo::Draft(_)) => Err(OrchestratorError::Internal(
                    "a target replica answered as a draft".into(),
                )),
                Err(e) => Err(e),
            };
            match synced {
                Ok((reply, info)) => {
                    let Some(reply) = reply else {
                        return Ok((info, None));
                    };
                    stats.prefill_ns += reply.forward_ns;
                    return Ok((info, reply.first_step));
                }
                Err(e @ OrchestratorError::Incompatible { .. }) => {
                    conv.target = None;
                    last_err = Some(e);
                }
                Err(e) if e.is_replica_code(Code::NotFound) => {
                    t.opened = false;
                    last_err = Some(e);
                }
                Err(e) if e.is_replica_failure() => {
                    // Out of rotation already (every call feeds the replica's health): the
                    // next attempt re-pins. The replica may have gone: see the set as DNS
                    // sees it now.
                    tracing::warn!(error = %e, "target replica failed, re-pinning");
                    tried.push(r.addr);
                    self.targets.refresh().await;
                    last_err = Some(e);
                }
                Err(e) if e.is_replica_code(Code::AlreadyExists) => last_err = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_err.unwrap_or(OrchestratorError::NoReplica(ReplicaKind::Target)))
    }
}
