//! Per-session key/value cache with a committed prefix and pending tree nodes.
//!
//! Each layer keeps one K and one V buffer: candle tensors of shape `[kv_heads, capacity,
//! head_dim]` on the model's device, or, for the CPU backend ([`crate::cpu`]), host vectors of
//! `[capacity, kv_heads * head_dim]` that attention reads in place. Rows `[0, committed)` hold
//! the committed sequence; rows `[committed, committed + pending)` hold the pending tree nodes in
//! the order they were added. The capacity grows by doubling, so appending is amortised O(new
//! rows).
//!
//! [`KvCache::commit`] moves the rows of one root-to-node path to the end of the committed prefix
//! and drops the other pending rows; [`KvCache::rollback`] truncates the committed prefix.
//! Memory is released when the cache is dropped.

use candle_core::{DType, Device, Tensor};

use crate::error::{ModelError, Result};

/// Smallest capacity allocated on first use.
const MIN_CAPACITY: usize = 64;

/// A pending (not yet committed) tree node.
#[derive(Debug, Clone)]
pub(crate) struct PendingNode {
    /// Index of the parent among pending nodes; `None` attaches to the committed prefix.
    pub parent: Option<usize>,
    /// Depth below the committed prefix (0 for a root).
    pub depth: usize,
}

#[derive(Debug)]
struct LayerKv {
    k: Tensor,
    v: Tensor,
}

/// One layer's K and V rows in host memory, `[capacity, kv_heads * head_dim]` each.
#[derive(Debug, Clone, Default)]
pub(crate) struct HostLayerKv {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

/// Where the buffers live.
#[derive(Debug)]
enum Storage {
    /// Candle tensors on the model's device (the candle backend).
    Tensors(Vec<Option<LayerKv>>),
    /// Host vectors (the CPU backend).
    Host(Vec<HostLayerKv>),
}

/// Key/value cache of one session (see the module docs).
#[derive(Debug)]
pub struct KvCache {
    storage: Storage,
    num_layers: usize,
    num_kv_heads: usize,
    head_dim: usize,
    dtype: DType,
    device: Device,
    capacity: usize,
    committed: usize,
    pending: Vec<PendingNode>,
}

impl KvCache {
    /// An empty cache of candle tensors of `dtype` on `device` for a model with these
    /// dimensions.
    pub fn new(
        num_layers: usize,
        num_kv_heads: usize,
        head_dim: usize,
        dtype: DType,
        device: &Device,
    ) -> Self {
        KvCache {
            storage: Storage::Tensors((0..num_layers).map(|_| None).collect()),
            num_layers,
            num_kv_heads,
            head_dim,
            dtype,
            device: device.clone(),
            capacity: 0,
            committed: 0,
            pending: Vec::new(),
        }
    }

    /// An empty cache in host memory, for the CPU backend.
    pub(crate) fn new_host(num_layers: usize, num_kv_heads: usize, head_dim: usize) -> Self {
        KvCache {
            storage: Storage::Host(vec![HostLayerKv::default(); num_layers]),
            ..Self::new(num_layers, num_kv_heads, head_dim, DType::F32, &Device::Cpu)
        }
    }

    /// Number of committed rows (the sequence the session has fully accepted).
    pub fn committed_len(&self) -> usize {
        self.committed
    }

    /// Number of pending tree nodes.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Total rows in use (committed + pending).
    pub fn used_len(&self) -> usize {
        self.committed + self.pending.len()
    }

    /// Bytes held by the K/V buffers (allocated capacity, not just used rows).
    pub fn bytes(&self) -> usize {
        let per_layer =
            2 * self.num_kv_heads * self.capacity * self.head_dim * self.dtype.size_in_bytes();
        self.num_layers * per_layer
    }

    /// A deep copy (own buffers), e.g. to fork a session or to compare decoding strategies.
    pub fn fork(&self) -> Result<KvCache> {
        let storage = match &self.storage {
            Storage::Tensors(layers) => Storage::Tensors(
                layers
                    .iter()
                    .map(|l| {
                        l.as_ref()
                            .map(|l| -> Result<LayerKv> {
                                Ok(LayerKv {
                                    k: l.k.copy()?,
                                    v: l.v.copy()?,
                                })
                            })
                            .transpose()
                    })
                    .collect::<Result<Vec<_>>>()?,
            ),
            Storage::Host(layers) => Storage::Host(layers.clone()),
        };
        Ok(KvCache {
            storage,
            num_layers: self.num_layers,
            num_kv_heads: self.num_kv_heads,
            head_dim: self.head_dim,
            dtype: self.dtype,
            device: self.device.clone(),
            capacity: self.capacity,
            committed: self.committed,
            pending: self.pending.clone(),
        })
    }

