//! A model service's vision encoder: images decoded, preprocessed and run through the vision
//! tower off the async runtime, one tower run at a time, with an encoder cache in front.
//!
//! The cache holds the features of recent image lists, keyed by the SHA-256 of their bytes,
//! and computes each list once however many calls ask for it at the same time (single
//! flight): `Target.EncodeImages` and an `OpenSession` with the same images share one tower
//! run. The orchestrator relies on it to start a turn's draft without delaying its target:
//! it asks the target for the features the draft prefills from while the target's own
//! `OpenSession` (with the images) is under way, and whichever arrives second waits for the
//! run the other started. Repeated images (a conversation re-prefilled after an eviction,
//! many users sending one picture) skip the tower. Bounded in bytes, the least recently used
//! list out first; failures are not cached.

use bytes::Bytes;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::Tensor;
use sha2::{Digest, Sha256};
use specllava_model::{ImageLimits, ImagePixels, ImageTokens, Llava, VisionFeatures};
use tokio::sync::{OnceCell, Semaphore};

use crate::worker::WorkerError;

/// Why images could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// An image could not be decoded or is outside the limits (the caller's fault).
    #[error("{0}")]
    Image(String),
    /// The vision tower failed.
    #[error("vision tower: {0}")]
    Tower(String),
    /// As many calls as the encoder admits are waiting already.
    #[error("vision encoder overloaded ({0} calls waiting)")]
    Busy(usize),
}

impl From<EncodeError> for WorkerError {
    fn from(e: EncodeError) -> Self {
        match e {
            EncodeError::Image(m) => WorkerError::InvalidArgument(m),
            e @ EncodeError::Tower(_) => WorkerError::Model(e.to_string()),
            EncodeError::Busy(capacity) => WorkerError::QueueFull {
                role: "vision encoder",
                capacity,
            },
        }
    }
}

/// Features of an image list: one [`VisionFeatures`] per image.
pub type Features = Arc<Vec<VisionFeatures>>;

/// How a lookup was served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// Computed by this call.
    Miss,
    /// Joined a tower run another call had started.
    Shared,
    /// Already cached.
    Hit,
}

impl Lookup {
    /// The label of `specllava_vision_cache_total`.
    pub fn label(self) -> &'static str {
        match self {
            Lookup::Miss => "miss",
            Lookup::Shared => "shared",
            Lookup::Hit => "hit",
        }
    }
}

/// The vision encoder of a model service (see the module docs).
pub struct VisionEncoder {
    model: Arc<Llava>,
    limits: ImageLimits,
    /// One tower run at a time (the permit is held until the run ends, even when its caller
    /// went away meanwhile).
    running: Arc<Semaphore>,
    /// Calls admitted (computing, waiting for a run or for the tower): one permit each.
    admitted: Semaphore,
    /// Their bound.
    max_calls: usize,
    cache: FeatureCache,
}

impl VisionEncoder {
    /// An encoder for `model`'s images within `limits`, caching up to `cache_bytes` of
    /// features (0: tower runs are still shared while in flight, nothing is kept) and
    /// admitting at most `max_calls` calls at a time (more are refused before any work).
    pub fn new(
        model: Arc<Llava>,
        limits: ImageLimits,
        cache_bytes: usize,
        max_calls: usize,
    ) -> Self {
        let max_calls = max_calls.max(1);
        Self {
            model,
            limits,
            running: Arc::new(Semaphore::new(1)),
            admitted: Semaphore::new(max_calls),
            max_calls,
            cache: FeatureCache::new(cache_bytes),
        }
    }

    /// The image limits it decodes under.
    pub fn limits(&self) -> &ImageLimits {
        &self.limits
    }

