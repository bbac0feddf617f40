//! LLaVA models (`LlavaForConditionalGeneration`, `LlavaNextForConditionalGeneration`,
//! `LlavaOnevisionForConditionalGeneration`): loading, prefill with images, tree forward,
//! packed batches.
//!
//! References: transformers `models/llava/modeling_llava.py`, `models/llava_next/`,
//! `models/llava_onevision/`; Liu et al., "Improved Baselines with Visual Instruction Tuning"
//! (LLaVA-1.5, arXiv 2310.03744); LLaVA-NeXT (2024); Li et al., "LLaVA-OneVision" (arXiv
//! 2408.03326).

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use image::DynamicImage;
use specllava_prompt::ImageTokens;

use crate::anyres::pack;
use crate::backend::Backend;
use crate::config::LlavaConfig;
use crate::cpu::{CpuDecoder, LogitRows};
use crate::error::{ModelError, Result};
use crate::image::{ImageProcessor, Tiling};
use crate::kv::{KvCache, PendingNode};
use crate::llama::Decoder;
use crate::segment::{Segment, Visibility, window_start};
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
/// Names of the any-resolution models' `image_newline` vector in the two layouts.
const NEWLINE_NAMES: &[&str] = &["image_newline", "model.image_newline"];

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
    /// How many tokens an image becomes.
    image_tokens: ImageTokens,
    /// Any-resolution models' `image_newline` `[text_hidden]`, appended to every packed row.
    image_newline: Option<Tensor>,
    device: Device,
    /// The dtype of the weights, activations and KV (f32 on the CPU backend).
    dtype: DType,
    /// See [`Llava::vision_fingerprint`].
    vision_fingerprint: String,
}

/// One image ready for the vision tower: its preprocessed tiles and its size.
#[derive(Debug, Clone)]
pub struct ImagePixels {
    /// `[tiles, 3, H, W]` preprocessed pixels (one tile for LLaVA-1.5).
    pub tiles: Tensor,
    /// The original image's `(height, width)`, which any-resolution packing needs.
    pub image_size: (usize, usize),
}

impl ImagePixels {
    /// A LLaVA-1.5 image: one preprocessed `[3, H, W]` tile.
    pub fn single(pixels: Tensor) -> Result<Self> {
        let (_, h, w) = pixels.dims3()?;
        Ok(ImagePixels {
            tiles: pixels.unsqueeze(0)?,
            image_size: (h, w),
        })
    }
}

/// One image's vision features: the tower's selected output for each of its tiles, before the
/// projector, `[tiles * tile_tokens, vision_feature_dim]`, and the image's size. Models with
/// the same [`Llava::vision_fingerprint`] compute the same bits for the same image.
#[derive(Debug, Clone)]
pub struct VisionFeatures {
    /// `[tiles * tile_tokens, vision_feature_dim]`.
    pub rows: Tensor,
    /// The original image's `(height, width)`.
    pub image_size: (usize, usize),
}

/// The images of a prefill, one per image placeholder: their pixels, or their vision features
/// computed by [`Llava::vision_features`] of a model with the same
/// [`Llava::vision_fingerprint`] (what the projector takes; the result is the same bits either
/// way).
#[derive(Debug, Clone)]
pub enum PrefillImages {
    /// Preprocessed pixels.
    Pixels(Vec<ImagePixels>),
    /// Vision features.
    VisionFeatures(Vec<VisionFeatures>),
}

