//! Every mapping between the wire messages (`specllava.v1`) and the domain types of
//! [`speculate`], in one place. Handlers and the orchestrator call these; nothing else
//! reads a proto enum or applies a wire default (`top_p` 0, `max_new_tokens` 0, empty
//! scores) on its own.

use std::time::Duration;

use specllava_prompt::{AnyRes, ImageTokens};
use specllava_proto::v1 as pb;
use speculate::{
    DraftParams, FinishReason, FirstStep, SamplingError, SamplingParams, StopConditions, TokenTree,
    TreeError, TreeLimits, TreeMode, VerifyCostTable, VerifyOutcome,
};

/// A duration in whole nanoseconds, saturating (the unit of every `*_ns` field).
pub fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// An enum field of a request holding a value this server does not know (a newer client,
/// or garbage): refused rather than read as the default.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown value {value} for the enum field `{field}`")]
pub struct UnknownEnumValue {
    /// The field, as the request names it (e.g. `speculation.mode`).
    pub field: &'static str,
    /// The value received.
    pub value: i32,
}

/// The wire tree mode; `field` names it in the error for an unknown value.
pub fn tree_mode_from_proto(mode: i32, field: &'static str) -> Result<TreeMode, UnknownEnumValue> {
    let known =
        pb::TreeMode::try_from(mode).map_err(|_| UnknownEnumValue { field, value: mode })?;
    Ok(match known {
        pb::TreeMode::Dynamic => TreeMode::Dynamic,
        pb::TreeMode::Static => TreeMode::Static,
        pb::TreeMode::Chain => TreeMode::Chain,
    })
}

/// The tree mode on the wire.
pub fn tree_mode_to_proto(mode: TreeMode) -> pb::TreeMode {
    match mode {
        TreeMode::Dynamic => pb::TreeMode::Dynamic,
        TreeMode::Static => pb::TreeMode::Static,
        TreeMode::Chain => pb::TreeMode::Chain,
    }
}

/// The public API's speculation mode (`speculation.mode`): a tree shape, or `None` for
/// target-only decoding. Adaptive is a dynamic tree whose shape the budget policy picks
/// (the caller refuses shape overrides with it).
pub fn speculation_mode_from_proto(mode: i32) -> Result<Option<TreeMode>, UnknownEnumValue> {
    let known = pb::SpeculationMode::try_from(mode).map_err(|_| UnknownEnumValue {
        field: "speculation.mode",
        value: mode,
    })?;
    Ok(match known {
        pb::SpeculationMode::Dynamic | pb::SpeculationMode::Adaptive => Some(TreeMode::Dynamic),
        pb::SpeculationMode::Chain => Some(TreeMode::Chain),
        pb::SpeculationMode::Static => Some(TreeMode::Static),
        pb::SpeculationMode::Off => None,
    })
}

/// Draft params as sent (unset: all zero, a root-only dynamic tree); an unknown
/// `params.mode` is refused.
pub fn draft_params_from_proto(
    p: Option<pb::DraftParams>,
) -> Result<DraftParams, UnknownEnumValue> {
    let p = p.unwrap_or_default();
    Ok(DraftParams {
        mode: tree_mode_from_proto(p.mode, "params.mode")?,
        depth: p.depth as usize,
        branching: p.branching as usize,
        budget: p.budget as usize,
    })
}

/// Draft params on the wire.
pub fn draft_params_to_proto(p: &DraftParams) -> pb::DraftParams {
    pb::DraftParams {
        mode: tree_mode_to_proto(p.mode) as i32,
        depth: p.depth as u32,
        branching: p.branching as u32,
        budget: p.budget as u32,
    }
}

/// Sampling params from their wire fields, validated. `top_p` 0 (unset) means 1 (off).
pub fn sampling_from_parts(
    temperature: f32,
    top_k: u32,
    top_p: f32,
    seed: u64,
) -> Result<SamplingParams, SamplingError> {
    let s = SamplingParams {
        temperature,
        top_k: top_k as usize,
        top_p: if top_p == 0.0 { 1.0 } else { top_p },
        seed,
    };
    s.validate()?;
    Ok(s)
}

/// Wire sampling params, validated (see [`sampling_from_parts`]).
pub fn sampling_from_proto(p: Option<pb::SamplingParams>) -> Result<SamplingParams, SamplingError> {
    let p = p.unwrap_or_default();
    sampling_from_parts(p.temperature, p.top_k, p.top_p, p.seed)
}

/// Sampling params on the wire.
pub fn sampling_to_proto(s: &SamplingParams) -> pb::SamplingParams {
    pb::SamplingParams {
        temperature: s.temperature,
        top_k: u32::try_from(s.top_k).unwrap_or(u32::MAX),
        top_p: s.top_p,
        seed: s.seed,
    }
}

