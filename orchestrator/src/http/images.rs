//! Image URLs of chat messages: `data:` URLs (always), remote `http://` and `https://` URLs
//! only when the server allows fetching (with a size limit enforced while the body streams in,
//! and one timeout over connect, TLS handshake and body). Sizes are checked before any
//! decoding. HTTPS trusts the Mozilla roots (`webpki-roots`, compiled in) plus an optional
//! PEM bundle (`--remote-image-ca-file`); rustls runs on the `ring` provider, passed
//! explicitly, so no process-wide default provider is needed. Redirects are not followed.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;

use super::error::ApiError;
use crate::error::OrchestratorError;

/// The HTTP(S) client of remote image fetches.
type FetchClient = Client<HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// Why the remote image client could not be set up (at start-up).
#[derive(Debug, thiserror::Error)]
pub enum RemoteImagesError {
    /// The CA bundle could not be read or is not PEM.
    #[error("reading the CA bundle {path}: {source}")]
    CaFile {
        /// The bundle.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// The CA bundle holds no certificate.
    #[error("the CA bundle {0} holds no PEM certificate")]
    NoCertificates(PathBuf),
    /// A certificate of the bundle is not a usable trust anchor.
    #[error("a certificate of the CA bundle {path} is not a usable CA: {source}")]
    BadCertificate {
        /// The bundle.
        path: PathBuf,
        /// What rustls said.
        #[source]
        source: rustls::Error,
    },
    /// rustls refused the TLS configuration.
    #[error("setting up TLS: {0}")]
    Tls(#[from] rustls::Error),
}

/// How remote image URLs are treated: refused, or fetched with a shared client.
#[derive(Clone)]
pub struct RemoteImages {
    /// The client (`None`: remote URLs are refused).
    client: Option<FetchClient>,
    /// Timeout of one fetch: connect, TLS handshake, response and body.
    timeout: Duration,
}

impl fmt::Debug for RemoteImages {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteImages")
            .field("allow", &self.client.is_some())
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl RemoteImages {
    /// Remote URLs are refused (400); only `data:` URLs work.
    pub fn refused() -> Self {
        Self {
            client: None,
            timeout: Duration::ZERO,
        }
    }

    /// Remote `http://` and `https://` URLs are fetched within `timeout`; HTTPS trusts the
    /// Mozilla roots and the PEM certificates of `extra_ca`, when given.
    pub fn fetched(timeout: Duration, extra_ca: Option<&Path>) -> Result<Self, RemoteImagesError> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = extra_ca {
            for cert in read_pem_certificates(path)? {
                roots
                    .add(cert)
                    .map_err(|source| RemoteImagesError::BadCertificate {
                        path: path.to_path_buf(),
                        source,
                    })?;
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .build();
        Ok(Self {
            client: Some(Client::builder(TokioExecutor::new()).build(connector)),
            timeout,
        })
    }

    /// Whether remote URLs are fetched.
    pub fn allowed(&self) -> bool {
        self.client.is_some()
    }
}

/// The certificates of a PEM bundle (other PEM sections are skipped); at least one.
fn read_pem_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, RemoteImagesError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|source| RemoteImagesError::CaFile {
            path: path.to_path_buf(),
            source,
        })?;
    if certs.is_empty() {
        return Err(RemoteImagesError::NoCertificates(path.to_path_buf()));
    }
    Ok(certs)
}

/// The bytes of the image at `url`, at most `max_bytes` of them.
pub async fn load(url: &str, max_bytes: usize, remote: &RemoteImages) -> Result<Vec<u8>, ApiError> {
    if let Some(rest) = url.strip_prefix("data:") {
        return decode_data_url(rest, max_bytes);
    }
    let scheme = url.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
    match (scheme.as_deref(), &remote.client) {
        (Some("http" | "https"), None) => Err(ApiError::bad(
            "messages",
            "remote image URLs are not fetched by this server: send the image as a \
             `data:image/...;base64,...` URL (or start it with --allow-remote-images)",
        )),
        (Some("http" | "https"), Some(client)) => {
            fetch(client, url, max_bytes, remote.timeout).await
        }
        _ => Err(ApiError::bad(
            "messages",
            "image_url.url must be a data: URL (or an http(s) URL when remote images are allowed)",
        )),
    }
}

/// Decodes the part of a `data:` URL after `data:`; base64 only.
fn decode_data_url(rest: &str, max_bytes: usize) -> Result<Vec<u8>, ApiError> {
    let Some((meta, payload)) = rest.split_once(',') else {
        return Err(ApiError::bad("messages", "malformed data: URL (no comma)"));
    };
    if !meta.ends_with(";base64") {
        return Err(ApiError::bad(
            "messages",
            "data: image URLs must be base64 (`data:image/png;base64,...`)",
        ));
    }
    // Checked before decoding: 4 base64 characters hold 3 bytes.
    let approx = payload.len() / 4 * 3;
    if approx > max_bytes.saturating_add(3) {
        return Err(too_large(format!(
            "image of about {approx} bytes exceeds the limit of {max_bytes} bytes"
        )));
    }
    base64::engine::general_purpose::STANDARD
        .decode(payload.trim())
        .map_err(|e| ApiError::bad("messages", format!("data: URL is not valid base64: {e}")))
}

/// A 413.
fn too_large(message: String) -> ApiError {
    OrchestratorError::TooLarge(message).into()
}

/// An error with its sources (hyper's own message is only "client error (Connect)"; the
/// cause, e.g. rustls' "invalid peer certificate: UnknownIssuer", is further down).
fn with_causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

/// GETs an `http(s)://` URL: one timeout over connect, TLS handshake, response and body; the
/// body refused (413) as soon as it passes `max_bytes`, whatever `Content-Length` says;
/// anything but 200..=299 refused (redirects are not followed).
async fn fetch(
    client: &FetchClient,
    url: &str,
    max_bytes: usize,
    timeout: Duration,
) -> Result<Vec<u8>, ApiError> {
    let uri: hyper::Uri = url
        .parse()
        .map_err(|e| ApiError::bad("messages", format!("bad image URL {url:?}: {e}")))?;
    let fetch_err = |what: String| ApiError::bad("messages", format!("fetching {url}: {what}"));
    let work = async {
        let resp = client
            .get(uri)
            .await
            .map_err(|e| fetch_err(with_causes(&e)))?;
        let status = resp.status();
        if status.is_redirection() {
            let to = resp
                .headers()
                .get(hyper::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("?");
            return Err(fetch_err(format!(
                "status {status}, redirecting to {to}: redirects are not followed, send the \
                 final URL"
            )));
        }
        if !status.is_success() {
            return Err(fetch_err(format!("status {status}")));
        }
        // A declared length over the limit is refused before reading anything.
        let declared = resp
            .headers()
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if let Some(len) = declared
            && len > max_bytes as u64
        {
            return Err(too_large(format!(
                "image at {url} ({len} bytes) exceeds the limit of {max_bytes} bytes"
            )));
        }
        let body = Limited::new(resp.into_body(), max_bytes)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    too_large(format!(
                        "image at {url} exceeds the limit of {max_bytes} bytes"
                    ))
                } else {
                    fetch_err(with_causes(e.as_ref()))
                }
            })?;
        Ok(body.to_bytes().to_vec())
    };
    tokio::time::timeout(timeout, work).await.map_err(|_| {
        fetch_err(format!(
            "no complete answer within {} ms",
            timeout.as_millis()
        ))
    })?
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use tokio::net::TcpListener;

