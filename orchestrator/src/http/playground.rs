//! The web playground, served on the HTTP API's port: `/` (the page), `/playground/app.js`,
//! `/playground/style.css`, embedded in the binary. The page chats over
//! `/v1/chat/completions` with the `speculation_steps` extension and draws each step's tree;
//! it needs no route of its own beyond these files (bearer tokens, when on, are sent by the
//! page with its API calls).

use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::response::IntoResponse;

const INDEX: &str = include_str!("playground/index.html");
const APP: &str = include_str!("playground/app.js");
const STYLE: &str = include_str!("playground/style.css");

/// One embedded file with its content type.
fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [(CONTENT_TYPE, content_type), (CACHE_CONTROL, "no-cache")],
        body,
    )
}

/// `GET /`: the page.
pub async fn index() -> impl IntoResponse {
    asset("text/html; charset=utf-8", INDEX)
}

/// `GET /playground/app.js`.
pub async fn app() -> impl IntoResponse {
    asset("text/javascript; charset=utf-8", APP)
}

/// `GET /playground/style.css`.
pub async fn style() -> impl IntoResponse {
    asset("text/css; charset=utf-8", STYLE)
}
