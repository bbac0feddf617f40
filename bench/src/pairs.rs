//! The model pairs a benchmark run measures: the bundled demo pair (a target small enough to
//! live in the CPU's caches) and the wide pair (the same target widened by
//! [`specllava_model::widen`], whose weights stream from memory as a 7B-13B target's do).

use std::path::{Path, PathBuf};

use serde::Serialize;
use specllava_model::ModelError;
use specllava_model::widen::widen_checkpoint;

/// Which regime a pair stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PairKind {
    /// The bundled demo pair: the target's weights fit the last-level cache.
    Demo,
    /// The demo target widened: the same function, weights streamed from memory.
    Wide,
}

impl PairKind {
    /// Short name (file and folder names, report keys).
    pub fn name(self) -> &'static str {
        match self {
            PairKind::Demo => "demo",
            PairKind::Wide => "wide",
        }
    }
}

/// A target and a draft checkpoint measured together.
#[derive(Debug, Clone, Serialize)]
pub struct ModelPair {
    /// Regime.
    pub kind: PairKind,
    /// What the pair is, in one sentence (for the report).
    pub description: String,
    /// Target checkpoint folder.
    pub target: PathBuf,
    /// Draft checkpoint folder.
    pub draft: PathBuf,
}

/// Name of the file recording what a widened folder was built from.
const STAMP: &str = "widened-from.json";

/// What a widened checkpoint was built from: rebuilt when any of it changes.
#[derive(Debug, Serialize, serde::Deserialize, PartialEq)]
struct Stamp {
    source: String,
    factor: usize,
    /// Size and modification time of every source file that goes into the widened weights.
    files: Vec<(String, u64, u128)>,
}

fn stamp_of(source: &Path, factor: usize) -> std::io::Result<Stamp> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(source)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".safetensors") || name.ends_with(".json") {
            let meta = entry.metadata()?;
            let mtime = meta
                .modified()?
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            files.push((name, meta.len(), mtime));
        }
    }
    files.sort();
    Ok(Stamp {
        source: source.display().to_string(),
        factor,
        files,
    })
}

/// The widened copy of `target` by `factor` under `cache_dir`, built if missing or stale
/// (a few seconds for the demo target; deterministic). Returns its folder.
pub fn ensure_widened(
    target: &Path,
    factor: usize,
    cache_dir: &Path,
) -> Result<PathBuf, ModelError> {
    let name = target
        .file_name()
        .map_or("target".into(), |n| n.to_string_lossy().into_owned());
    let dir = cache_dir.join(format!("{name}-x{factor}"));
    let want = stamp_of(target, factor).map_err(|e| ModelError::bad_file(target, e))?;
    let stamp_path = dir.join(STAMP);
    let current = std::fs::read_to_string(&stamp_path)
        .ok()
        .and_then(|t| serde_json::from_str::<Stamp>(&t).ok());
    if current.as_ref() == Some(&want) && dir.join("model.safetensors").exists() {
        return Ok(dir);
    }
    widen_checkpoint(target, &dir, factor)?;
    let text = serde_json::to_string_pretty(&want).expect("stamp serialises");
    std::fs::write(&stamp_path, text).map_err(|e| ModelError::bad_file(&stamp_path, e))?;
    Ok(dir)
}

/// The pairs of a run: the demo pair, then (when `wide_factor > 1`) the wide pair built from
/// it under `cache_dir`.
pub fn pairs(
    target: &Path,
    draft: &Path,
    wide_factor: usize,
    cache_dir: &Path,
) -> Result<Vec<ModelPair>, ModelError> {
    let mut out = vec![ModelPair {
        kind: PairKind::Demo,
        description: "the bundled demo pair: the target's decoder weights fit the CPU's \
                      last-level cache, so verifying a tree costs almost a forward per node"
            .into(),
        target: target.to_path_buf(),
        draft: draft.to_path_buf(),
    }];
    if wide_factor > 1 {
        let wide = ensure_widened(target, wide_factor, cache_dir)?;
        out.push(ModelPair {
            kind: PairKind::Wide,
            description: format!(
                "the demo target widened x{wide_factor} (every decoder width tiled, \
                 function-preserving: the same logits, {}x the decoder weights), the same \
                 draft: a stand-in for the cost of a target too big for the caches, never a \
                 better model",
                wide_factor * wide_factor
            ),
            target: wide,
            draft: draft.to_path_buf(),
        });
    }
    Ok(out)
}
