//! The fixed evaluation set: in-domain test images (`examples/test/`, with the question each
//! one ships with in `test.jsonl`) and out-of-domain photographs (`examples/ood/`), several
//! prompts each, in a fixed order.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Errors loading the evaluation set.
#[derive(Debug, Error)]
pub enum EvalSetError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A `test.jsonl` line is not valid.
    #[error("{path}:{line}: {message}")]
    BadLine {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// No image found.
    #[error("no evaluation images under {0} (expected test/*.png with test.jsonl and ood/*)")]
    Empty(PathBuf),
}

/// Where an image comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Domain {
    /// The synthetic test split the pair was trained for.
    InDomain,
    /// Real photographs.
    OutOfDomain,
}

/// One benchmark request: an image and a prompt.
#[derive(Debug, Clone, Serialize)]
pub struct EvalItem {
    /// Stable id, e.g. `test_00003.png#1`.
    pub id: String,
    /// Domain of the image.
    pub domain: Domain,
    /// Image path (as found, relative to the working directory when given relative).
    pub image_path: PathBuf,
    /// Encoded image bytes.
    #[serde(skip)]
    pub image: Vec<u8>,
    /// The user prompt (the chat template is applied by the orchestrator).
    pub prompt: String,
    /// Sampling seed for the seeded-sampling runs.
    pub seed: u64,
}

/// Extra in-domain prompts asked of every test image after its own question.
pub const IN_DOMAIN_PROMPTS: &[&str] = &["Describe the image.", "How many shapes are there?"];
/// Prompts asked of every out-of-domain photograph.
pub const OOD_PROMPTS: &[&str] = &[
    "Describe the image.",
    "What do you see?",
    "How many shapes are there?",
];

/// Sizes of the set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct EvalSizes {
    /// In-domain images used (first N of `test.jsonl`).
    pub in_domain_images: usize,
    /// Out-of-domain photographs used (first N by file name).
    pub ood_images: usize,
    /// Prompts per image.
    pub prompts_per_image: usize,
}

#[derive(Deserialize)]
struct TestLine {
    image: String,
    prompt: String,
}

fn read(path: &Path) -> Result<Vec<u8>, EvalSetError> {
    std::fs::read(path).map_err(|source| EvalSetError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Loads the set from an `examples/` directory. Seeds are `1000 + index`.
pub fn load(examples: &Path, sizes: EvalSizes) -> Result<Vec<EvalItem>, EvalSetError> {
    let mut items = Vec::new();
    let jsonl = examples.join("test").join("test.jsonl");
    if jsonl.exists() {
        let text = String::from_utf8_lossy(&read(&jsonl)?).into_owned();
        for (i, line) in text.lines().filter(|l| !l.trim().is_empty()).enumerate() {
            if i >= sizes.in_domain_images {
                break;
            }
            let t: TestLine = serde_json::from_str(line).map_err(|e| EvalSetError::BadLine {
                path: jsonl.clone(),
                line: i + 1,
                message: e.to_string(),
            })?;
            let path = examples.join("test").join(&t.image);
            let image = read(&path)?;
            let prompts =
                std::iter::once(t.prompt.as_str()).chain(IN_DOMAIN_PROMPTS.iter().copied());
            for (j, p) in prompts.take(sizes.prompts_per_image).enumerate() {
                items.push(EvalItem {
                    id: format!("{}#{j}", t.image),
                    domain: Domain::InDomain,
                    image_path: path.clone(),
                    image: image.clone(),
                    prompt: p.to_owned(),
                    seed: 0,
                });
            }
        }
    }
    let ood_dir = examples.join("ood");
    if ood_dir.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&ood_dir)
            .map_err(|source| EvalSetError::Io {
                path: ood_dir.clone(),
                source,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                matches!(
                    p.extension()
                        .and_then(|e| e.to_str())
                        .map(str::to_ascii_lowercase)
                        .as_deref(),
                    Some("png" | "jpg" | "jpeg" | "webp")
                )
            })
            .collect();
        files.sort();
        for path in files.into_iter().take(sizes.ood_images) {
            let image = read(&path)?;
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            for (j, p) in OOD_PROMPTS.iter().take(sizes.prompts_per_image).enumerate() {
                items.push(EvalItem {
                    id: format!("{name}#{j}"),
                    domain: Domain::OutOfDomain,
                    image_path: path.clone(),
                    image: image.clone(),
                    prompt: (*p).to_owned(),
                    seed: 0,
                });
            }
        }
    }
    if items.is_empty() {
        return Err(EvalSetError::Empty(examples.to_owned()));
    }
    for (i, it) in items.iter_mut().enumerate() {
        it.seed = 1000 + i as u64;
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_in_domain_questions_then_photos_with_fixed_seeds() {
        let dir = tempfile::tempdir().unwrap();
        let test = dir.path().join("test");
        let ood = dir.path().join("ood");
        std::fs::create_dir_all(&test).unwrap();
        std::fs::create_dir_all(&ood).unwrap();
        std::fs::write(
            test.join("test.jsonl"),
            "{\"image\": \"a.png\", \"prompt\": \"Count the shapes.\", \"answer\": \"Two.\"}\n\
             {\"image\": \"b.png\", \"prompt\": \"What colour?\"}\n",
        )
        .unwrap();
        for f in ["a.png", "b.png"] {
            std::fs::write(test.join(f), b"png").unwrap();
        }
        std::fs::write(ood.join("z.jpg"), b"jpg").unwrap();
        std::fs::write(ood.join("notes.txt"), b"x").unwrap();
        let sizes = EvalSizes {
            in_domain_images: 1,
            ood_images: 5,
            prompts_per_image: 2,
        };
        let items = load(dir.path(), sizes).unwrap();
        let ids: Vec<&str> = items.iter().map(|i| i.id.as_str()).collect();
        assert_eq!(ids, ["a.png#0", "a.png#1", "z.jpg#0", "z.jpg#1"]);
        assert_eq!(items[0].prompt, "Count the shapes.");
        assert_eq!(items[1].prompt, IN_DOMAIN_PROMPTS[0]);
        assert_eq!(items[2].domain, Domain::OutOfDomain);
        assert_eq!(
            items.iter().map(|i| i.seed).collect::<Vec<_>>(),
            [1000, 1001, 1002, 1003]
        );
        assert!(matches!(
            load(&dir.path().join("none"), sizes),
            Err(EvalSetError::Empty(_))
        ));
    }
}
