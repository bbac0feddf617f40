//! `LlavaForConditionalGeneration`: loading, prefill with images, tree forward, packed batches.
//!
//! Reference: transformers `models/llava/modeling_llava.py`; Liu et al., "Improved Baselines with
//! Visual Instruction Tuning" (LLaVA-1.5, arXiv 2310.03744).

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::backend::Backend;
use crate::config::LlavaConfig;
use crate::cpu::{CpuDecoder, LogitRows};
use crate::error::{ModelError, Result};
use crate::image::ImageProcessor;
use crate::kv::{KvCache, PendingNode};
use crate::llama::Decoder;
use crate::segment::{Segment, Visibility};
use crate::vision::{Projector, VisionTower, select_features};
use crate::weights::Weights;
use specllava_prompt::Fnv1a64;

/// Tensor-name prefixes of the two checkpoint layouts (llava-hf's and transformers 5's).
const LM_PREFIXES: &[&str] = &["language_model.model.", "model.language_model."];
const LM_HEAD_NAMES: &[&str] = &["language_model.lm_head.", "lm_head."];
const VISION_PREFIXES: &[&str] = &[
    "vision_tower.vision_model.",
    "model.vision_tower.vision_model.",
    "model.vision_tower.",
    "vision_tower.",
];
const PROJECTOR_PREFIXES: &[&str] = &["multi_modal_projector.", "model.multi_modal_projector."];

/// The decoder of one backend.
enum DecoderImpl {
    Candle(Decoder),
    Cpu(CpuDecoder),
}

/// A loaded LLaVA model: weights plus resolved configuration. `Send + Sync`; all per-session
/// state lives in [`KvCache`].
pub struct Llava {
    cfg: LlavaConfig,
    vision: VisionTower,
    projector: Projector,
    decoder: DecoderImpl,
    image_processor: ImageProcessor,
    device: Device,
    /// The dtype of the weights, activations and KV (f32 on the CPU backend).
    dtype: DType,
    /// See [`Llava::vision_fingerprint`].
    vision_fingerprint: String,
}

/// The images of a prefill, one per image placeholder: preprocessed pixels `[3, H, W]`, or
/// their vision features `[num_image_tokens, vision_feature_dim]` computed by
/// [`Llava::vision_features`] of a model with the same [`Llava::vision_fingerprint`] (what
/// the projector takes; the result is the same bits either way).
#[derive(Debug, Clone)]
pub enum PrefillImages {
    /// Preprocessed pixels.
    Pixels(Vec<Tensor>),
    /// Vision features.
    VisionFeatures(Vec<Tensor>),
}

