//! Speculation statistics of one turn: the accumulator the engine updates each step, and the
//! [`TurnStats`] a finished turn reports.

use std::time::Duration;

use serde::Serialize;

use specllava_proto::v1 as pb;
use specllava_wire::convert::nanos;

/// Statistics accumulated during a generation.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Stats {
    /// Steps: the prefill's (when it picked the first token) and every verify.
    pub steps: u32,
    /// Steps that verified a drafted tree (not root-only).
    pub spec_steps: u32,
    /// Draft nodes proposed.
    pub drafted: u32,
    /// Draft tokens accepted.
    pub accepted: u32,
    /// `reached[d]`: drafted steps whose accepted path reached depth `d + 1`.
    pub reached: Vec<u32>,
    /// Drafting time reported by the draft.
    pub draft_ns: u64,
    /// Forward time reported by the target.
    pub verify_ns: u64,
    /// Round trips minus the services' own time.
    pub network_ns: u64,
    /// Prefill time (open / append).
    pub prefill_ns: u64,
    /// Whether a draft stream was used.
    pub speculative: bool,
    /// Draft-ahead guesses that were right.
    pub ahead_hits: u32,
    /// Draft-ahead guesses that were wrong.
    pub ahead_misses: u32,
    /// Spare-time drafting the hits saved.
    pub ahead_saved_ns: u64,
    /// Steps that verified a tree pre-drafted during the previous verify (no draft round
    /// trip).
    pub pipelined_steps: u32,
}

impl Stats {
    /// A drafted tree that came back after `rtt_ns`.
    pub fn record_draft(&mut self, tree: &pb::DraftTree, rtt_ns: u64) {
        self.draft_ns += tree.draft_ns;
        // The wait for the draft worker is idle time, not network (as a verify's queueing).
        self.network_ns += rtt_ns.saturating_sub(draft_service_ns(tree));
        match pb::AheadOutcome::try_from(tree.ahead) {
            Ok(pb::AheadOutcome::Hit) => {
                self.ahead_hits += 1;
                self.ahead_saved_ns += tree.ahead_ns;
            }
            Ok(pb::AheadOutcome::Miss) => self.ahead_misses += 1,
            _ => {}
        }
    }

    /// A verify answer that came back after `rtt_ns`; `drafted` when the tree came from
    /// the draft.
    pub fn record_verify(&mut self, resp: &pb::VerifyResponse, rtt_ns: u64, drafted: bool) {
        self.steps += 1;
        self.verify_ns += resp.forward_ns;
        self.network_ns += rtt_ns.saturating_sub(resp.total_ns);
        if drafted {
            self.spec_steps += 1;
            self.drafted += resp.proposed;
            self.accepted += resp.accepted;
            let a = resp.accepted as usize;
            if self.reached.len() < a {
                self.reached.resize(a, 0);
            }
            for r in &mut self.reached[..a] {
                *r += 1;
            }
        }
    }

    /// The turn's statistics for `generated` tokens over `total` wall time, the first token
    /// after `ttft`.
    pub fn summary(&self, generated: u32, total: Duration, ttft: Duration) -> TurnStats {
        let decode_secs = total.saturating_sub(ttft).as_secs_f64();
        TurnStats {
            steps: self.steps,
            drafted: self.drafted,
            accepted: self.accepted,
            mean_accepted_length: if self.steps == 0 {
                0.0
            } else {
                generated as f32 / self.steps as f32
            },
            acceptance_per_depth: self
                .reached
                .iter()
                .map(|&r| {
                    if self.spec_steps == 0 {
                        0.0
                    } else {
                        r as f32 / self.spec_steps as f32
                    }
                })
                .collect(),
            speculative: self.speculative,
            tokens_per_second: if decode_secs > 0.0 {
                (generated.saturating_sub(1)) as f32 / decode_secs as f32
            } else {
                0.0
            },
            draft_ns: self.draft_ns,
            verify_ns: self.verify_ns,
            network_ns: self.network_ns,
            prefill_ns: self.prefill_ns,
            time_to_first_token_ns: nanos(ttft),
            total_ns: nanos(total),
            ahead_hits: self.ahead_hits,
            ahead_misses: self.ahead_misses,
            ahead_saved_ns: self.ahead_saved_ns,
            pipelined_steps: self.pipelined_steps,
        }
    }
}