    /// The vision features of `images` (as one batch, as a prefill of them would run the
    /// tower), in a conversation of `conversation_images` images (which decides whether
    /// LLaVA-OneVision tiles them): from the cache, from a run in flight, or computed now. An
    /// image over the size limit, or a call past the admitted number, is refused before any
    /// work.
    pub async fn encode(
        &self,
        images: Vec<Bytes>,
        conversation_images: usize,
    ) -> Result<Features, EncodeError> {
        let _admitted = self
            .admitted
            .try_acquire()
            .map_err(|_| EncodeError::Busy(self.max_calls))?;
        let max = self.limits.max_bytes;
        if let Some((i, image)) = images.iter().enumerate().find(|(_, b)| b.len() > max) {
            return Err(EncodeError::Image(format!(
                "image {i}: {} bytes exceed the limit of {max}",
                image.len()
            )));
        }
        let tiled = match self.model.image_tokens() {
            ImageTokens::AnyRes(a) => a.tiles_image(conversation_images),
            ImageTokens::Fixed(_) => false,
        };
        let (key, images) = key_off_runtime(images, tiled).await?;
        let (features, lookup) = self
            .cache
            .get_or_compute(key, || self.compute(images, conversation_images))
            .await?;
        specllava_telemetry::metrics().record_vision_cache(lookup.label());
        Ok(features)
    }

    /// The model whose tower this is.
    pub fn model(&self) -> &Arc<Llava> {
        &self.model
    }

    async fn compute(
        &self,
        images: Vec<Bytes>,
        conversation_images: usize,
    ) -> Result<Vec<VisionFeatures>, EncodeError> {
        let pixels = decode_images(&self.model, self.limits, images, conversation_images)
            .await
            .map_err(EncodeError::Image)?;
        let running = Arc::clone(&self.running)
            .acquire_owned()
            .await
            .map_err(|_| EncodeError::Tower("encoder closed".into()))?;
        let model = Arc::clone(&self.model);
        tokio::task::spawn_blocking(move || {
            let _running = running;
            model.vision_features(&pixels)
        })
        .await
        .map_err(|e| EncodeError::Tower(format!("task failed: {e}")))?
        .map_err(|e| EncodeError::Tower(e.to_string()))
    }
}

/// Image lists up to this many bytes are hashed on the async runtime (microseconds); larger
/// ones on a blocking thread.
const INLINE_HASH_BYTES: usize = 1 << 20;

/// [`key_of`] (and the images back), off the async runtime for large images.
async fn key_off_runtime(
    images: Vec<Bytes>,
    tiled: bool,
) -> Result<(Key, Vec<Bytes>), EncodeError> {
    if images.iter().map(Bytes::len).sum::<usize>() <= INLINE_HASH_BYTES {
        return Ok((key_of(&images, tiled), images));
    }
    tokio::task::spawn_blocking(move || (key_of(&images, tiled), images))
        .await
        .map_err(|e| EncodeError::Tower(format!("hashing task failed: {e}")))
}

/// SHA-256 of an image list (each image's length, then its bytes) and of whether
/// any-resolution tiling applies to it (OneVision's several-image conversations are not
/// tiled: the same bytes, other features).
type Key = [u8; 32];

fn key_of(images: &[Bytes], tiled: bool) -> Key {
    let mut h = Sha256::new();
    h.update([tiled as u8]);
    h.update((images.len() as u64).to_le_bytes());
    for image in images {
        h.update((image.len() as u64).to_le_bytes());
        h.update(image);
    }
    h.finalize().into()
}

/// One cached (or in-flight) image list.
struct Entry {
    cell: Arc<OnceCell<Features>>,
    /// Bytes of its features once computed (0 while in flight).
    bytes: usize,
    /// When it was last asked for (a counter).
    used: u64,
}

#[derive(Default)]
struct Entries {
    map: HashMap<Key, Entry>,
    clock: u64,
    bytes: usize,
}

/// Single-flight feature cache, bounded in bytes (LRU).
struct FeatureCache {
    capacity: usize,
    entries: Mutex<Entries>,
}

