//! Bearer-token authentication of the public APIs: the accepted tokens ([`ApiKeys`], from
//! `--api-keys` / `SPECLLAVA_API_KEYS` and a file of one token per line), the check of an
//! `authorization: Bearer <token>` header in constant time over every configured token,
//! and the gRPC interceptor ([`BearerAuth`]) that applies it. The HTTP API applies the
//! same [`ApiKeys::check`] and answers its refusals in OpenAI's 401 shape.
//!
//! On gRPC, a missing or malformed header is `UNAUTHENTICATED` and a well-formed but
//! unknown token `PERMISSION_DENIED` ([`AuthError`], mapped to statuses here only).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use subtle::{Choice, ConstantTimeEq};
use tonic::{Request, Status};

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `authorization` header.
    #[error("missing credentials: send `authorization: Bearer <token>`")]
    Missing,
    /// An `authorization` header that is not `Bearer <token>`.
    #[error("malformed authorization header: expected `Bearer <token>`")]
    Malformed,
    /// A well-formed token that is not one of the configured ones.
    #[error("the bearer token is not accepted")]
    Unknown,
}

impl AuthError {
    /// Short stable label for metrics (`errors_total{type=...}`).
    pub fn error_type(self) -> &'static str {
        match self {
            AuthError::Missing | AuthError::Malformed => "unauthenticated",
            AuthError::Unknown => "permission_denied",
        }
    }
}

impl From<AuthError> for Status {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Missing | AuthError::Malformed => Status::unauthenticated(e.to_string()),
            AuthError::Unknown => Status::permission_denied(e.to_string()),
        }
    }
}

/// Why the tokens could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    /// The token file could not be read.
    #[error("reading the API key file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// Where the public APIs' bearer tokens come from (flattened into the orchestrator's
/// flags; both are also environment variables). Tokens from both sources are accepted;
/// none configured: no authentication.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AuthArgs {
    /// Bearer tokens the public APIs (gRPC and HTTP) accept, comma-separated (with
    /// --api-keys-file: either). None: no authentication.
    #[arg(
        long,
        env = "SPECLLAVA_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_keys: Vec<String>,
    /// File of bearer tokens the public APIs accept, one per line (blank lines and lines
    /// starting with `#` are skipped).
    #[arg(long, env = "SPECLLAVA_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,
}

impl AuthArgs {
    /// The tokens these flags give (reads the file).
    pub fn load(&self) -> Result<ApiKeys, KeysError> {
        ApiKeys::load(&self.api_keys, self.api_keys_file.as_deref())
    }
}

/// The accepted bearer tokens; empty: every request is accepted.
#[derive(Clone, Default)]
pub struct ApiKeys {
    keys: Vec<Box<[u8]>>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the tokens themselves.
        f.debug_struct("ApiKeys")
            .field("count", &self.keys.len())
            .finish()
    }
}

impl ApiKeys {
    /// These tokens (trimmed; empty ones dropped).
    pub fn new<S: AsRef<str>>(keys: impl IntoIterator<Item = S>) -> Self {
        let mut set: Vec<Box<[u8]>> = Vec::new();
        for k in keys {
            let k = k.as_ref().trim();
            if !k.is_empty() && !set.iter().any(|s| &**s == k.as_bytes()) {
                set.push(k.as_bytes().into());
            }
        }
        Self { keys: set }
    }

    /// The tokens of a token file's text: one per line, blank lines and `#` comments
    /// skipped, surrounding whitespace trimmed.
    pub fn parse_file(text: &str) -> Vec<&str> {
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .collect()
    }

    /// The tokens of `inline` plus those of `file` (see [`ApiKeys::parse_file`]).
    pub fn load(inline: &[String], file: Option<&Path>) -> Result<Self, KeysError> {
        let text = match file {
            Some(path) => std::fs::read_to_string(path).map_err(|source| KeysError::Read {
                path: path.to_path_buf(),
                source,
            })?,
            None => String::new(),
        };
        let from_file = Self::parse_file(&text);
        Ok(Self::new(
            inline.iter().map(String::as_str).chain(from_file),
        ))
    }

    /// Whether no token is configured (authentication off).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// How many tokens are configured.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether `token` is one of the tokens. Every configured token is compared, each over
    /// the whole of the longer of the two, without early exit: the time taken does not
    /// depend on which bytes match nor on which token (if any) matched.
    pub fn contains(&self, token: &[u8]) -> bool {
        let mut found = Choice::from(0);
        for key in &self.keys {
            found |= ct_eq_padded(key, token);
        }
        found.into()
    }

    /// Checks the value of an `authorization` header (`None`: absent) when tokens are
    /// configured; always `Ok` when none are.
    pub fn check(&self, authorization: Option<&[u8]>) -> Result<(), AuthError> {
        if self.is_empty() {
            return Ok(());
        }
        let token = bearer_token(authorization.ok_or(AuthError::Missing)?)?;
        if self.contains(token) {
            Ok(())
        } else {
            Err(AuthError::Unknown)
        }
    }
}