    use specllava_harness::pki::TestPki;
    use specllava_harness::test_host;

    use super::*;

    const PNG: &[u8] = b"\x89PNG\r\n\x1a\n not really, but bytes";

    #[tokio::test]
    async fn data_urls_and_refusals() {
        let off = RemoteImages::refused();
        assert!(!off.allowed());
        assert_eq!(
            load("data:image/png;base64,aGk=", 10, &off).await.unwrap(),
            b"hi"
        );
        let big = format!("data:image/png;base64,{}", "A".repeat(400));
        assert!(matches!(
            load(&big, 10, &off).await,
            Err(ApiError::Orchestrator(OrchestratorError::TooLarge(_)))
        ));
        for url in [
            "http://example.com/a.png",
            "https://example.com/a.png",
            "data:image/png,raw",
            "file:///etc/passwd",
        ] {
            assert!(
                matches!(load(url, 10, &off).await, Err(ApiError::BadRequest { .. })),
                "{url}"
            );
        }
        let on = RemoteImages::fetched(Duration::from_secs(1), None).unwrap();
        assert!(matches!(
            load("ftp://example.com/a.png", 10, &on).await,
            Err(ApiError::BadRequest { .. })
        ));
    }

    /// Serves (TLS when `tls` is given) by path: `/ok.png` the PNG with its length,
    /// `/stream` 1 MB without a length, `/declared` a length of 1 MB, `/moved` a redirect,
    /// `/slow` nothing for 10 s, else 404; its base URL.
    async fn start(tls: Option<tokio_rustls::TlsAcceptor>) -> String {
        test_host::serve(tls, |path| async move {
            let mut out = Vec::new();
            match path.as_str() {
                "/ok.png" => {
                    write!(
                        out,
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
                        PNG.len()
                    )
                    .unwrap();
                    out.extend_from_slice(PNG);
                }
                "/stream" => {
                    out.extend_from_slice(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n");
                    out.resize(out.len() + (1 << 20), b'x');
                }
                "/declared" => {
                    out.extend_from_slice(b"HTTP/1.1 200 OK\r\nContent-Length: 1048576\r\n\r\n")
                }
                "/moved" => out.extend_from_slice(
                    b"HTTP/1.1 302 Found\r\nLocation: /ok.png\r\nContent-Length: 0\r\n\r\n",
                ),
                "/slow" => tokio::time::sleep(Duration::from_secs(10)).await,
                _ => out.extend_from_slice(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"),
            }
            out
        })
        .await
    }

    fn status_of(r: Result<Vec<u8>, ApiError>) -> (u16, String) {
        let e = r.expect_err("an error");
        let status = match &e {
            ApiError::BadRequest { .. } => 400,
            ApiError::Orchestrator(OrchestratorError::TooLarge(_)) => 413,
            other => panic!("unexpected {other:?}"),
        };
        (status, e.to_string())
    }

    #[tokio::test]
    async fn http_fetch_limits_redirects_and_timeout() {
        let base = start(None).await;
        let remote = RemoteImages::fetched(Duration::from_millis(500), None).unwrap();
        let url = |p: &str| format!("{base}{p}");
        assert_eq!(load(&url("/ok.png"), 1000, &remote).await.unwrap(), PNG);
        let (s, m) = status_of(load(&url("/stream"), 1000, &remote).await);
        assert_eq!(s, 413, "{m}");
        let (s, m) = status_of(load(&url("/declared"), 1000, &remote).await);
        assert_eq!(s, 413, "{m}");
        let (s, m) = status_of(load(&url("/moved"), 1000, &remote).await);
        assert!(s == 400 && m.contains("redirects are not followed"), "{m}");
        let (s, m) = status_of(load(&url("/missing"), 1000, &remote).await);
        assert!(s == 400 && m.contains("404"), "{m}");
        let (s, m) = status_of(load(&url("/slow"), 1000, &remote).await);
        assert!(s == 400 && m.contains("within 500 ms"), "{m}");
        // Nothing listens on the port of a dropped listener.
        let dead = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead_url = format!("http://{}/a.png", dead.local_addr().unwrap());
        drop(dead);
        let (s, m) = status_of(load(&dead_url, 1000, &remote).await);
        assert_eq!(s, 400, "{m}");
    }

    #[tokio::test]
    async fn https_trusts_the_ca_file_only() {
        let pki = TestPki::generate();
        let base = start(Some(pki.acceptor())).await;
        let ok = format!("{base}/ok.png");

        // Not signed by a Mozilla root: refused with rustls' reason.
        let plain = RemoteImages::fetched(Duration::from_secs(5), None).unwrap();
        let (s, m) = status_of(load(&ok, 1000, &plain).await);
        assert!(s == 400 && m.contains("certificate"), "{m}");

        let trusted = RemoteImages::fetched(Duration::from_secs(5), Some(&pki.ca)).unwrap();
        assert_eq!(load(&ok, 1000, &trusted).await.unwrap(), PNG);
        let (s, m) = status_of(load(&format!("{base}/stream"), 1000, &trusted).await);
        assert_eq!(s, 413, "{m}");
        // Plain HTTP still works with the same client.
        let http = start(None).await;
        assert_eq!(
            load(&format!("{http}/ok.png"), 1000, &trusted)
                .await
                .unwrap(),
            PNG
        );
    }

    #[test]
    fn bad_ca_files_fail_at_start() {
        let missing =
            RemoteImages::fetched(Duration::from_secs(1), Some(Path::new("/nonexistent.pem")));
        assert!(
            matches!(missing, Err(RemoteImagesError::CaFile { .. })),
            "{missing:?}"
        );
        let mut empty = tempfile::NamedTempFile::new().unwrap();
        empty.write_all(b"no PEM here\n").unwrap();
        let got = RemoteImages::fetched(Duration::from_secs(1), Some(empty.path()));
        assert!(
            matches!(got, Err(RemoteImagesError::NoCertificates(_))),
            "{got:?}"
        );
    }
}
