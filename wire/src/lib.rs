//! The wire edge: every mapping between the `specllava.v1` messages and the domain types of
//! [`speculate`] ([`convert`]), and the identity rules a draft and a target must satisfy to
//! be paired ([`compat`]). Shared by the orchestrator and the model services; links no candle.

pub mod compat;
pub mod convert;
