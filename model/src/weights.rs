//! Safetensors checkpoints: a single `model.safetensors` or shards listed in
//! `model.safetensors.index.json`; every tensor converted to one float dtype (f32, or the
//! checkpoint's own f16 / bf16) on the target device.
//!
//! [`Weights`] is a name -> tensor map with a name prefix (like candle's `VarBuilder::pp`) whose
//! lookups check shapes, so a config that disagrees with the weights is reported with the
//! tensor's name and both shapes instead of failing later inside a matmul.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::error::{ModelError, Result};
use specllava_prompt::Fnv1a64;

/// File name of a single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// File name of the shard index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: HashMap<String, String>,
}

/// Tensors of a checkpoint, looked up under a prefix.
#[derive(Clone)]
pub struct Weights {
    tensors: Arc<HashMap<String, Tensor>>,
    /// The dtype each tensor had in the checkpoint (before the conversion).
    source_dtypes: Arc<HashMap<String, DType>>,
    prefix: String,
    dir: PathBuf,
}

impl Weights {
    /// Loads every safetensors file of the checkpoint in `dir` as f32 on `device`.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        Self::load_as(dir, device, Some(DType::F32))
    }

    /// Loads every safetensors file of the checkpoint in `dir` on `device`, converted to
    /// `dtype` (f32, f16 or bf16), or with `None` to the checkpoint's dtype: that of most of
    /// its weight elements (f64 becomes f32), so that mixed checkpoints end up in one dtype.
    pub fn load_as(dir: &Path, device: &Device, dtype: Option<DType>) -> Result<Self> {
        if let Some(d) = dtype
            && !matches!(d, DType::F32 | DType::F16 | DType::BF16)
        {
            return Err(ModelError::Config(format!(
                "unsupported model dtype {d:?} (f32, f16 or bf16)"
            )));
        }
        let single = dir.join(SINGLE_FILE);
        let index = dir.join(INDEX_FILE);
        let files: Vec<PathBuf> = if index.exists() {
            let text =
                std::fs::read_to_string(&index).map_err(|e| ModelError::bad_file(&index, e))?;
            let idx: ShardIndex =
                serde_json::from_str(&text).map_err(|e| ModelError::bad_file(&index, e))?;
            let shards: BTreeSet<&String> = idx.weight_map.values().collect();
            if shards.is_empty() {
                return Err(ModelError::bad_file(&index, "empty weight_map"));
            }
            shards.into_iter().map(|s| dir.join(s)).collect()
        } else if single.exists() {
            vec![single]
        } else {
            return Err(ModelError::MissingFile {
                path: single,
                what: format!("the model weights (neither {SINGLE_FILE} nor {INDEX_FILE} exists)"),
            });
        };
        let mut tensors = HashMap::new();
        let mut source_dtypes = HashMap::new();
        for file in &files {
            if !file.exists() {
                return Err(ModelError::MissingFile {
                    path: file.clone(),
                    what: format!("a weight shard listed in {INDEX_FILE}"),
                });
            }
            let data = std::fs::read(file).map_err(|e| ModelError::bad_file(file, e))?;
            let loaded = candle_core::safetensors::load_buffer(&data, device).map_err(|e| {
                ModelError::bad_file(file, format!("not a valid safetensors file: {e}"))
            })?;
            drop(data);
            for (name, t) in loaded {
                if !matches!(
                    t.dtype(),
                    DType::F32 | DType::F16 | DType::BF16 | DType::F64
                ) {
                    return Err(ModelError::bad_file(
                        file,
                        format!("tensor {name} has unsupported dtype {:?}", t.dtype()),
                    ));
                }
                source_dtypes.insert(name.clone(), t.dtype());
                tensors.insert(name, t);
            }
        }
        let dtype = dtype.unwrap_or_else(|| {
            let mut elems: HashMap<DType, usize> = HashMap::new();
            for t in tensors.values() {
                let d = if t.dtype() == DType::F64 {
                    DType::F32
                } else {
                    t.dtype()
                };
                *elems.entry(d).or_default() += t.elem_count();
            }
            [DType::F32, DType::BF16, DType::F16]
                .into_iter()
                .max_by_key(|d| elems.get(d).copied().unwrap_or(0))
                .expect("three candidates")
        });
        for t in tensors.values_mut() {
            if t.dtype() != dtype {
                *t = t.to_dtype(dtype)?;
            }
        }
        let mut w = Self::from_tensors(tensors, dir);
        w.source_dtypes = Arc::new(source_dtypes);
        Ok(w)
    }

    /// Wraps an in-memory map (tests, tools); each tensor's own dtype counts as its source
    /// dtype.
    pub fn from_tensors(tensors: HashMap<String, Tensor>, dir: &Path) -> Self {
        let source_dtypes = tensors
            .iter()
            .map(|(name, t)| (name.clone(), t.dtype()))
            .collect();
        Weights {
            tensors: Arc::new(tensors),
            source_dtypes: Arc::new(source_dtypes),
            prefix: String::new(),
            dir: dir.to_path_buf(),
        }
    }

    /// A view whose lookups are prefixed with `prefix` (include the trailing dot).
    pub fn pp(&self, prefix: &str) -> Self {
        Weights {
            tensors: self.tensors.clone(),
            source_dtypes: self.source_dtypes.clone(),
            prefix: format!("{}{}", self.prefix, prefix),
            dir: self.dir.clone(),
        }
    }

    /// The dtype `name` (under the prefix) had in the checkpoint; f32 when unknown.
    pub fn source_dtype(&self, name: &str) -> DType {
        self.source_dtypes
            .get(&format!("{}{}", self.prefix, name))
            .copied()
            .unwrap_or(DType::F32)
    }

    /// Whether `name` (under the prefix) exists.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors
            .contains_key(&format!("{}{}", self.prefix, name))
    }

    /// The tensor `name` (under the prefix), which must have shape `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let full = format!("{}{}", self.prefix, name);
        let t = self
            .tensors
            .get(&full)
            .ok_or_else(|| ModelError::MissingTensor {
                name: full.clone(),
                dir: self.dir.clone(),
            })?;
        if t.dims() != shape {
            return Err(ModelError::Config(format!(
                "tensor {full} has shape {:?} but config.json implies {:?} (checkpoint {})",
                t.dims(),
                shape,
                self.dir.display()
            )));
        }
        Ok(t.clone())
    }

    /// The first of `prefixes` under which `probe` exists.
    pub fn find_prefix<'a>(&self, prefixes: &[&'a str], probe: &str) -> Result<&'a str> {
        prefixes
            .iter()
            .find(|p| self.contains(&format!("{p}{probe}")))
            .copied()
            .ok_or_else(|| ModelError::MissingTensor {
                name: prefixes
                    .iter()
                    .map(|p| format!("{}{p}{probe}", self.prefix))
                    .collect::<Vec<_>>()
                    .join(" | "),
                dir: self.dir.clone(),
            })
    }

    /// Hashes every tensor under the prefix into `h` (names below it, shapes, dtypes and
    /// values as loaded), in name order: a fingerprint of those weights.
    pub fn hash_into(&self, h: &mut Fnv1a64) -> Result<()> {
        let mut names: Vec<&String> = self
            .tensors
            .keys()
            .filter(|n| n.starts_with(&self.prefix))
            .collect();
        names.sort();
        for name in names {
            let t = &self.tensors[name];
            h.write(&name.as_bytes()[self.prefix.len()..]);
            h.write(format!("{:?}{:?}", t.dims(), t.dtype()).as_bytes());
            let values = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            for v in values {
                h.write(&v.to_bits().to_le_bytes());
            }
        }
        Ok(())
    }

    /// The checkpoint directory (for messages).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}
