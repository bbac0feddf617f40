//! Fault injection for the end-to-end tests: OFF unless the `SPECLLAVA_FAULT_INJECT`
//! environment variable is set, which no deployment does.
//!
//! `SPECLLAVA_FAULT_INJECT=panic-on-token:<id>` makes the target's verification panic on a
//! tree that drafts token `<id>` (below the root; as a broken invariant would, on the worker
//! thread, half-way through a batch), so that the tests can check a panic is contained.

use std::sync::OnceLock;

/// The environment variable that turns fault injection on.
pub const ENV: &str = "SPECLLAVA_FAULT_INJECT";

/// The injected fault, read from [`ENV`] once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Panic while verifying a tree that drafts this token.
    PanicOnToken(u32),
}

impl Fault {
    /// Parses the value of [`ENV`].
    pub fn parse(value: &str) -> Option<Self> {
        let id = value.strip_prefix("panic-on-token:")?;
        id.trim().parse().ok().map(Fault::PanicOnToken)
    }

    /// The fault this process injects, if any (a value that does not parse is logged and
    /// ignored).
    pub fn get() -> Option<Fault> {
        static FAULT: OnceLock<Option<Fault>> = OnceLock::new();
        *FAULT.get_or_init(|| {
            let value = std::env::var(ENV).ok()?;
            let fault = Fault::parse(&value);
            match fault {
                Some(f) => tracing::warn!(?f, "{ENV} is set: FAULT INJECTION ON (tests only)"),
                None => tracing::error!(%value, "{ENV} is not `panic-on-token:<id>`; ignored"),
            }
            fault
        })
    }
}

/// Panics when fault injection asks for a panic on one of `tokens` (a tree's drafted nodes).
pub fn panic_on_injected_token(tokens: &[u32]) {
    if let Some(Fault::PanicOnToken(t)) = Fault::get() {
        assert!(
            !tokens.contains(&t),
            "fault injection ({ENV}): panic on token {t}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_one_fault() {
        assert_eq!(
            Fault::parse("panic-on-token:17"),
            Some(Fault::PanicOnToken(17))
        );
        assert_eq!(Fault::parse("panic-on-token:x"), None);
        assert_eq!(Fault::parse("something"), None);
    }
}
