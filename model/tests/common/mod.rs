//! Tiny random LLaVA checkpoints written to a temp dir in the Hugging Face format, for tests that
//! need no fixtures.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use specllava_model::{Backend, Llava};

/// Shape knobs of a random checkpoint.
#[derive(Clone, Debug)]
pub struct Spec {
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub layers: usize,
    pub inter: usize,
    pub vocab: usize,
    pub v_hidden: usize,
    pub v_heads: usize,
    pub v_layers: usize,
    pub image: usize,
    pub patch: usize,
    pub feature_layer: i64,
    pub strategy: &'static str,
    pub tied: bool,
    /// `true`: transformers 5 names (`model.language_model.*`), else llava-hf's legacy names.
    pub current_layout: bool,
    pub dtype: DType,
    pub seed: u64,
}

impl Default for Spec {
    fn default() -> Self {
        Spec {
            hidden: 32,
            heads: 4,
            kv_heads: 2,
            layers: 2,
            inter: 48,
            vocab: 64,
            v_hidden: 16,
            v_heads: 2,
            v_layers: 2,
            image: 8,
            patch: 4,
            feature_layer: -2,
            strategy: "default",
            tied: false,
            current_layout: false,
            dtype: DType::F32,
            seed: 0,
        }
    }
}

pub const IMAGE_TOKEN: u32 = 63;

fn rand_tensor(rng: &mut StdRng, shape: &[usize], scale: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| rng.random_range(-1.0f32..1.0) * scale)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn ones_ish(rng: &mut StdRng, n: usize) -> Tensor {
    let v: Vec<f32> = (0..n)
        .map(|_| 1.0 + rng.random_range(-0.1f32..0.1))
        .collect();
    Tensor::from_vec(v, n, &Device::Cpu).unwrap()
}

