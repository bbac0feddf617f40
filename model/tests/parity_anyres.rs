//! Parity with `transformers` for the any-resolution checkpoints (LLaVA-NeXT with Llama and
//! Mistral decoders, LLaVA-OneVision with SigLIP and Qwen2) on the committed fixtures
//! (`tests/fixtures/anyres/`, written by `tools/make_anyres_fixtures.py`): tiles, token counts,
//! vision and packed image features, prefill logits, greedy tokens, tokenizer + chat template,
//! for portrait, landscape, tiny, larger-than-every-pinpoint and square images, two images in
//! one prompt and multi-turn. No Python needed.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::{greedy, max_abs_diff};
use serde_json::Value;
use specllava_model::chat::{ChatTemplate, ChatTurn, Message, Part, turns_to_messages};
use specllava_model::{
    Backend, Device, ImageLimits, ImagePixels, Llava, LlavaTokenizer, PrefillImages, Tensor,
};

/// Max abs logit / feature difference to transformers (f32 on the CPU, as in `parity.rs`).
const TOL: f32 = 1e-4;

fn checkpoints() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/anyres");
    let mut v: Vec<PathBuf> = std::fs::read_dir(root)
        .expect("tests/fixtures/anyres exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("config.json").exists())
        .collect();
    v.sort();
    assert_eq!(v.len(), 4, "the four any-resolution checkpoints");
    v
}

struct Case {
    name: String,
    meta: Value,
    tensors: HashMap<String, Tensor>,
    refdir: PathBuf,
}

impl Case {
    fn ids(&self, key: &str) -> Vec<u32> {
        self.meta[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    }

    fn usizes(&self, key: &str) -> Vec<usize> {
        self.ids(key).into_iter().map(|x| x as usize).collect()
    }

    fn turns(&self) -> Vec<ChatTurn> {
        self.meta["turns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| ChatTurn {
                user: t[0].as_str().unwrap().to_string(),
                assistant: t[1].as_str().map(str::to_string),
            })
            .collect()
    }

