//! Spec-LLaVA benchmark harness.
//!
//! Drives the orchestrator's public gRPC API on a fixed evaluation set and compares decoding
//! modes (target-only, chains, static and dynamic trees, the adaptive budget) run interleaved in
//! the same process, checking every output against target-only output. Also measures the cost
//! model behind the budget policy in-process against a roofline ([`calibrate`]).
//!
//! - [`evalset`]: the images and prompts.
//! - [`modes`]: decoding modes and sampling settings.
//! - [`driver`]: one timed `Generate` call.
//! - [`check`]: the losslessness check.
//! - [`report`]: aggregation, JSON, markdown.
//! - [`plots`]: SVG figures.
//! - [`calibrate`], [`roofline`]: the in-process cost model.
//! - [`soak`]: the soak / load test (concurrent mixed requests, RSS, losslessness).
//! - [`stats`]: medians, percentiles, fits.

pub mod calibrate;
pub mod check;
pub mod driver;
pub mod evalset;
pub mod metrics;
pub mod modes;
pub mod pairs;
pub mod plots;
pub mod probes;
pub mod report;
pub mod roofline;
pub mod runner;
pub mod soak;
pub mod stats;

/// Spawning the service binaries (shared with the end-to-end tests).
pub use specllava_harness as services;

pub use calibrate::{Calibration, CalibrationError, CalibrationPlan, calibrate, measure_rates};
