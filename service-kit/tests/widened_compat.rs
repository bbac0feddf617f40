//! A widened target (`specllava_model::widen`, the bench's memory-bound pair) is compatible
//! with the draft of the checkpoint it was widened from: the same vocabulary, special ids,
//! tokenizer and vision tower, so the orchestrator's compatibility rules accept the pair and
//! the draft may prefill from the target's vision features.

use std::path::Path;

use specllava_model::widen::widen_checkpoint;
use specllava_model::{Device, Llava, LlavaTokenizer};
use specllava_service_kit::model_info;
use specllava_wire::compat::{
    TokenizerIdentity, draft_mismatches, model_dir_fingerprint, target_mismatches,
};

fn info(dir: &Path) -> specllava_proto::v1::ModelInfo {
    let model = Llava::load(dir, &Device::Cpu).expect("load");
    model_info(&model, 256, model_dir_fingerprint(dir))
}

#[test]
fn a_widened_target_accepts_the_sources_draft() {
    let source = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../model/tests/fixtures/gqa_default_l-2_sharded");
    let wide = tempfile::tempdir().unwrap();
    widen_checkpoint(&source, wide.path(), 2).unwrap();

    let tok = LlavaTokenizer::from_file(source.join("tokenizer.json")).unwrap();
    let identity = TokenizerIdentity::of(&tok);
    let (draft, target) = (info(&source), info(wide.path()));
    assert!(target_mismatches(&identity, &target).is_empty());
    assert!(
        draft_mismatches(&identity, &target, &draft).is_empty(),
        "{:?}",
        draft_mismatches(&identity, &target, &draft)
    );
    // The towers are the same, so the target's features may serve the draft.
    assert_eq!(target.vision_fingerprint, draft.vision_fingerprint);
    assert_eq!(target.num_image_tokens, draft.num_image_tokens);
}