impl FeatureCache {
    fn new(capacity: usize) -> Self {
        Self {
            capacity,
            entries: Mutex::new(Entries::default()),
        }
    }

    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.entries.lock().expect("vision cache lock").bytes
    }

    async fn get_or_compute<F, Fut>(
        &self,
        key: Key,
        compute: F,
    ) -> Result<(Features, Lookup), EncodeError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Vec<VisionFeatures>, EncodeError>>,
    {
        let cell = {
            let mut e = self.entries.lock().expect("vision cache lock");
            e.clock += 1;
            let now = e.clock;
            // Runs nobody waits for any more (their callers went away) leave nothing behind
            // (they hold no bytes: only computed lists do).
            e.map
                .retain(|_, v| v.cell.initialized() || Arc::strong_count(&v.cell) > 1);
            let entry = e.map.entry(key).or_insert_with(|| Entry {
                cell: Arc::new(OnceCell::new()),
                bytes: 0,
                used: now,
            });
            entry.used = now;
            Arc::clone(&entry.cell)
        };
        if let Some(features) = cell.get() {
            return Ok((Arc::clone(features), Lookup::Hit));
        }
        let mut computed_here = false;
        let got = cell
            .get_or_try_init(|| async {
                computed_here = true;
                compute().await.map(Arc::new)
            })
            .await;
        let mut e = self.entries.lock().expect("vision cache lock");
        match got {
            Ok(features) => {
                let features = Arc::clone(features);
                if computed_here {
                    let size = features
                        .iter()
                        .map(|f| tensor_bytes(&f.rows))
                        .sum::<usize>();
                    self.admit(&mut e, key, &cell, size);
                }
                let lookup = if computed_here {
                    Lookup::Miss
                } else {
                    Lookup::Shared
                };
                Ok((features, lookup))
            }
            Err(err) => {
                // Not cached: the next call tries again (this cell's entry only: another
                // call may have started a new one for the same images since).
                if e.map.get(&key).is_some_and(|v| Arc::ptr_eq(&v.cell, &cell)) {
                    e.map.remove(&key);
                }
                Err(err)
            }
        }
    }

    /// Counts the features `cell` (`key`'s entry) just computed in, then drops the least
    /// recently used lists until the cache fits; a list larger than the whole cache is not
    /// kept. An entry replaced meanwhile (evicted, or another cell for the same images) is
    /// left as it is.
    fn admit(&self, e: &mut Entries, key: Key, cell: &Arc<OnceCell<Features>>, size: usize) {
        let Some(entry) = e
            .map
            .get_mut(&key)
            .filter(|v| Arc::ptr_eq(&v.cell, cell) && v.bytes == 0)
        else {
            return;
        };
        if size > self.capacity {
            e.map.remove(&key);
            return;
        }
        entry.bytes = size;
        e.bytes += size;
        while e.bytes > self.capacity {
            let oldest = e
                .map
                .iter()
                .filter(|(_, v)| v.bytes > 0)
                .min_by_key(|(_, v)| v.used)
                .map(|(k, _)| *k);
            let Some(oldest) = oldest else { break };
            if let Some(gone) = e.map.remove(&oldest) {
                e.bytes -= gone.bytes;
            }
        }
    }
}

fn tensor_bytes(t: &Tensor) -> usize {
    t.elem_count() * t.dtype().size_in_bytes()
}