/// All tensors of a random checkpoint, named in the chosen layout.
pub fn tensors(s: &Spec) -> HashMap<String, Tensor> {
    let mut rng = StdRng::seed_from_u64(s.seed);
    let mut t = HashMap::new();
    let (lm, head, vis, proj) = if s.current_layout {
        (
            "model.language_model.",
            "lm_head.weight",
            "model.vision_tower.vision_model.",
            "model.multi_modal_projector.",
        )
    } else {
        (
            "language_model.model.",
            "language_model.lm_head.weight",
            "vision_tower.vision_model.",
            "multi_modal_projector.",
        )
    };
    let hd = s.hidden / s.heads;
    let put = |t: &mut HashMap<String, Tensor>, name: String, x: Tensor| {
        t.insert(name, x.to_dtype(s.dtype).unwrap());
    };
    put(
        &mut t,
        format!("{lm}embed_tokens.weight"),
        rand_tensor(&mut rng, &[s.vocab, s.hidden], 1.0),
    );
    for l in 0..s.layers {
        let p = format!("{lm}layers.{l}.");
        let w = 1.0 / (s.hidden as f32).sqrt();
        put(
            &mut t,
            format!("{p}self_attn.q_proj.weight"),
            rand_tensor(&mut rng, &[s.heads * hd, s.hidden], w * 2.0),
        );
        put(
            &mut t,
            format!("{p}self_attn.k_proj.weight"),
            rand_tensor(&mut rng, &[s.kv_heads * hd, s.hidden], w * 2.0),
        );
        put(
            &mut t,
            format!("{p}self_attn.v_proj.weight"),
            rand_tensor(&mut rng, &[s.kv_heads * hd, s.hidden], w),
        );
        put(
            &mut t,
            format!("{p}self_attn.o_proj.weight"),
            rand_tensor(&mut rng, &[s.hidden, s.heads * hd], w),
        );
        put(
            &mut t,
            format!("{p}mlp.gate_proj.weight"),
            rand_tensor(&mut rng, &[s.inter, s.hidden], w),
        );
        put(
            &mut t,
            format!("{p}mlp.up_proj.weight"),
            rand_tensor(&mut rng, &[s.inter, s.hidden], w),
        );
        put(
            &mut t,
            format!("{p}mlp.down_proj.weight"),
            rand_tensor(&mut rng, &[s.hidden, s.inter], w),
        );
        put(
            &mut t,
            format!("{p}input_layernorm.weight"),
            ones_ish(&mut rng, s.hidden),
        );
        put(
            &mut t,
            format!("{p}post_attention_layernorm.weight"),
            ones_ish(&mut rng, s.hidden),
        );
    }
    put(
        &mut t,
        format!("{lm}norm.weight"),
        ones_ish(&mut rng, s.hidden),
    );
    if !s.tied {
        put(
            &mut t,
            head.to_string(),
            rand_tensor(&mut rng, &[s.vocab, s.hidden], 0.5),
        );
    }
    let vh = s.v_hidden;
    let grid = s.image / s.patch;
    put(
        &mut t,
        format!("{vis}embeddings.patch_embedding.weight"),
        rand_tensor(&mut rng, &[vh, 3, s.patch, s.patch], 0.3),
    );
    put(
        &mut t,
        format!("{vis}embeddings.class_embedding"),
        rand_tensor(&mut rng, &[vh], 1.0),
    );
    put(
        &mut t,
        format!("{vis}embeddings.position_embedding.weight"),
        rand_tensor(&mut rng, &[grid * grid + 1, vh], 0.5),
    );
    put(
        &mut t,
        format!("{vis}pre_layrnorm.weight"),
        ones_ish(&mut rng, vh),
    );
    put(
        &mut t,
        format!("{vis}pre_layrnorm.bias"),
        rand_tensor(&mut rng, &[vh], 0.1),
    );
    let w = 1.0 / (vh as f32).sqrt();
    for l in 0..s.v_layers {
        let p = format!("{vis}encoder.layers.{l}.");
        for n in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            put(
                &mut t,
                format!("{p}self_attn.{n}.weight"),
                rand_tensor(&mut rng, &[vh, vh], w),
            );
            put(
                &mut t,
                format!("{p}self_attn.{n}.bias"),
                rand_tensor(&mut rng, &[vh], 0.1),
            );
        }
        for n in ["layer_norm1", "layer_norm2"] {
            put(&mut t, format!("{p}{n}.weight"), ones_ish(&mut rng, vh));
            put(
                &mut t,
                format!("{p}{n}.bias"),
                rand_tensor(&mut rng, &[vh], 0.1),
            );
        }
        put(
            &mut t,
            format!("{p}mlp.fc1.weight"),
            rand_tensor(&mut rng, &[2 * vh, vh], w),
        );
        put(
            &mut t,
            format!("{p}mlp.fc1.bias"),
            rand_tensor(&mut rng, &[2 * vh], 0.1),
        );
        put(
            &mut t,
            format!("{p}mlp.fc2.weight"),
            rand_tensor(&mut rng, &[vh, 2 * vh], w),
        );
        put(
            &mut t,
            format!("{p}mlp.fc2.bias"),
            rand_tensor(&mut rng, &[vh], 0.1),
        );
    }
    put(
        &mut t,
        format!("{vis}post_layernorm.weight"),
        ones_ish(&mut rng, vh),
    );
    put(
        &mut t,
        format!("{vis}post_layernorm.bias"),
        rand_tensor(&mut rng, &[vh], 0.1),
    );
    put(
        &mut t,
        format!("{proj}linear_1.weight"),
        rand_tensor(&mut rng, &[s.hidden, vh], w),
    );
    put(
        &mut t,
        format!("{proj}linear_1.bias"),
        rand_tensor(&mut rng, &[s.hidden], 0.1),
    );
    put(
        &mut t,
        format!("{proj}linear_2.weight"),
        rand_tensor(
            &mut rng,
            &[s.hidden, s.hidden],
            1.0 / (s.hidden as f32).sqrt(),
        ),
    );
    put(
        &mut t,
        format!("{proj}linear_2.bias"),
        rand_tensor(&mut rng, &[s.hidden], 0.1),
    );
    t
}

