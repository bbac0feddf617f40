//! Per-session key/value cache with a committed prefix and pending tree nodes.
//!
//! Each layer keeps one K and one V buffer of shape `[kv_heads, capacity, head_dim]`. Rows
//! `[0, committed)` hold the committed sequence; rows `[committed, committed + pending)` hold the
//! pending tree nodes in the order they were added. The capacity grows by doubling, so appending
//! is amortised O(new rows); attention reads a narrowed view of the buffer without copying.
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

/// Key/value cache of one session (see the module docs).
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<Option<LayerKv>>,
    num_kv_heads: usize,
    head_dim: usize,
    dtype: DType,
    device: Device,
    capacity: usize,
    committed: usize,
    pending: Vec<PendingNode>,
}

impl KvCache {
    /// An empty cache for a model with these dimensions.
    pub fn new(num_layers: usize, num_kv_heads: usize, head_dim: usize, device: &Device) -> Self {
        KvCache {
            layers: (0..num_layers).map(|_| None).collect(),
            num_kv_heads,
            head_dim,
            dtype: DType::F32,
            device: device.clone(),
            capacity: 0,
            committed: 0,
            pending: Vec::new(),
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
        self.layers.len() * per_layer
    }

    /// A deep copy (own buffers), e.g. to fork a session or to compare decoding strategies.
    pub fn fork(&self) -> Result<KvCache> {
        let layers = self
            .layers
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
            .collect::<Result<Vec<_>>>()?;
        Ok(KvCache {
            layers,
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
        let identity = path.iter().enumerate().all(|(i, &p)| i == p);
        if !identity && !path.is_empty() {
            let idx: Vec<u32> = path.iter().map(|&p| (self.committed + p) as u32).collect();
            let idx = Tensor::new(idx.as_slice(), &self.device)?;
            for layer in self.layers.iter_mut().flatten() {
                let k = layer.k.index_select(&idx, 1)?;
                let v = layer.v.index_select(&idx, 1)?;
                layer.k.slice_set(&k, 1, self.committed)?;
                layer.v.slice_set(&v, 1, self.committed)?;
            }
        }
        self.committed += path.len();
        self.pending.clear();
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
        for layer in self.layers.iter_mut() {
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
        let kv = self.layers[layer]
            .as_ref()
            .ok_or_else(|| candle_core::Error::Msg("kv cache used before reserve".into()))?;
        kv.k.slice_set(k, 1, offset)?;
        kv.v.slice_set(v, 1, offset)?;
        Ok((
            kv.k.narrow(1, 0, offset + n)?,
            kv.v.narrow(1, 0, offset + n)?,
        ))
    }

    /// The model dimensions this cache was made for (layers, kv heads, head dim).
    pub(crate) fn dims(&self) -> (usize, usize, usize) {
        (self.layers.len(), self.num_kv_heads, self.head_dim)
    }
}