/// How speculation went in one turn: the gRPC summary's `SpeculationStats` and, serialized
/// as it is, the HTTP API's `speculation` extension field.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TurnStats {
    /// Verification steps (target forwards).
    pub steps: u32,
    /// Draft nodes proposed.
    pub drafted: u32,
    /// Draft tokens accepted.
    pub accepted: u32,
    /// Mean tokens emitted per step.
    pub mean_accepted_length: f32,
    /// Fraction of drafted steps whose accepted path reached each depth (index 0 = depth 1).
    pub acceptance_per_depth: Vec<f32>,
    /// Whether the draft was used.
    pub speculative: bool,
    /// Decoding speed after the first token.
    pub tokens_per_second: f32,
    /// Time drafting (reported by the draft).
    pub draft_ns: u64,
    /// Time verifying (the target's forward passes).
    pub verify_ns: u64,
    /// Time in the network and queues.
    pub network_ns: u64,
    /// Time prefilling.
    pub prefill_ns: u64,
    /// Time to the first token.
    pub time_to_first_token_ns: u64,
    /// Wall time.
    pub total_ns: u64,
    /// Draft-ahead guesses that were right (the next tree was pre-drafted).
    pub ahead_hits: u32,
    /// Draft-ahead guesses that were wrong.
    pub ahead_misses: u32,
    /// Spare-time drafting the hits saved.
    pub ahead_saved_ns: u64,
    /// Steps that verified a tree pre-drafted during the previous verify.
    pub pipelined_steps: u32,
}

/// The time the draft service reports on a tree, from the request's arrival to the answer
/// (its drafting time from a draft that does not report that).
pub fn draft_service_ns(tree: &pb::DraftTree) -> u64 {
    tree.total_ns.max(tree.draft_ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acceptance_per_depth_counts_drafted_steps_only() {
        let mut s = Stats::default();
        let resp = |accepted, proposed| pb::VerifyResponse {
            accepted,
            proposed,
            forward_ns: 10,
            total_ns: 12,
            ..Default::default()
        };
        s.record_verify(&resp(2, 4), 20, true);
        s.record_verify(&resp(0, 4), 20, true);
        s.record_verify(&resp(0, 0), 20, false);
        assert_eq!((s.steps, s.spec_steps, s.drafted, s.accepted), (3, 2, 8, 2));
        assert_eq!(s.reached, vec![1, 1]);
        assert_eq!(s.network_ns, 24);
        let sum = s.summary(5, Duration::from_secs(2), Duration::from_secs(1));
        assert_eq!(sum.acceptance_per_depth, vec![0.5, 0.5]);
        assert_eq!(sum.tokens_per_second, 4.0);
        assert!((sum.mean_accepted_length - 5.0 / 3.0).abs() < 1e-6);
    }

    #[test]
    fn a_draft_round_trip_counts_its_wait_for_the_worker_as_idle_not_network() {
        let mut s = Stats::default();
        let tree = |draft_ns, total_ns| pb::DraftTree {
            draft_ns,
            total_ns,
            ..Default::default()
        };
        // 30 of drafting after 50 of waiting for the worker, 20 on the wire.
        s.record_draft(&tree(30, 80), 100);
        assert_eq!((s.draft_ns, s.network_ns), (30, 20));
        // A draft that does not report its total: everything but the drafting.
        s.record_draft(&tree(30, 0), 100);
        assert_eq!((s.draft_ns, s.network_ns), (60, 90));
    }
}