/// Wire stop conditions (`max_new_tokens` 0 = no limit).
pub fn stop_from_proto(p: Option<pb::StopConditions>) -> StopConditions {
    let p = p.unwrap_or_default();
    StopConditions {
        eos_token_ids: p.eos_token_ids,
        max_new_tokens: if p.max_new_tokens == 0 {
            usize::MAX
        } else {
            p.max_new_tokens as usize
        },
    }
}

/// A wire first-step request, its sampling validated.
pub fn first_step_from_proto(p: pb::FirstStepRequest) -> Result<FirstStep, SamplingError> {
    Ok(FirstStep {
        sampling: sampling_from_proto(p.sampling)?,
        stop: stop_from_proto(p.stop),
    })
}

/// The token a first step picked, on the wire (`None` when the outcome emitted nothing).
pub fn first_step_to_proto(o: &VerifyOutcome) -> Option<pb::FirstStep> {
    Some(pb::FirstStep {
        token: *o.emitted.last()?,
        finish: finish_to_proto(o.finish) as i32,
    })
}

/// The finish reason on the wire (`None`: not finished).
pub fn finish_to_proto(f: Option<FinishReason>) -> pb::FinishReason {
    match f {
        None => pb::FinishReason::Unspecified,
        Some(FinishReason::Eos) => pb::FinishReason::Eos,
        Some(FinishReason::Length) => pb::FinishReason::Length,
    }
}

/// A wire finish reason (unknown values read as unspecified).
pub fn finish_from_proto(f: i32) -> pb::FinishReason {
    pb::FinishReason::try_from(f).unwrap_or(pb::FinishReason::Unspecified)
}

/// A tree on the wire.
pub fn tree_to_proto(t: &TokenTree) -> pb::TokenTree {
    pb::TokenTree {
        tokens: t.tokens().to_vec(),
        parents: t.parents().to_vec(),
        scores: t.scores().to_vec(),
    }
}

/// A wire tree, validated against `limits` (empty scores read as all 0).
pub fn tree_from_proto(t: pb::TokenTree, limits: &TreeLimits) -> Result<TokenTree, TreeError> {
    let scores = if t.scores.is_empty() {
        vec![0.0; t.tokens.len()]
    } else {
        t.scores
    };
    TokenTree::new(t.tokens, t.parents, scores, limits)
}

/// The verification outcome a `VerifyResponse` reports (its finish reason left out: the
/// orchestrator reads it from the response).
pub fn verify_outcome_from_proto(r: &pb::VerifyResponse) -> VerifyOutcome {
    VerifyOutcome {
        accepted_path: r.accepted_path.iter().map(|&i| i as usize).collect(),
        emitted: r.emitted.clone(),
        proposed: r.proposed as usize,
        accepted: r.accepted as usize,
        finish: None,
    }
}

/// A verification outcome on the wire (the service-side fields, timing and KV length, are
/// the caller's).
pub fn verify_outcome_to_proto(o: &VerifyOutcome) -> pb::VerifyResponse {
    pb::VerifyResponse {
        emitted: o.emitted.clone(),
        accepted_path: o.accepted_path.iter().map(|&i| i as u32).collect(),
        accepted: o.accepted as u32,
        proposed: o.proposed as u32,
        finish: finish_to_proto(o.finish) as i32,
        ..Default::default()
    }
}

/// A target's measured verify costs (`InfoResponse.verify_costs`) as the budget policy's
/// table; an error when they are not a full nodes x batch grid.
pub fn verify_cost_table(costs: &[pb::VerifyCost]) -> Result<VerifyCostTable, String> {
    let axis = |f: fn(&pb::VerifyCost) -> u32| {
        let mut v: Vec<usize> = costs.iter().map(|c| f(c) as usize).collect();
        v.sort_unstable();
        v.dedup();
        v
    };
    let (nodes, batches) = (axis(|c| c.nodes), axis(|c| c.batch));
    // Batch-major grid, as VerifyCostTable wants it; a missing point rejects the report.
    let grid: Option<Vec<f64>> = batches
        .iter()
        .flat_map(|&b| nodes.iter().map(move |&n| (b, n)))
        .map(|(b, n)| {
            costs
                .iter()
                .find(|c| c.batch as usize == b && c.nodes as usize == n)
                .map(|c| c.forward_ns as f64)
        })
        .collect();
    let grid = grid.ok_or_else(|| "not a full nodes x batch grid".to_owned())?;
    VerifyCostTable::new(nodes, batches, grid).map_err(|e| e.to_string())
}

