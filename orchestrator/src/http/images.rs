//! Image URLs of chat messages: `data:` URLs (always), remote `http://` URLs only when the
//! server allows fetching (with a size limit and a timeout). Sizes are checked before any
//! decoding.

use std::time::Duration;

use base64::Engine as _;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::error::ApiError;
use crate::error::OrchestratorError;

/// How remote image URLs are treated.
#[derive(Debug, Clone, Copy)]
pub struct RemoteImages {
    /// Fetch `http://` URLs (else they are refused).
    pub allow: bool,
    /// Timeout of one fetch.
    pub timeout: Duration,
}

/// The bytes of the image at `url`, at most `max_bytes` of them.
pub async fn load(url: &str, max_bytes: usize, remote: RemoteImages) -> Result<Vec<u8>, ApiError> {
    if let Some(rest) = url.strip_prefix("data:") {
        return decode_data_url(rest, max_bytes);
    }
    let scheme = url.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
    match scheme.as_deref() {
        Some("http") | Some("https") if !remote.allow => Err(ApiError::bad(
            "messages",
            "remote image URLs are not fetched by this server: send the image as a \
             `data:image/...;base64,...` URL (or start it with --allow-remote-images)",
        )),
        Some("http") => fetch(url, max_bytes, remote.timeout).await,
        Some("https") => Err(ApiError::bad(
            "messages",
            "https image URLs are not supported (this build has no TLS client): send a data: URL",
        )),
        _ => Err(ApiError::bad(
            "messages",
            "image_url.url must be a data: URL (or an http URL when remote images are allowed)",
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
        return Err(OrchestratorError::TooLarge(format!(
            "image of about {approx} bytes exceeds the limit of {max_bytes} bytes"
        ))
        .into());
    }
    base64::engine::general_purpose::STANDARD
        .decode(payload.trim())
        .map_err(|e| ApiError::bad("messages", format!("data: URL is not valid base64: {e}")))
}

/// GETs an `http://` URL under a timeout, reading at most `max_bytes`.
async fn fetch(url: &str, max_bytes: usize, timeout: Duration) -> Result<Vec<u8>, ApiError> {
    let uri: hyper::Uri = url
        .parse()
        .map_err(|e| ApiError::bad("messages", format!("bad image URL: {e}")))?;
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<bytes::Bytes>>();
    let fetch_err = |what: String| ApiError::bad("messages", format!("fetching {url}: {what}"));
    let work = async {
        let resp = client
            .get(uri)
            .await
            .map_err(|e| fetch_err(e.to_string()))?;
        if !resp.status().is_success() {
            return Err(fetch_err(format!("status {}", resp.status())));
        }
        let body = Limited::new(resp.into_body(), max_bytes)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    ApiError::from(OrchestratorError::TooLarge(format!(
                        "image at {url} exceeds the limit of {max_bytes} bytes"
                    )))
                } else {
                    fetch_err(e.to_string())
                }
            })?;
        Ok(body.to_bytes().to_vec())
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| fetch_err(format!("no answer within {} ms", timeout.as_millis())))?
}

#[cfg(test)]
mod tests {
    use super::*;

    const OFF: RemoteImages = RemoteImages {
        allow: false,
        timeout: Duration::from_secs(1),
    };

    #[tokio::test]
    async fn data_urls_and_refusals() {
        assert_eq!(
            load("data:image/png;base64,aGk=", 10, OFF).await.unwrap(),
            b"hi"
        );
        let big = format!("data:image/png;base64,{}", "A".repeat(400));
        assert!(matches!(
            load(&big, 10, OFF).await,
            Err(ApiError::Orchestrator(OrchestratorError::TooLarge(_)))
        ));
        for url in [
            "http://example.com/a.png",
            "data:image/png,raw",
            "file:///etc/passwd",
        ] {
            assert!(
                matches!(load(url, 10, OFF).await, Err(ApiError::BadRequest { .. })),
                "{url}"
            );
        }
    }
}