impl PrefillImages {
    /// No images.
    pub fn none() -> Self {
        PrefillImages::Pixels(Vec::new())
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        match self {
            PrefillImages::Pixels(v) => v.len(),
            PrefillImages::VisionFeatures(v) => v.len(),
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Each image's `(height, width)`.
    pub fn sizes(&self) -> Vec<(usize, usize)> {
        match self {
            PrefillImages::Pixels(v) => v.iter().map(|p| p.image_size).collect(),
            PrefillImages::VisionFeatures(v) => v.iter().map(|f| f.image_size).collect(),
        }
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
                "{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{device_kind}",
                cfg.architecture,
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
        let image_tokens = cfg.image_tokens();
        let image_newline = match &cfg.anyres {
            None => None,
            Some(anyres) => {
                if let Some(p) = &image_processor.grid_pinpoints
                    && *p != anyres.pinpoints
                {
                    return Err(ModelError::Config(format!(
                        "preprocessor_config.json's image_grid_pinpoints {p:?} differ from config.json's {:?}",
                        anyres.pinpoints
                    )));
                }
                let name = NEWLINE_NAMES
                    .iter()
                    .find(|n| w.contains(n))
                    .ok_or_else(|| ModelError::MissingTensor {
                        name: NEWLINE_NAMES.join(" or "),
                        dir: w.dir().to_path_buf(),
                    })?;
                Some(w.get(name, &[cfg.text.hidden_size])?)
            }
        };
        Ok(Llava {
            cfg,
            vision,
            projector,
            decoder,
            image_processor,
            image_tokens,
            image_newline,
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

    /// How many tokens an image becomes.
    pub fn image_tokens(&self) -> &ImageTokens {
        &self.image_tokens
    }

    /// Tokens of a `(height, width)` image in a prompt of `images_in_prompt` images.
    pub fn image_token_count(&self, image_size: (usize, usize), images_in_prompt: usize) -> usize {
        self.image_tokens
            .count(image_size.0, image_size.1, images_in_prompt)
    }

    /// Feature rows of one tile (the whole image for LLaVA-1.5).
    pub fn tile_tokens(&self) -> usize {
        self.cfg.tile_tokens()
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

    /// Preprocesses a decoded image for a prompt of `images_in_prompt` images: one tile
    /// (LLaVA-1.5), the any-resolution tiles, or (OneVision, several images) one padded tile.
    pub fn preprocess(&self, img: &DynamicImage, images_in_prompt: usize) -> Result<ImagePixels> {
        let tiling = match &self.image_tokens {
            ImageTokens::Fixed(_) => Tiling::Single,
            ImageTokens::AnyRes(a) if a.tiles_image(images_in_prompt) => Tiling::AnyRes(a),
            ImageTokens::AnyRes(_) => Tiling::PadToSquare,
        };
        Ok(ImagePixels {
            tiles: self
                .image_processor
                .preprocess_tiles(img, tiling, &self.device)?,
            image_size: (img.height() as usize, img.width() as usize),
        })
    }

    /// Vision features of each image (see [`VisionFeatures`]): the tower's selected output
    /// per tile, before the projector. All tiles of one call run as one batch.
    pub fn vision_features(&self, images: &[ImagePixels]) -> Result<Vec<VisionFeatures>> {
        if images.is_empty() {
            return Ok(Vec::new());
        }
        let feats = self.selected_features(images)?; // [tiles, tile_tokens, F]
        let mut out = Vec::with_capacity(images.len());
        let mut start = 0;
        for img in images {
            let n = img.tiles.dim(0)?;
            let rows = feats.narrow(0, start, n)?;
            let (t, p, f) = rows.dims3()?;
            out.push(VisionFeatures {
                rows: rows.reshape((t * p, f))?,
                image_size: img.image_size,
            });
            start += n;
        }
        Ok(out)
    }

    /// Each image's token rows `[n_i, text_hidden]`: projected, and packed for
    /// any-resolution models.
    pub fn image_features(&self, images: &[ImagePixels]) -> Result<Vec<Tensor>> {
        let feats = self.vision_features(images)?;
        self.project_vision_features(&feats)
    }

    /// Each image's token rows from its vision features (checked against this model).
    fn project_vision_features(&self, features: &[VisionFeatures]) -> Result<Vec<Tensor>> {
        if features.is_empty() {
            return Ok(Vec::new());
        }
        let (p, dim) = (self.tile_tokens(), self.vision_feature_dim());
        let mut batch = Vec::with_capacity(features.len());
        let mut tiles = Vec::with_capacity(features.len());
        for (i, f) in features.iter().enumerate() {
            let (rows, d) = f.rows.dims2()?;
            if d != dim || rows == 0 || !rows.is_multiple_of(p) {
                return Err(ModelError::InvalidInput(format!(
                    "vision features of image {i} have shape {:?}, expected [tiles * {p}, {dim}]",
                    f.rows.dims()
                )));
            }
            if self.cfg.anyres.is_none() && rows != p {
                return Err(ModelError::InvalidInput(format!(
                    "vision features of image {i} have {rows} rows, this model takes {p}"
                )));
            }
            tiles.push(rows / p);
            batch.push(f.rows.to_device(&self.device)?.to_dtype(self.dtype)?);
        }
        let all = Tensor::cat(&batch, 0)?.unsqueeze(0)?;
        let projected = self.projector.forward(&all)?.squeeze(0)?; // [rows, hidden]
        let hidden = self.cfg.text.hidden_size;
        let mut out = Vec::with_capacity(features.len());
        let mut start = 0;
        for (f, &t) in features.iter().zip(&tiles) {
            let rows = projected.narrow(0, start, t * p)?;
            start += t * p;
            out.push(match (&self.image_tokens, &self.image_newline) {
                (ImageTokens::AnyRes(a), Some(newline)) => {
                    pack(&rows.reshape((t, p, hidden))?, f.image_size, a, newline)?
                }
                _ => rows,
            });
        }
        Ok(out)
    }

    /// The tower's selected output `[tiles, tile_tokens, F]` for all images' tiles.
    fn selected_features(&self, images: &[ImagePixels]) -> Result<Tensor> {
        let mut batch = Vec::with_capacity(images.len());
        for (i, img) in images.iter().enumerate() {
            if img.tiles.rank() != 4 {
                return Err(ModelError::InvalidInput(format!(
                    "image {i} has shape {:?}, expected [tiles, 3, H, W]",
                    img.tiles.dims()
                )));
            }
            batch.push(img.tiles.to_device(&self.device)?.to_dtype(self.dtype)?);
        }
        let pixels = Tensor::cat(&batch, 0)?;
        let feats = self.vision.forward(&pixels)?;
        Ok(select_features(
            &feats,
            self.cfg.vision_feature_select_strategy,
        )?)
    }

    /// Tokens of an image given as `tiles` tiles (its pixels' or vision features' count):
    /// one tile is the whole image (plus a newline row for any-resolution models), several
    /// are packed.
    pub fn feature_token_count(&self, tiles: usize, image_size: (usize, usize)) -> usize {
        match &self.image_tokens {
            ImageTokens::Fixed(n) => *n,
            ImageTokens::AnyRes(a) if tiles == 1 => a.base_tokens + 1,
            ImageTokens::AnyRes(a) => a.layout(image_size.0, image_size.1).tokens(a.base_tokens),
        }
    }

    /// Each image's token count (its KV rows), from its tiles and size.
    pub fn image_rows(&self, images: &PrefillImages) -> Result<Vec<usize>> {
        let tiles: Vec<usize> = match images {
            PrefillImages::Pixels(px) => px
                .iter()
                .map(|p| p.tiles.dim(0))
                .collect::<candle_core::Result<_>>()?,
            PrefillImages::VisionFeatures(f) => {
                let p = self.tile_tokens().max(1);
                f.iter()
                    .map(|f| Ok(f.rows.dim(0)? / p))
                    .collect::<Result<_>>()?
            }
        };
        Ok(tiles
            .iter()
            .zip(images.sizes())
            .map(|(&t, size)| self.feature_token_count(t, size))
            .collect())
    }

    /// Splits `input_ids` at image placeholders: a run of image ids is one image when its
    /// length is 1, else that many images already expanded (as HF does), their `counts`
    /// summing to the run's length.
    fn split_prompt<'a>(&self, ids: &'a [u32], counts: &[usize]) -> Result<Vec<Piece<'a>>> {
        let img = self.cfg.image_token_id;
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
            if run == 1 {
                pieces.push(Piece::Image(next_image));
                next_image += 1;
                continue;
            }
            let mut covered = 0;
            while covered < run {
                let Some(&n) = counts.get(next_image) else {
                    return Err(ModelError::InvalidInput(format!(
                        "a run of {run} image tokens is longer than the remaining images' features"
                    )));
                };
                covered += n;
                pieces.push(Piece::Image(next_image));
                next_image += 1;
            }
            if covered != run {
                return Err(ModelError::InvalidInput(format!(
                    "a run of {run} image tokens is neither one placeholder nor the images' {covered} expanded tokens"
                )));
            }
        }
        Ok(pieces)
    }

    /// Appends `input_ids` (with images) to the committed part of `kv` with causal attention
    /// and returns the logits of the last position, f32 `[vocab]`.
    ///
    /// Each image placeholder (one `<image>` id, or a run of exactly the image's tokens) is
    /// replaced by the features of the next image in `images` (LLaVA-1.5 `[3, H, W]`
    /// preprocessed pixels, see [`ImagePixels::single`]). `kv` must have no pending nodes.
    pub fn prefill(
        &self,
        kv: &mut KvCache,
        input_ids: &[u32],
        images: &[Tensor],
    ) -> Result<Tensor> {
        let images = images
            .iter()
            .map(|t| ImagePixels::single(t.clone()))
            .collect::<Result<_>>()?;
        self.prefill_images(kv, input_ids, &PrefillImages::Pixels(images))
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
        let pieces = self.split_prompt(input_ids, &self.image_rows(images)?)?;
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
                Piece::Image(i) => features[*i].to_dtype(self.dtype)?,
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
            visible: Visibility::causal(c, t, self.cfg.text.sliding_window),
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
            // Under a sliding window the node sees its last `window - 1` ancestors at most
            // (ancestor k levels up sits k positions back).
            let window = self.cfg.text.sliding_window;
            let max_ancestors = window.map_or(usize::MAX, |w| w - 1);
            ancestors.clear();
            let mut a = parent;
            while let Some(q) = a
                && ancestors.len() < max_ancestors
            {
                ancestors.push(c + q);
                a = node(q, &nodes).parent;
            }
            ancestors.reverse();
            ancestors.push(c + me);
            visible.push_row(
                window_start(c + depth, window),
                c,
                ancestors.iter().copied(),
            );
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