impl PrefillImages {
    /// No images.
    pub fn none() -> Self {
        PrefillImages::Pixels(Vec::new())
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        match self {
            PrefillImages::Pixels(v) | PrefillImages::VisionFeatures(v) => v.len(),
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One session's share of a packed [`Llava::forward_batch`] call.
pub struct TreeBatchItem<'a> {
    /// The session's cache; the nodes are appended to its pending part.
    pub kv: &'a mut KvCache,
    /// Node tokens.
    pub tokens: &'a [u32],
    /// Node parents (see [`Llava::forward_tree`]).
    pub parents: &'a [i32],
}

/// A prompt split into text runs and image placeholders.
enum Piece<'a> {
    Text(&'a [u32]),
    Image(usize),
}

impl Llava {
    /// Loads a Hugging Face LLaVA checkpoint directory: `config.json`, `model.safetensors` (or
    /// shards with `model.safetensors.index.json`), `preprocessor_config.json` and, if present,
    /// `generation_config.json`. Errors name the missing or inconsistent file or tensor.
    /// Uses [`Backend::for_device`].
    pub fn load(dir: &Path, device: &Device) -> Result<Llava> {
        Self::load_with_backend(dir, device, Backend::for_device(device))
    }

    /// [`Llava::load`] with an explicit backend ([`Backend::Cpu`] needs the CPU device).
    pub fn load_with_backend(dir: &Path, device: &Device, backend: Backend) -> Result<Llava> {
        Self::load_with(dir, device, backend, None)
    }

    /// [`Llava::load`] with an explicit backend and dtype. `dtype` `None`: f32 on the CPU,
    /// the checkpoint's dtype (f16 / bf16 / f32, see [`Weights::load_as`]) on other devices.
    /// The CPU backend computes in f32 (its weights stay packed in the checkpoint's
    /// precision); f16 / bf16 need [`Backend::Candle`].
    pub fn load_with(
        dir: &Path,
        device: &Device,
        backend: Backend,
        dtype: Option<DType>,
    ) -> Result<Llava> {
        let dtype = match (backend, dtype) {
            (Backend::Cpu, Some(d)) if d != DType::F32 => {
                return Err(ModelError::Config(format!(
                    "the CPU backend computes in f32, not {d:?} (use the candle backend)"
                )));
            }
            (Backend::Cpu, _) => Some(DType::F32),
            (Backend::Candle, None) if device.is_cpu() => Some(DType::F32),
            (Backend::Candle, d) => d,
        };
        let cfg = LlavaConfig::from_dir(dir)?;
        let image_processor = ImageProcessor::from_file(dir.join("preprocessor_config.json"))?;
        let w = Weights::load_as(dir, device, dtype)?;
        Self::from_weights(cfg, image_processor, &w, device, backend)
    }

    /// Builds the model from already-loaded weights (either layout).
    pub fn from_weights(
        cfg: LlavaConfig,
        image_processor: ImageProcessor,
        w: &Weights,
        device: &Device,
        backend: Backend,
    ) -> Result<Llava> {
        if backend == Backend::Cpu && !device.is_cpu() {
            return Err(ModelError::Config(format!(
                "the CPU backend needs the CPU device, not {device:?}"
            )));
        }
        if let Some((h, wd)) = image_processor.crop
            && (h != cfg.vision.image_size || wd != cfg.vision.image_size)
        {
            return Err(ModelError::Config(format!(
                "preprocessor_config.json crops to {h}x{wd} but the vision tower takes {0}x{0} images",
                cfg.vision.image_size
            )));
        }
        let lm = w.pp(w.find_prefix(LM_PREFIXES, "embed_tokens.weight")?);
        let dtype = lm
            .get(
                "embed_tokens.weight",
                &[cfg.text.vocab_size, cfg.text.hidden_size],
            )?
            .dtype();
        if backend == Backend::Cpu && dtype != DType::F32 {
            return Err(ModelError::Config(format!(
                "the CPU backend needs f32 weights (converted at load), not {dtype:?}"
            )));
        }
        let lm_head_name = if cfg.tie_word_embeddings {
            None
        } else {
            Some(format!("{}weight", w.find_prefix(LM_HEAD_NAMES, "weight")?))
        };
        let decoder = match backend {
            Backend::Candle => {
                let lm_head = lm_head_name
                    .map(|n| w.get(&n, &[cfg.text.vocab_size, cfg.text.hidden_size]))
                    .transpose()?;
                DecoderImpl::Candle(Decoder::load(&lm, lm_head, &cfg.text, device)?)
            }
            Backend::Cpu => DecoderImpl::Cpu(CpuDecoder::load(
                &lm,
                lm_head_name.map(|n| (w, n)),
                &cfg.text,
            )?),
        };
        let vision_weights =
            w.pp(w.find_prefix(VISION_PREFIXES, "embeddings.patch_embedding.weight")?);
        let vision = VisionTower::load(&vision_weights, &cfg, backend)?;
        // Everything that decides a vision feature's bits: the tower's weights as loaded,
        // its configuration, the feature layers and select strategy, the preprocessing, the
        // kernels (backend) and the device they run on.
        let device_kind = match device {
            Device::Cpu => "cpu",
            Device::Cuda(_) => "cuda",
            Device::Metal(_) => "metal",
        };
        let mut h = Fnv1a64::default();
        h.write(
            format!(
                "{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{device_kind}",
                cfg.vision,
                cfg.vision_feature_layers,
                cfg.vision_feature_select_strategy,
                image_processor,
                dtype,
                backend,
            )
            .as_bytes(),
        );
        vision_weights.hash_into(&mut h)?;
        let vision_fingerprint = format!("fnv1a64:{:016x}", h.finish());
        let projector = Projector::load(
            &w.pp(w.find_prefix(PROJECTOR_PREFIXES, "linear_1.weight")?),
            &cfg,
            backend,
        )?;
        Ok(Llava {
            cfg,
            vision,
            projector,
            decoder,
            image_processor,
            device: device.clone(),
            dtype,
            vision_fingerprint,
        })
    }

    /// The resolved configuration.
    pub fn config(&self) -> &LlavaConfig {
        &self.cfg
    }

    /// The backend running the decoder.
    pub fn backend(&self) -> Backend {
        match self.decoder {
            DecoderImpl::Candle(_) => Backend::Candle,
            DecoderImpl::Cpu(_) => Backend::Cpu,
        }
    }

    /// Bytes of decoder weights one forward reads, at the precision they are stored in (the
    /// memory roofline's numerator); `None` for the candle backend.
    pub fn decoder_weight_bytes(&self) -> Option<usize> {
        match &self.decoder {
            DecoderImpl::Cpu(d) => Some(d.weight_bytes()),
            DecoderImpl::Candle(_) => None,
        }
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype of the weights, activations and KV cache (logits are always f32).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Image features per image (after the select strategy).
    pub fn num_image_tokens(&self) -> usize {
        self.cfg.num_image_tokens()
    }

    /// The image preprocessor from `preprocessor_config.json`.
    pub fn image_processor(&self) -> &ImageProcessor {
        &self.image_processor
    }

    /// A new, empty KV cache for one session.
    pub fn new_kv(&self) -> KvCache {
        let t = &self.cfg.text;
        match self.decoder {
            DecoderImpl::Cpu(_) => {
                KvCache::new_host(t.num_hidden_layers, t.num_key_value_heads, t.head_dim)
            }
            DecoderImpl::Candle(_) => KvCache::new(
                t.num_hidden_layers,
                t.num_key_value_heads,
                t.head_dim,
                self.dtype,
                &self.device,
            ),
        }
    }

    /// Bytes of KV cache one token occupies (for budgets).
    pub fn kv_bytes_per_token(&self) -> usize {
        let t = &self.cfg.text;
        2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * self.dtype.size_in_bytes()
    }

    fn check_kv(&self, kv: &KvCache) -> Result<()> {
        let t = &self.cfg.text;
        if kv.dims() != (t.num_hidden_layers, t.num_key_value_heads, t.head_dim)
            || kv.is_host() != matches!(self.decoder, DecoderImpl::Cpu(_))
        {
            return Err(ModelError::InvalidInput(
                "KV cache was created by a model with different dimensions".into(),
            ));
        }
        Ok(())
    }

    /// A fingerprint of everything that decides [`Llava::vision_features`]' bits: models with
    /// the same one compute the same features for the same image.
    pub fn vision_fingerprint(&self) -> &str {
        &self.vision_fingerprint
    }

    /// Width of a vision feature row (the tower's hidden size times the feature layers).
    pub fn vision_feature_dim(&self) -> usize {
        self.cfg.vision.hidden_size * self.cfg.vision_feature_layers.len().max(1)
    }

    /// Vision features `[num_image_tokens, vision_feature_dim]` for each preprocessed image
    /// `[3, H, W]`: the tower's output with the select strategy applied, before the
    /// projector. The images of one call run as one batch, as in [`Llava::prefill`].
    pub fn vision_features(&self, images: &[Tensor]) -> Result<Vec<Tensor>> {
        if images.is_empty() {
            return Ok(Vec::new());
        }
        let feats = self.selected_features(images)?;
        Ok((0..images.len())
            .map(|i| feats.get(i))
            .collect::<candle_core::Result<_>>()?)
    }

    /// Projected features `[N, text_hidden]` for each preprocessed image `[3, H, W]`.
    pub fn image_features(&self, images: &[Tensor]) -> Result<Vec<Tensor>> {
        if images.is_empty() {
            return Ok(Vec::new());
        }
        let feats = self.selected_features(images)?;
        self.project(&feats, images.len())
    }

    /// Projected features `[N, text_hidden]` for each image's vision features.
    fn project_vision_features(&self, features: &[Tensor]) -> Result<Vec<Tensor>> {
        if features.is_empty() {
            return Ok(Vec::new());
        }
        let (rows, dim) = (self.num_image_tokens(), self.vision_feature_dim());
        let mut batch = Vec::with_capacity(features.len());
        for (i, f) in features.iter().enumerate() {
            if f.dims() != [rows, dim] {
                return Err(ModelError::InvalidInput(format!(
                    "vision features of image {i} have shape {:?}, expected [{rows}, {dim}]",
                    f.dims()
                )));
            }
            batch.push(f.to_device(&self.device)?.to_dtype(self.dtype)?);
        }
        self.project(&Tensor::stack(&batch, 0)?, features.len())
    }

    /// The projector over `[B, N, F]` selected features, split per image.
    fn project(&self, feats: &Tensor, n: usize) -> Result<Vec<Tensor>> {
        let proj = self.projector.forward(feats)?; // [B, N, hidden]
        Ok((0..n)
            .map(|i| proj.get(i))
            .collect::<candle_core::Result<_>>()?)
    }

    /// The tower's selected output `[B, N, F]` for preprocessed images `[3, H, W]`.
    fn selected_features(&self, images: &[Tensor]) -> Result<Tensor> {
        let mut batch = Vec::with_capacity(images.len());
        for (i, img) in images.iter().enumerate() {
            if img.rank() != 3 {
                return Err(ModelError::InvalidInput(format!(
                    "image {i} has shape {:?}, expected [3, H, W]",
                    img.dims()
                )));
            }
            batch.push(img.to_device(&self.device)?.to_dtype(self.dtype)?);
        }
        let pixels = Tensor::stack(&batch, 0)?;
        let feats = self.vision.forward(&pixels)?;
        Ok(select_features(
            &feats,
            self.cfg.vision_feature_select_strategy,
        )?)
    }

    /// Splits `input_ids` at image placeholders: a run of image ids is one image when its
    /// length is 1, else `len / num_image_tokens` images (already expanded, as HF does).
    fn split_prompt<'a>(&self, ids: &'a [u32]) -> Result<Vec<Piece<'a>>> {
        let img = self.cfg.image_token_id;
        let n_img = self.num_image_tokens();
        let mut pieces = Vec::new();
        let mut next_image = 0;
        let mut i = 0;
        while i < ids.len() {
            let start = i;
            let is_img = ids[i] == img;
            while i < ids.len() && (ids[i] == img) == is_img {
                i += 1;
            }
            if !is_img {
                pieces.push(Piece::Text(&ids[start..i]));
                continue;
            }
            let run = i - start;
            let count = if run == 1 {
                1
            } else if run.is_multiple_of(n_img) {
                run / n_img
            } else {
                return Err(ModelError::InvalidInput(format!(
                    "a run of {run} image tokens is neither one placeholder nor a multiple of {n_img} image features"
                )));
            };
            for _ in 0..count {
                pieces.push(Piece::Image(next_image));
                next_image += 1;
            }
        }
        Ok(pieces)
    }

    /// Appends `input_ids` (with images) to the committed part of `kv` with causal attention
    /// and returns the logits of the last position, f32 `[vocab]`.
    ///
    /// Each image placeholder (one `<image>` id, or a run of exactly `num_image_tokens` ids)
    /// is replaced by the projected features of the next image in `images` (`[3, H, W]`
    /// preprocessed pixels). `kv` must have no pending nodes.
    pub fn prefill(
        &self,
        kv: &mut KvCache,
        input_ids: &[u32],
        images: &[Tensor],
    ) -> Result<Tensor> {
        self.prefill_images(kv, input_ids, &PrefillImages::Pixels(images.to_vec()))
    }

    /// [`Llava::prefill`] with pixels or vision features.
    pub fn prefill_images(
        &self,
        kv: &mut KvCache,
        input_ids: &[u32],
        images: &PrefillImages,
    ) -> Result<Tensor> {
        self.check_kv(kv)?;
        if kv.pending_len() != 0 {
            return Err(ModelError::InvalidInput(format!(
                "prefill requires no pending tree nodes ({} pending)",
                kv.pending_len()
            )));
        }
        if input_ids.is_empty() {
            return Err(ModelError::InvalidInput("empty prompt".into()));
        }
        let pieces = self.split_prompt(input_ids)?;
        let n_placeholders = pieces
            .iter()
            .filter(|p| matches!(p, Piece::Image(_)))
            .count();
        if n_placeholders != images.len() {
            return Err(ModelError::InvalidInput(format!(
                "prompt has {n_placeholders} image placeholders but {} images were given",
                images.len()
            )));
        }
        let features = match images {
            PrefillImages::Pixels(px) => self.image_features(px)?,
            PrefillImages::VisionFeatures(f) => self.project_vision_features(f)?,
        };
        let mut parts = Vec::with_capacity(pieces.len());
        for p in &pieces {
            parts.push(match p {
                Piece::Text(ids) => self.embed(ids)?,
                Piece::Image(i) => features[*i].clone(),
            });
        }
        let x = if parts.len() == 1 {
            parts.pop().expect("one part")
        } else {
            Tensor::cat(&parts, 0)?
        };
        let t = x.dim(0)?;
        let c = kv.committed_len();
        let seg = Segment {
            n: t,
            positions: (c..c + t).map(|p| p as u32).collect(),
            visible: Visibility::causal(c, t),
        };
        kv.reserve(t)?;
        let logits = self.run_decoder(
            x,
            std::slice::from_ref(&seg),
            &mut [&mut *kv],
            LogitRows::Last,
        )?;
        kv.advance_committed(t);
        Ok(logits.squeeze(0)?)
    }

    /// Token embeddings `[n, hidden]`; ids must be in the vocabulary.
    fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        match &self.decoder {
            DecoderImpl::Candle(d) => d.embed(ids),
            DecoderImpl::Cpu(d) => {
                if let Some(&id) = ids.iter().find(|&&id| id as usize >= self.cfg.vocab_size) {
                    return Err(ModelError::UnknownToken {
                        id,
                        vocab_size: self.cfg.vocab_size,
                    });
                }
                let h = self.cfg.text.hidden_size;
                Ok(Tensor::from_vec(
                    d.embed(ids),
                    (ids.len(), h),
                    &self.device,
                )?)
            }
        }
    }