    /// Keeps the pending rows at `path` (a root-to-node chain of pending indices) appended in
    /// order to the committed rows; drops all other pending rows.
    pub fn commit(&mut self, path: &[usize]) -> Result<()> {
        self.commit_keeping(path, &[])
    }

    /// Commits `path` like [`KvCache::commit`], but keeps the pending rows `keep` (increasing,
    /// all after the last path row; each a child of the path's last node or of an earlier kept
    /// row) pending, renumbered `0..keep.len()` in order: a subtree drafted below the path
    /// survives its commit (the draft's pre-drafted tree on a draft-ahead hit).
    pub fn commit_keeping(&mut self, path: &[usize], keep: &[usize]) -> Result<()> {
        let n = self.pending.len();
        for (i, &p) in path.iter().enumerate() {
            if p >= n {
                return Err(ModelError::InvalidInput(format!(
                    "commit path index {p} out of range ({n} pending nodes)"
                )));
            }
            let expected = if i == 0 { None } else { Some(path[i - 1]) };
            if self.pending[p].parent != expected {
                return Err(ModelError::InvalidInput(format!(
                    "commit path is not a root-to-node chain: node {p} has parent {:?}, expected {:?}",
                    self.pending[p].parent, expected
                )));
            }
        }
        let mut kept: Vec<PendingNode> = Vec::with_capacity(keep.len());
        for (j, &p) in keep.iter().enumerate() {
            let after = if j == 0 { path.last() } else { keep.get(j - 1) };
            if p >= n || after.is_some_and(|&a| p <= a) {
                return Err(ModelError::InvalidInput(format!(
                    "kept row {p} is out of range or out of order ({n} pending nodes)"
                )));
            }
            let node = &self.pending[p];
            let parent = match node.parent {
                Some(q) if path.last() == Some(&q) => None,
                Some(q) => match keep[..j].iter().position(|&k| k == q) {
                    Some(new) => Some(new),
                    None => {
                        return Err(ModelError::InvalidInput(format!(
                            "kept row {p} hangs below row {q}, which is neither kept nor the path's end"
                        )));
                    }
                },
                None if path.is_empty() => None,
                None => {
                    return Err(ModelError::InvalidInput(format!(
                        "kept row {p} is a root but the path is not empty"
                    )));
                }
            };
            kept.push(PendingNode {
                parent,
                depth: node.depth.saturating_sub(path.len()),
            });
        }
        // Rows to keep, in their new order: the path's, then the kept subtree's. Their
        // indices increase and rows[i] >= i, so moving them down in order never overwrites
        // a row still to be moved.
        let rows: Vec<usize> = path.iter().chain(keep).copied().collect();
        let identity = rows.iter().enumerate().all(|(i, &p)| i == p);
        if !identity {
            match &mut self.storage {
                Storage::Tensors(layers) => {
                    let idx: Vec<u32> = rows.iter().map(|&p| (self.committed + p) as u32).collect();
                    let idx = Tensor::new(idx.as_slice(), &self.device)?;
                    for layer in layers.iter_mut().flatten() {
                        let k = layer.k.index_select(&idx, 1)?;
                        let v = layer.v.index_select(&idx, 1)?;
                        layer.k.slice_set(&k, 1, self.committed)?;
                        layer.v.slice_set(&v, 1, self.committed)?;
                    }
                }
                Storage::Host(layers) => {
                    let row = self.num_kv_heads * self.head_dim;
                    for layer in layers.iter_mut() {
                        for (i, &p) in rows.iter().enumerate() {
                            let (src, dst) =
                                ((self.committed + p) * row, (self.committed + i) * row);
                            layer.k.copy_within(src..src + row, dst);
                            layer.v.copy_within(src..src + row, dst);
                        }
                    }
                }
            }
        }
        self.committed += path.len();
        self.pending = kept;
        Ok(())
    }

