//! The decoding modes compared and the two sampling settings.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;
use specllava_proto::v1::{GenerationParams, SpeculationConfig, SpeculationMode};

/// One decoding mode, as sent to the orchestrator: a tree shape, with or without draft-ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct Mode {
    /// What is drafted each step.
    #[serde(flatten)]
    pub shape: Shape,
    /// Whether the draft pre-drafts the next tree while the target verifies.
    pub draft_ahead: bool,
}

/// A tree shape (or none).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Shape {
    /// No speculation: the baseline every other mode is compared with.
    TargetOnly,
    /// A chain of `len` draft tokens (K = 1).
    Chain {
        /// Draft tokens per step.
        len: u32,
    },
    /// Static tree: `branching` children per node, breadth-first to `budget` nodes, `depth` levels.
    Static {
        /// Depth D.
        depth: u32,
        /// Branching K.
        branching: u32,
        /// Budget M.
        budget: u32,
    },
    /// Dynamic (EAGLE-2 / Spec-LLaVA) tree with fixed (D, K, M).
    Dynamic {
        /// Depth D.
        depth: u32,
        /// Branching K.
        branching: u32,
        /// Budget M.
        budget: u32,
    },
    /// Dynamic tree whose (D, K, M) the services' budget policy picks each step.
    Adaptive,
}

impl Mode {
    /// The baseline: no speculation.
    pub const TARGET_ONLY: Mode = Mode {
        shape: Shape::TargetOnly,
        draft_ahead: false,
    };

    /// `shape` with draft-ahead (the services' default).
    pub fn new(shape: Shape) -> Self {
        Self {
            draft_ahead: !matches!(shape, Shape::TargetOnly),
            shape,
        }
    }

    /// The speculation settings of a request in this mode.
    pub fn speculation(&self) -> SpeculationConfig {
        let (mode, depth, branching, budget) = match self.shape {
            Shape::TargetOnly => (SpeculationMode::Off, 0, 0, 0),
            Shape::Chain { len } => (SpeculationMode::Chain, len, 1, len),
            Shape::Static {
                depth,
                branching,
                budget,
            } => (SpeculationMode::Static, depth, branching, budget),
            Shape::Dynamic {
                depth,
                branching,
                budget,
            } => (SpeculationMode::Dynamic, depth, branching, budget),
            Shape::Adaptive => (SpeculationMode::Adaptive, 0, 0, 0),
        };
        SpeculationConfig {
            mode: mode as i32,
            depth,
            branching,
            budget,
            disable_draft_ahead: !self.draft_ahead,
        }
    }

    /// Whether this is the baseline.
    pub fn is_baseline(&self) -> bool {
        matches!(self.shape, Shape::TargetOnly)
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.shape)?;
        if !self.draft_ahead && !self.is_baseline() {
            write!(f, "/no-ahead")?;
        }
        Ok(())
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Shape::TargetOnly => write!(f, "target-only"),
            Shape::Chain { len } => write!(f, "chain:{len}"),
            Shape::Static {
                depth,
                branching,
                budget,
            } => write!(f, "static:{depth},{branching},{budget}"),
            Shape::Dynamic {
                depth,
                branching,
                budget,
            } => write!(f, "dynamic:{depth},{branching},{budget}"),
            Shape::Adaptive => write!(f, "adaptive"),
        }
    }
}

impl FromStr for Mode {
    type Err = String;

    /// A shape (see [`Shape`]'s `FromStr`), optionally followed by `/no-ahead`.
    fn from_str(s: &str) -> Result<Self, String> {
        match s.strip_suffix("/no-ahead") {
            Some(shape) => {
                let shape: Shape = shape.parse()?;
                Ok(Mode {
                    shape,
                    draft_ahead: false,
                })
            }
            None => s.parse().map(Mode::new),
        }
    }
}

impl FromStr for Shape {
    type Err = String;

    /// `target-only` (or `off`), `chain:L`, `static:D,K,M`, `dynamic:D,K,M`, `adaptive`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (kind, args) = s.split_once(':').unwrap_or((s, ""));
        let nums: Result<Vec<u32>, _> = args
            .split(',')
            .filter(|a| !a.is_empty())
            .map(|a| a.trim().parse::<u32>())
            .collect();
        let nums = nums.map_err(|e| format!("mode {s:?}: {e}"))?;
        let dkm = |nums: &[u32]| match nums {
            [d, k, m] if *d > 0 && *k > 0 && *m > 0 => Ok((*d, *k, *m)),
            _ => Err(format!("mode {s:?}: expected three positive numbers D,K,M")),
        };
        match (kind, nums.as_slice()) {
            ("target-only" | "off", []) => Ok(Shape::TargetOnly),
            ("adaptive", []) => Ok(Shape::Adaptive),
            ("chain", [len]) if *len > 0 => Ok(Shape::Chain { len: *len }),
            ("static", n) => dkm(n).map(|(depth, branching, budget)| Shape::Static {
                depth,
                branching,
                budget,
            }),
            ("dynamic", n) => dkm(n).map(|(depth, branching, budget)| Shape::Dynamic {
                depth,
                branching,
                budget,
            }),
            _ => Err(format!(
                "unknown mode {s:?} (target-only, chain:L, static:D,K,M, dynamic:D,K,M, adaptive; /no-ahead turns draft-ahead off)"
            )),
        }
    }
}

/// How tokens are picked.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Sampling {
    /// Argmax.
    Greedy,
    /// Seeded sampling at a temperature (each item has its own fixed seed).
    Seeded {
        /// Softmax temperature.
        temperature: f32,
    },
}

impl Sampling {
    /// Generation parameters for a request.
    pub fn params(&self, max_new_tokens: u32, seed: u64) -> GenerationParams {
        let temperature = match *self {
            Sampling::Greedy => 0.0,
            Sampling::Seeded { temperature } => temperature,
        };
        GenerationParams {
            max_new_tokens,
            temperature,
            top_p: 1.0,
            top_k: 0,
            seed,
            stop: Vec::new(),
            ignore_eos: false,
        }
    }
}

impl fmt::Display for Sampling {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Sampling::Greedy => write!(f, "greedy"),
            Sampling::Seeded { temperature } => write!(f, "sampled T={temperature}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_round_trip_through_their_names() {
        for s in [
            "target-only",
            "chain:3",
            "static:3,2,8",
            "dynamic:4,3,16",
            "adaptive",
            "adaptive/no-ahead",
            "chain:4/no-ahead",
        ] {
            let m: Mode = s.parse().unwrap();
            assert_eq!(m.to_string(), s);
        }
        assert_eq!("off".parse::<Mode>(), Ok(Mode::TARGET_ONLY));
        assert!("chain:0".parse::<Mode>().is_err());
        assert!("dynamic:4,3".parse::<Mode>().is_err());
        assert!("tree".parse::<Mode>().is_err());
        let c = Mode::new(Shape::Chain { len: 4 }).speculation();
        assert_eq!(
            (
                c.mode,
                c.depth,
                c.branching,
                c.budget,
                c.disable_draft_ahead
            ),
            (SpeculationMode::Chain as i32, 4, 1, 4, false)
        );
        let a: Mode = "adaptive/no-ahead".parse().unwrap();
        assert_eq!(a.speculation().mode, SpeculationMode::Adaptive as i32);
        assert_eq!(a.speculation().depth, 0);
        assert!(a.speculation().disable_draft_ahead);
    }
}