    /// Runs the decoder over `x` (the rows of all segments) and returns the logits of `rows`,
    /// `[rows, vocab]`.
    fn run_decoder(
        &self,
        x: Tensor,
        segments: &[Segment],
        kvs: &mut [&mut KvCache],
        rows: LogitRows,
    ) -> Result<Tensor> {
        match &self.decoder {
            DecoderImpl::Candle(d) => {
                let hidden = d.forward(x, segments, kvs)?;
                let hidden = match rows {
                    LogitRows::All => hidden,
                    LogitRows::Last => hidden.narrow(0, hidden.dim(0)? - 1, 1)?,
                };
                d.logits(&hidden)
            }
            DecoderImpl::Cpu(d) => {
                let x = x.flatten_all()?.to_vec1::<f32>()?;
                let logits = d.forward(x, segments, kvs, rows)?;
                let n = logits.len() / self.cfg.vocab_size;
                Ok(Tensor::from_vec(
                    logits,
                    (n, self.cfg.vocab_size),
                    &self.device,
                )?)
            }
        }
    }

    /// Tree forward: appends the nodes to the pending part of `kv` and returns their logits,
    /// f32 `[n, vocab]`.
    ///
    /// `parents[i] = -1` attaches node `i` to the end of the committed prefix; otherwise it is
    /// an index into `kv`'s pending nodes (those added since the last commit first, then this
    /// call's nodes in order; a parent precedes its child). Node `i` attends to the committed
    /// prefix, its ancestors and itself, at position `committed_len + depth`.
    pub fn forward_tree(
        &self,
        kv: &mut KvCache,
        tokens: &[u32],
        parents: &[i32],
    ) -> Result<Tensor> {
        let mut items = [TreeBatchItem {
            kv,
            tokens,
            parents,
        }];
        Ok(self.forward_batch(&mut items)?.pop().expect("one item"))
    }