    /// Drops every pending node.
    pub fn discard_pending(&mut self) {
        self.pending.clear();
    }

    /// Truncates the committed sequence to `committed_len` rows (and drops pending nodes).
    pub fn rollback(&mut self, committed_len: usize) -> Result<()> {
        if committed_len > self.committed {
            return Err(ModelError::InvalidInput(format!(
                "cannot roll back to {committed_len}: only {} rows are committed",
                self.committed
            )));
        }
        self.committed = committed_len;
        self.pending.clear();
        Ok(())
    }

    // ---- crate-internal API used by the decoder ----

    pub(crate) fn pending_nodes(&self) -> &[PendingNode] {
        &self.pending
    }

    pub(crate) fn push_pending(&mut self, nodes: impl IntoIterator<Item = PendingNode>) {
        self.pending.extend(nodes);
    }

    /// Marks `n` rows written after the committed prefix as committed (prefill).
    pub(crate) fn advance_committed(&mut self, n: usize) {
        debug_assert!(self.pending.is_empty());
        self.committed += n;
    }

    /// Makes room for `extra` more rows after the used ones.
    pub(crate) fn reserve(&mut self, extra: usize) -> Result<()> {
        let needed = self.used_len() + extra;
        if needed <= self.capacity {
            return Ok(());
        }
        let new_cap = needed.max(self.capacity * 2).max(MIN_CAPACITY);
        let used = self.used_len();
        let shape = (self.num_kv_heads, new_cap, self.head_dim);
        match &mut self.storage {
            Storage::Tensors(layers) => {
                for layer in layers.iter_mut() {
                    let k = Tensor::zeros(shape, self.dtype, &self.device)?;
                    let v = Tensor::zeros(shape, self.dtype, &self.device)?;
                    if let Some(old) = layer.as_ref()
                        && used > 0
                    {
                        k.slice_set(&old.k.narrow(1, 0, used)?.contiguous()?, 1, 0)?;
                        v.slice_set(&old.v.narrow(1, 0, used)?.contiguous()?, 1, 0)?;
                    }
                    *layer = Some(LayerKv { k, v });
                }
            }
            Storage::Host(layers) => {
                let len = new_cap * self.num_kv_heads * self.head_dim;
                for layer in layers.iter_mut() {
                    layer.k.resize(len, 0.0);
                    layer.v.resize(len, 0.0);
                }
            }
        }
        self.capacity = new_cap;
        Ok(())
    }

    /// Writes `k`, `v` (`[kv_heads, n, head_dim]`, contiguous) at row `offset` of `layer` and
    /// returns views of rows `[0, offset + n)`.
    pub(crate) fn write_and_view(
        &mut self,
        layer: usize,
        offset: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let n = k.dim(1)?;
        let Storage::Tensors(layers) = &self.storage else {
            return Err(
                candle_core::Error::Msg("host KV cache used by the candle backend".into()).into(),
            );
        };
        let kv = layers[layer]
            .as_ref()
            .ok_or_else(|| candle_core::Error::Msg("kv cache used before reserve".into()))?;
        kv.k.slice_set(k, 1, offset)?;
        kv.v.slice_set(v, 1, offset)?;
        Ok((
            kv.k.narrow(1, 0, offset + n)?,
            kv.v.narrow(1, 0, offset + n)?,
        ))
    }

    /// The host buffers of every layer (CPU backend), `None` for a tensor cache.
    pub(crate) fn host_layers(&self) -> Option<&[HostLayerKv]> {
        match &self.storage {
            Storage::Host(layers) => Some(layers),
            Storage::Tensors(_) => None,
        }
    }

    /// The per-layer host buffers, for writing new rows (CPU backend only).
    pub(crate) fn host_layers_mut(&mut self) -> Option<&mut [HostLayerKv]> {
        match &mut self.storage {
            Storage::Host(layers) => Some(layers),
            Storage::Tensors(_) => None,
        }
    }

    /// Whether the buffers are host vectors (CPU backend) rather than tensors.
    pub(crate) fn is_host(&self) -> bool {
        matches!(self.storage, Storage::Host(_))
    }

    /// The model dimensions this cache was made for (layers, kv heads, head dim).
    pub(crate) fn dims(&self) -> (usize, usize, usize) {
        (self.num_layers, self.num_kv_heads, self.head_dim)
    }
}