/// `a == b` in time that depends only on the longer length.
fn ct_eq_padded(a: &[u8], b: &[u8]) -> Choice {
    let n = a.len().max(b.len());
    let mut diff = 0u8;
    for i in 0..n {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0);
    }
    diff.ct_eq(&0) & a.len().ct_eq(&b.len())
}

/// The token of an `authorization: Bearer <token>` header value (the scheme is
/// case-insensitive, RFC 6750); `Malformed` for any other scheme or an empty token.
pub fn bearer_token(header: &[u8]) -> Result<&[u8], AuthError> {
    let (scheme, rest) = header.split_at_checked(6).ok_or(AuthError::Malformed)?;
    if !scheme.eq_ignore_ascii_case(b"Bearer") || !rest.starts_with(b" ") {
        return Err(AuthError::Malformed);
    }
    let token = rest.trim_ascii();
    if token.is_empty() {
        return Err(AuthError::Malformed);
    }
    Ok(token)
}

/// A tonic interceptor requiring a configured bearer token on every call of the service it
/// wraps (`UNAUTHENTICATED` / `PERMISSION_DENIED` otherwise); with no token configured it
/// lets every call through.
#[derive(Debug, Clone)]
pub struct BearerAuth {
    keys: Arc<ApiKeys>,
}

impl BearerAuth {
    /// An interceptor accepting `keys`.
    pub fn new(keys: Arc<ApiKeys>) -> Self {
        Self { keys }
    }
}

impl tonic::service::Interceptor for BearerAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let header = request
            .metadata()
            .get("authorization")
            .map(|v| v.as_bytes());
        match self.keys.check(header) {
            Ok(()) => Ok(request),
            Err(e) => {
                let status = Status::from(e);
                tracing::debug!(error = %e, "request refused");
                specllava_telemetry::metrics().record_error(e.error_type(), status.code());
                Err(status)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;
    use tonic::service::Interceptor;

    #[test]
    fn token_file_skips_comments_and_blank_lines() {
        let text = "# ops team\nalpha\n\n   beta  \n#gamma\n";
        assert_eq!(ApiKeys::parse_file(text), ["alpha", "beta"]);
    }

    #[test]
    fn keys_load_from_flags_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("keys");
        std::fs::write(&file, "# comment\nfrom-file\nshared\n").unwrap();
        let keys = ApiKeys::load(
            &["inline".into(), " shared ".into(), "".into()],
            Some(&file),
        )
        .unwrap();
        assert_eq!(keys.len(), 3);
        for k in ["inline", "from-file", "shared"] {
            assert!(keys.contains(k.as_bytes()), "{k}");
        }
        assert!(!keys.contains(b"comment") && !keys.contains(b"# comment"));
        let missing = ApiKeys::load(&[], Some(&dir.path().join("nope"))).unwrap_err();
        assert!(missing.to_string().contains("nope"), "{missing}");
        assert!(
            !format!("{keys:?}").contains("inline"),
            "Debug never shows tokens"
        );
    }

    #[test]
    fn comparison_needs_the_whole_token() {
        let keys = ApiKeys::new(["secret-token", "other"]);
        assert!(keys.contains(b"secret-token") && keys.contains(b"other"));
        for wrong in [
            &b"secret-toke"[..],
            b"secret-tokenX",
            b"",
            b"secret-tokeN",
            b"othe",
        ] {
            assert!(!keys.contains(wrong), "{}", String::from_utf8_lossy(wrong));
        }
        // Zero padding does not make a prefix equal.
        assert!(!ApiKeys::new(["ab"]).contains(b"ab\0"));
    }

    #[test]
    fn headers_map_to_the_right_refusal() {
        let keys = ApiKeys::new(["tok"]);
        assert_eq!(keys.check(None), Err(AuthError::Missing));
        for bad in [
            &b"tok"[..],
            b"Basic dG9rOg==",
            b"Bearer",
            b"Bearer ",
            b"Bearertok",
        ] {
            assert_eq!(keys.check(Some(bad)), Err(AuthError::Malformed), "{bad:?}");
        }
        assert_eq!(keys.check(Some(b"Bearer nope")), Err(AuthError::Unknown));
        assert_eq!(keys.check(Some(b"Bearer tok")), Ok(()));
        assert_eq!(keys.check(Some(b"bearer  tok ")), Ok(()));
        assert_eq!(ApiKeys::default().check(None), Ok(()), "no keys: open");
    }

    #[test]
    fn interceptor_answers_unauthenticated_and_permission_denied() {
        let mut auth = BearerAuth::new(Arc::new(ApiKeys::new(["tok"])));
        let call = |auth: &mut BearerAuth, header: Option<&str>| {
            let mut req = Request::new(());
            if let Some(h) = header {
                req.metadata_mut()
                    .insert("authorization", h.parse().unwrap());
            }
            auth.call(req).map(|_| ()).map_err(|s| s.code())
        };
        assert_eq!(call(&mut auth, None), Err(Code::Unauthenticated));
        assert_eq!(call(&mut auth, Some("Basic x")), Err(Code::Unauthenticated));
        assert_eq!(
            call(&mut auth, Some("Bearer nope")),
            Err(Code::PermissionDenied)
        );
        assert_eq!(call(&mut auth, Some("Bearer tok")), Ok(()));
    }
}