    /// Packed batch of several sessions' trees in one call: embeddings, every linear layer and
    /// the LM head run over the concatenation of all nodes; attention runs per session over its
    /// own KV. Returns one `[n_i, vocab]` logits tensor per item. On error no cache is changed.
    pub fn forward_batch(&self, items: &mut [TreeBatchItem<'_>]) -> Result<Vec<Tensor>> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let mut segments = Vec::with_capacity(items.len());
        let mut new_nodes = Vec::with_capacity(items.len());
        let mut all_tokens = Vec::new();
        for (idx, item) in items.iter().enumerate() {
            self.check_kv(item.kv)?;
            let (seg, nodes) = self
                .plan_tree(item.kv, item.tokens, item.parents)
                .map_err(|e| match e {
                    ModelError::InvalidTree(m) if items.len() > 1 => {
                        ModelError::InvalidTree(format!("batch item {idx}: {m}"))
                    }
                    e => e,
                })?;
            segments.push(seg);
            new_nodes.push(nodes);
            all_tokens.extend_from_slice(item.tokens);
        }
        let x = self.embed(&all_tokens)?;
        for item in items.iter_mut() {
            item.kv.reserve(item.tokens.len())?;
        }
        let mut kvs: Vec<&mut KvCache> = items.iter_mut().map(|it| &mut *it.kv).collect();
        let logits = self.run_decoder(x, &segments, &mut kvs, LogitRows::All)?;
        let mut out = Vec::with_capacity(segments.len());
        let mut start = 0;
        for ((kv, seg), nodes) in kvs.iter_mut().zip(&segments).zip(new_nodes) {
            kv.push_pending(nodes);
            out.push(if segments.len() == 1 {
                logits.clone()
            } else {
                logits.narrow(0, start, seg.n)?
            });
            start += seg.n;
        }
        Ok(out)
    }

    /// Validates a tree against `kv` and builds its segment (positions, mask) and the pending
    /// bookkeeping of its nodes.
    fn plan_tree(
        &self,
        kv: &KvCache,
        tokens: &[u32],
        parents: &[i32],
    ) -> Result<(Segment, Vec<PendingNode>)> {
        let n = tokens.len();
        if n == 0 {
            return Err(ModelError::InvalidTree("no nodes".into()));
        }
        if parents.len() != n {
            return Err(ModelError::InvalidTree(format!(
                "{n} tokens but {} parents",
                parents.len()
            )));
        }
        if let Some(&id) = tokens
            .iter()
            .find(|&&id| id as usize >= self.cfg.vocab_size)
        {
            return Err(ModelError::UnknownToken {
                id,
                vocab_size: self.cfg.vocab_size,
            });
        }
        let existing = kv.pending_nodes();
        let p0 = existing.len();
        let c = kv.committed_len();
        let mut nodes: Vec<PendingNode> = Vec::with_capacity(n);
        let node = |j: usize, nodes: &Vec<PendingNode>| -> PendingNode {
            if j < p0 {
                existing[j].clone()
            } else {
                nodes[j - p0].clone()
            }
        };
        let mut visible = Visibility::default();
        let mut positions = Vec::with_capacity(n);
        let mut ancestors = Vec::new();
        for (i, &p) in parents.iter().enumerate() {
            let me = p0 + i;
            let parent = if p == -1 {
                None
            } else if p >= 0 && (p as usize) < me {
                Some(p as usize)
            } else {
                return Err(ModelError::InvalidTree(format!(
                    "node {i}: parent {p} must be -1 or a pending node before it (< {me})"
                )));
            };
            let depth = parent.map_or(0, |q| node(q, &nodes).depth + 1);
            ancestors.clear();
            let mut a = parent;
            while let Some(q) = a {
                ancestors.push(c + q);
                a = node(q, &nodes).parent;
            }
            ancestors.reverse();
            ancestors.push(c + me);
            visible.push_row(c, ancestors.iter().copied());
            positions.push((c + depth) as u32);
            nodes.push(PendingNode { parent, depth });
        }
        Ok((
            Segment {
                n,
                positions,
                visible,
            },
            nodes,
        ))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn model_is_shareable_and_caches_are_sendable() {
        fn send_sync<T: Send + Sync>() {}
        fn send<T: Send>() {}
        send_sync::<super::Llava>();
        send::<super::KvCache>();
    }
}