pub fn config_json(s: &Spec) -> serde_json::Value {
    json!({
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "image_token_index": IMAGE_TOKEN,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": s.feature_layer,
        "vision_feature_select_strategy": s.strategy,
        "tie_word_embeddings": s.tied,
        "text_config": {
            "model_type": "llama", "vocab_size": s.vocab, "hidden_size": s.hidden,
            "intermediate_size": s.inter, "num_hidden_layers": s.layers,
            "num_attention_heads": s.heads, "num_key_value_heads": s.kv_heads,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 512,
            "tie_word_embeddings": s.tied
        },
        "vision_config": {
            "model_type": "clip_vision_model", "hidden_size": s.v_hidden,
            "intermediate_size": 2 * s.v_hidden, "num_hidden_layers": s.v_layers,
            "num_attention_heads": s.v_heads, "image_size": s.image, "patch_size": s.patch,
            "hidden_act": "quick_gelu"
        }
    })
}

pub fn preprocessor_json(s: &Spec) -> serde_json::Value {
    json!({
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": true, "size": {"shortest_edge": s.image}, "resample": 3,
        "do_center_crop": true, "crop_size": {"height": s.image, "width": s.image},
        "do_rescale": true, "rescale_factor": 0.00392156862745098,
        "do_normalize": true, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "do_convert_rgb": true
    })
}

/// Writes the checkpoint into `dir` (single file, or `shards` files with an index).
pub fn write_checkpoint(dir: &Path, s: &Spec, shards: usize) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config_json(s)).unwrap(),
    )
    .unwrap();
    std::fs::write(
        dir.join("preprocessor_config.json"),
        serde_json::to_string_pretty(&preprocessor_json(s)).unwrap(),
    )
    .unwrap();
    let t = tensors(s);
    if shards <= 1 {
        candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
        return;
    }
    let mut names: Vec<&String> = t.keys().collect();
    names.sort();
    let mut weight_map = serde_json::Map::new();
    for (k, chunk) in names.chunks(names.len().div_ceil(shards)).enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", k + 1, shards);
        let part: HashMap<String, Tensor> = chunk
            .iter()
            .map(|n| ((*n).clone(), t[*n].clone()))
            .collect();
        candle_core::safetensors::save(&part, dir.join(&file)).unwrap();
        for n in chunk {
            weight_map.insert((*n).clone(), json!(file));
        }
    }
    let index = json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

/// A random model loaded from a fresh temp dir (the CPU device's default backend).
pub fn model(s: &Spec) -> (tempfile::TempDir, Llava) {
    model_with(s, Backend::for_device(&Device::Cpu))
}

/// A random model loaded from a fresh temp dir with `backend`.
pub fn model_with(s: &Spec, backend: Backend) -> (tempfile::TempDir, Llava) {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), s, 1);
    let m = Llava::load_with_backend(dir.path(), &Device::Cpu, backend).unwrap();
    (dir, m)
}

/// A deterministic random "preprocessed" image.
pub fn pixels(s: &Spec, seed: u64) -> Tensor {
    let mut rng = StdRng::seed_from_u64(seed);
    rand_tensor(&mut rng, &[3, s.image, s.image], 1.5)
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    // Either may live on a GPU or be half precision: compare in f32 on the CPU.
    let host = |t: &Tensor| {
        t.to_device(&Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    };
    let (a, b) = (&host(a), &host(b));
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// The highest logit's index.
pub fn argmax(logits: &Tensor) -> u32 {
    logits.argmax(0).unwrap().to_scalar::<u32>().unwrap()
}

/// Greedy decoding with our own loop: each step a one-node tree, then commit; `max_new`
/// tokens or up to EOS.
pub fn greedy(
    m: &Llava,
    kv: &mut specllava_model::KvCache,
    first_logits: &Tensor,
    max_new: usize,
) -> Vec<u32> {
    let eos = &m.config().eos_token_ids;
    let mut out = vec![argmax(first_logits)];
    while out.len() < max_new && !eos.contains(out.last().unwrap()) {
        let l = m.forward_tree(kv, &[*out.last().unwrap()], &[-1]).unwrap();
        kv.commit(&[0]).unwrap();
        out.push(argmax(&l.squeeze(0).unwrap()));
    }
    out
}