    fn image_paths(&self) -> Vec<PathBuf> {
        self.meta["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| self.refdir.join(p.as_str().unwrap()))
            .collect()
    }

    /// How many images the processor saw as one prompt: all of them when passed nested (one
    /// sample), else each alone.
    fn images_in_prompt(&self) -> usize {
        if self.meta["image_call"] == "nested" {
            self.image_paths().len()
        } else {
            1
        }
    }

    /// Our preprocessing of the case's images.
    fn images(&self, m: &Llava) -> Vec<ImagePixels> {
        self.image_paths()
            .iter()
            .map(|path| {
                let bytes = std::fs::read(path).unwrap();
                let img = m
                    .image_processor()
                    .decode(&bytes, &ImageLimits::default())
                    .unwrap();
                m.preprocess(&img, self.images_in_prompt()).unwrap()
            })
            .collect()
    }
}

fn cases(dir: &Path) -> Vec<Case> {
    let refdir = dir.join("reference");
    let mut names: Vec<String> = std::fs::read_dir(&refdir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert!(!names.is_empty(), "{}: no cases", dir.display());
    names
        .into_iter()
        .map(|name| Case {
            meta: serde_json::from_str(
                &std::fs::read_to_string(refdir.join(format!("{name}.json"))).unwrap(),
            )
            .unwrap(),
            tensors: candle_core::safetensors::load(
                refdir.join(format!("{name}.safetensors")),
                &Device::Cpu,
            )
            .unwrap(),
            refdir: refdir.clone(),
            name,
        })
        .collect()
}

fn text_part(text: &str) -> Part {
    Part::Text {
        text: text.to_string(),
    }
}

fn label(dir: &Path, case: &Case) -> String {
    format!(
        "{}/{}",
        dir.file_name().unwrap().to_string_lossy(),
        case.name
    )
}

#[test]
fn tiles_and_token_counts_match_the_hf_processor() {
    for dir in checkpoints() {
        let m = Llava::load(&dir, &Device::Cpu).unwrap();
        for case in cases(&dir) {
            let what = label(&dir, &case);
            let pixel_values = &case.tensors["pixel_values"];
            let counts = case.usizes("num_image_tokens");
            let tiles = case.usizes("num_tiles");
            for (i, px) in case.images(&m).iter().enumerate() {
                assert_eq!(
                    px.tiles.dim(0).unwrap(),
                    tiles[i],
                    "{what}: image {i} tiles"
                );
                let want = pixel_values.get(i).unwrap().narrow(0, 0, tiles[i]).unwrap();
                let d = max_abs_diff(&px.tiles, &want);
                assert!(d <= 1e-6, "{what}: image {i} pixel diff {d}");
                assert_eq!(
                    m.image_token_count(px.image_size, case.images_in_prompt()),
                    counts[i],
                    "{what}: image {i} of {:?} tokens",
                    px.image_size
                );
            }
        }
    }
}

#[test]
fn features_logits_and_greedy_tokens_match_transformers() {
    for dir in checkpoints() {
        for backend in [Backend::Cpu, Backend::Candle] {
            let m = Llava::load_with_backend(&dir, &Device::Cpu, backend).unwrap();
            for case in cases(&dir) {
                let what = format!("{} ({backend:?})", label(&dir, &case));
                let images = case.images(&m);
                let vision = m.vision_features(&images).unwrap();
                for (i, f) in vision.iter().enumerate() {
                    let want = &case.tensors[&format!("vision_features_{i}")];
                    let want = want.flatten_to(1).unwrap();
                    let d = max_abs_diff(&f.rows, &want);
                    assert!(d < TOL, "{what}: vision features {i} diff {d}");
                }
                let packed = m.image_features(&images).unwrap();
                for (i, f) in packed.iter().enumerate() {
                    let d = max_abs_diff(f, &case.tensors[&format!("image_features_{i}")]);
                    assert!(d < TOL, "{what}: image features {i} diff {d}");
                }

                let ids = case.ids("input_ids");
                let mut kv = m.new_kv();
                let logits = m
                    .prefill_images(&mut kv, &ids, &PrefillImages::Pixels(images.clone()))
                    .unwrap();
                assert_eq!(kv.committed_len(), ids.len(), "{what}: one KV row an id");
                let d = max_abs_diff(&logits, &case.tensors["logits_last"]);
                eprintln!("{what}: logits_last max abs diff {d:.2e}");
                assert!(d < TOL, "{what}: logits diff {d}");
                let max_new = case.meta["max_new_tokens"].as_u64().unwrap() as usize;
                let got = greedy(&m, &mut kv, &logits, max_new);
                assert_eq!(got, case.ids("greedy_tokens"), "{what}: greedy tokens");

                // The same prompt with one placeholder an image, and from vision features.
                let img = m.config().image_token_id;
                let mut collapsed: Vec<u32> = Vec::new();
                for &t in &ids {
                    if !(t == img && collapsed.last() == Some(&img)) {
                        collapsed.push(t);
                    }
                }
                if collapsed.iter().filter(|&&t| t == img).count() == images.len() {
                    let mut kv = m.new_kv();
                    let l = m
                        .prefill_images(&mut kv, &collapsed, &PrefillImages::VisionFeatures(vision))
                        .unwrap();
                    assert_eq!(kv.committed_len(), ids.len(), "{what}: placeholders expand");
                    let d = max_abs_diff(&l, &logits);
                    assert!(d < TOL, "{what}: placeholder prompt diff {d}");
                }
            }
        }
    }
}

#[test]
fn prompt_logits_match_at_every_position_after_the_images() {
    for dir in checkpoints() {
        let m = Llava::load(&dir, &Device::Cpu).unwrap();
        for case in cases(&dir) {
            let what = label(&dir, &case);
            let ids = case.ids("input_ids");
            let img = m.config().image_token_id;
            let last_img = ids.iter().rposition(|&t| t == img).unwrap();
            let mut kv = m.new_kv();
            m.prefill_images(
                &mut kv,
                &ids[..=last_img],
                &PrefillImages::Pixels(case.images(&m)),
            )
            .unwrap();
            // The rest as a chain tree: positions and (for Mistral) the sliding window on
            // tree nodes.
            let rest = &ids[last_img + 1..];
            let parents: Vec<i32> = (0..rest.len() as i32).map(|i| i - 1).collect();
            let got = m.forward_tree(&mut kv, rest, &parents).unwrap();
            let want = case.tensors["logits_all"]
                .narrow(0, last_img + 1, rest.len())
                .unwrap();
            let d = max_abs_diff(&got, &want);
            assert!(d < TOL, "{what}: logits_all diff {d}");
        }
    }
}

#[test]
fn tokenizer_and_chat_template_reproduce_input_ids() {
    for dir in checkpoints() {
        let m = Llava::load(&dir, &Device::Cpu).unwrap();
        let tok = LlavaTokenizer::from_file(dir.join("tokenizer.json")).unwrap();
        assert_eq!(tok.image_token_id(), m.config().image_token_id);
        let template = ChatTemplate::from_model_dir(&dir, tok.special_tokens()).unwrap();
        for case in cases(&dir) {
            let what = label(&dir, &case);
            let mut messages = Vec::new();
            if let Some(system) = case.meta["system"].as_str() {
                messages.push(Message::parts("system", vec![text_part(system)]));
            }
            let turns = case.turns();
            let mut user_turns = turns_to_messages(&turns, true);
            // Every image is in the first user turn.
            let mut first = vec![Part::Image; case.image_paths().len()];
            first.push(text_part(&turns[0].user));
            user_turns[0] = Message::parts("user", first);
            messages.extend(user_turns);
            let add_generation_prompt = case.meta["add_generation_prompt"].as_bool().unwrap();
            let text = template.render(&messages, add_generation_prompt).unwrap();
            assert_eq!(text, case.meta["prompt_text"].as_str().unwrap(), "{what}");
            let counts = case.usizes("num_image_tokens");
            let mut next = counts.iter();
            let expanded: Vec<u32> = tok
                .encode(&text, true)
                .unwrap()
                .into_iter()
                .flat_map(|t| {
                    let n = if t == tok.image_token_id() {
                        *next.next().expect("one count an image")
                    } else {
                        1
                    };
                    std::iter::repeat_n(t, n)
                })
                .collect();
            assert_eq!(expanded, case.ids("input_ids"), "{what}");
        }
    }
}

#[test]
fn sizes_that_need_python_floor_division_pack_like_transformers() {
    // `what_wide` is shrunk from 10x15 to 5x8, where floor(x / ratio) would give 6x9.
    let dir = checkpoints()
        .into_iter()
        .find(|d| d.ends_with("onevision_qwen2_untied"))
        .unwrap();
    let m = Llava::load(&dir, &Device::Cpu).unwrap();
    let case = cases(&dir)
        .into_iter()
        .find(|c| c.name == "what_wide")
        .unwrap();
    assert_eq!(case.meta["floordiv_matters"][0], true);
    let images = case.images(&m);
    assert_eq!(
        m.image_token_count(images[0].image_size, 1),
        case.usizes("num_image_tokens")[0]
    );
}