/// How many KV rows an image becomes on a replica of `model` (fixed, or any-resolution
/// tiling by the image's size).
pub fn image_tokens_from_proto(model: &pb::ModelInfo) -> ImageTokens {
    match &model.any_resolution {
        None => ImageTokens::Fixed(model.num_image_tokens.max(1) as usize),
        Some(a) => ImageTokens::AnyRes(AnyRes {
            pinpoints: a
                .pinpoints
                .chunks_exact(2)
                .map(|p| (p[0] as usize, p[1] as usize))
                .collect(),
            tile: a.tile as usize,
            grid: a.grid as usize,
            base_tokens: a.base_tokens as usize,
            max_tiles: a.max_tiles.map(|n| n as usize),
            tile_single_images_only: a.tile_single_images_only,
        }),
    }
}

/// The wire form of any-resolution tiling; `None` for a fixed count.
pub fn any_resolution_to_proto(tokens: &ImageTokens) -> Option<pb::AnyResolution> {
    match tokens {
        ImageTokens::Fixed(_) => None,
        ImageTokens::AnyRes(a) => Some(pb::AnyResolution {
            pinpoints: a
                .pinpoints
                .iter()
                .flat_map(|&(h, w)| [h as u32, w as u32])
                .collect(),
            tile: a.tile as u32,
            grid: a.grid as u32,
            base_tokens: a.base_tokens as u32,
            max_tiles: a.max_tiles.map(|n| n as u32),
            tile_single_images_only: a.tile_single_images_only,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_defaults() {
        let s = sampling_from_proto(None).unwrap();
        assert_eq!(s.top_p, 1.0, "top_p 0 (unset) is off");
        assert!(sampling_from_parts(0.5, 0, 1.5, 0).is_err());
        assert_eq!(stop_from_proto(None).max_new_tokens, usize::MAX);
        assert_eq!(
            tree_mode_from_proto(99, "params.mode")
                .unwrap_err()
                .to_string(),
            "unknown value 99 for the enum field `params.mode`"
        );
        assert_eq!(
            speculation_mode_from_proto(pb::SpeculationMode::Off as i32),
            Ok(None)
        );
        assert_eq!(speculation_mode_from_proto(0), Ok(Some(TreeMode::Dynamic)));
        assert_eq!(
            speculation_mode_from_proto(pb::SpeculationMode::Adaptive as i32),
            Ok(Some(TreeMode::Dynamic))
        );
        assert_eq!(
            speculation_mode_from_proto(7).unwrap_err().field,
            "speculation.mode"
        );
        let limits = TreeLimits {
            max_nodes: 8,
            max_depth: 4,
            vocab_size: 10,
        };
        let t = tree_from_proto(
            pb::TokenTree {
                tokens: vec![1, 2],
                parents: vec![-1, 0],
                scores: vec![],
            },
            &limits,
        )
        .unwrap();
        assert_eq!(t.scores(), &[0.0, 0.0]);
    }

    #[test]
    fn round_trips() {
        for mode in [TreeMode::Dynamic, TreeMode::Static, TreeMode::Chain] {
            let p = DraftParams {
                mode,
                depth: 3,
                branching: 2,
                budget: 7,
            };
            assert_eq!(
                draft_params_from_proto(Some(draft_params_to_proto(&p))).unwrap(),
                p
            );
        }
        let s = SamplingParams {
            temperature: 0.7,
            top_k: 5,
            top_p: 0.9,
            seed: 42,
        };
        let w = sampling_to_proto(&s);
        assert_eq!(
            sampling_from_parts(w.temperature, w.top_k, w.top_p, w.seed).unwrap(),
            s
        );
        let o = VerifyOutcome {
            accepted_path: vec![0, 2],
            emitted: vec![5, 6],
            proposed: 4,
            accepted: 1,
            finish: None,
        };
        assert_eq!(verify_outcome_from_proto(&verify_outcome_to_proto(&o)), o);
    }

    #[test]
    fn verify_costs_need_a_full_grid() {
        let c = |nodes, batch, forward_ns| pb::VerifyCost {
            nodes,
            batch,
            forward_ns,
        };
        let full = [c(1, 1, 10), c(4, 1, 20), c(1, 4, 30), c(4, 4, 40)];
        assert!(verify_cost_table(&full).is_ok());
        assert!(verify_cost_table(&full[..3]).is_err());
    }

    #[test]
    fn any_resolution_round_trips() {
        let rule = ImageTokens::AnyRes(AnyRes {
            pinpoints: vec![(336, 672), (672, 336)],
            tile: 336,
            grid: 24,
            base_tokens: 576,
            max_tiles: Some(9),
            tile_single_images_only: true,
        });
        let info = pb::ModelInfo {
            num_image_tokens: 576,
            any_resolution: any_resolution_to_proto(&rule),
            ..Default::default()
        };
        assert_eq!(image_tokens_from_proto(&info), rule);
        let fixed = pb::ModelInfo {
            num_image_tokens: 576,
            ..Default::default()
        };
        assert_eq!(image_tokens_from_proto(&fixed), ImageTokens::Fixed(576));
    }
}