/// Decodes and preprocesses `images` (of a conversation of `conversation_images` images)
/// off the async runtime.
pub async fn decode_images(
    model: &Arc<Llava>,
    image_limits: ImageLimits,
    images: Vec<Bytes>,
    conversation_images: usize,
) -> Result<Vec<ImagePixels>, String> {
    if images.is_empty() {
        return Ok(Vec::new());
    }
    let model = Arc::clone(model);
    tokio::task::spawn_blocking(move || {
        let proc = model.image_processor();
        images
            .iter()
            .enumerate()
            .map(|(i, bytes)| {
                let img = proc
                    .decode(bytes, &image_limits)
                    .map_err(|e| format!("image {i}: {e}"))?;
                model
                    .preprocess(&img, conversation_images)
                    .map_err(|e| format!("image {i}: {e}"))
            })
            .collect()
    })
    .await
    .map_err(|e| format!("image decoding task failed: {e}"))?
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use candle_core::{DType, Device};

    use super::*;

    /// Features of `n` images of 4 f32 values each (16 bytes an image).
    fn features(n: usize, value: f32) -> Vec<VisionFeatures> {
        (0..n)
            .map(|_| VisionFeatures {
                rows: Tensor::full(value, (1, 4), &Device::Cpu).unwrap(),
                image_size: (1, 1),
            })
            .collect()
    }

    /// The key of a one-image list.
    fn image(byte: u8) -> Key {
        key_of(&[Bytes::from(vec![byte; 8])], false)
    }

    #[tokio::test]
    async fn a_list_is_computed_once_and_then_served_from_the_cache() {
        let cache = FeatureCache::new(1024);
        let runs = AtomicUsize::new(0);
        let compute = || async {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok(features(1, 1.0))
        };
        let (_, first) = cache.get_or_compute(image(1), compute).await.unwrap();
        let (f, second) = cache.get_or_compute(image(1), compute).await.unwrap();
        assert_eq!((first, second), (Lookup::Miss, Lookup::Hit));
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(f[0].rows.dtype(), DType::F32);
        assert_eq!(cache.bytes(), 16);
        // Another list, or the same images in another order, is another key.
        let two = vec![Bytes::from(vec![1u8; 8]), Bytes::from(vec![2u8; 8])];
        let swapped = vec![Bytes::from(vec![2u8; 8]), Bytes::from(vec![1u8; 8])];
        assert_ne!(key_of(&two, false), key_of(&swapped, false));
        assert_ne!(key_of(&two, false), key_of(&two, true));
    }

    #[tokio::test]
    async fn concurrent_calls_share_one_run() {
        let cache = FeatureCache::new(1024);
        let runs = AtomicUsize::new(0);
        let (release, wait) = tokio::sync::oneshot::channel::<()>();
        let wait = std::sync::Mutex::new(Some(wait));
        let compute = || async {
            runs.fetch_add(1, Ordering::SeqCst);
            let rx = wait.lock().unwrap().take();
            if let Some(rx) = rx {
                rx.await.unwrap();
            }
            Ok(features(1, 2.0))
        };
        let images = image(3);
        let a = cache.get_or_compute(images, compute);
        let b = async {
            // `a` is in flight by now.
            tokio::task::yield_now().await;
            let got = cache.get_or_compute(images, compute);
            release.send(()).unwrap();
            got.await
        };
        let ((_, la), (_, lb)) =
            tokio::join!(async { a.await.unwrap() }, async { b.await.unwrap() });
        assert_eq!((la, lb), (Lookup::Miss, Lookup::Shared));
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn the_least_recently_used_list_goes_first_and_failures_are_not_kept() {
        // Room for two one-image lists.
        let cache = FeatureCache::new(32);
        let ok = || async { Ok(features(1, 0.0)) };
        for b in [1, 2] {
            cache.get_or_compute(image(b), ok).await.unwrap();
        }
        // 1 is used again, so 2 is the oldest when 3 comes in.
        assert_eq!(
            cache.get_or_compute(image(1), ok).await.unwrap().1,
            Lookup::Hit
        );
        cache.get_or_compute(image(3), ok).await.unwrap();
        assert_eq!(cache.bytes(), 32);
        assert_eq!(
            cache.get_or_compute(image(1), ok).await.unwrap().1,
            Lookup::Hit
        );
        assert_eq!(
            cache.get_or_compute(image(2), ok).await.unwrap().1,
            Lookup::Miss
        );
        // A list larger than the cache is computed, not kept.
        let big = || async { Ok(features(3, 0.0)) };
        cache.get_or_compute(image(9), big).await.unwrap();
        assert_eq!(cache.bytes(), 32, "the cached lists stay");
        assert_eq!(
            cache.get_or_compute(image(1), ok).await.unwrap().1,
            Lookup::Hit
        );
        assert_eq!(
            cache.get_or_compute(image(9), big).await.unwrap().1,
            Lookup::Miss
        );
        // A failure is reported and tried again next time.
        let bad = || async { Err(EncodeError::Image("not an image".into())) };
        let err = cache.get_or_compute(image(7), bad).await.unwrap_err();
        assert_eq!(err, EncodeError::Image("not an image".into()));
        assert_eq!(
            cache.get_or_compute(image(7), ok).await.unwrap().1,
            Lookup::Miss
        );
    }
}
