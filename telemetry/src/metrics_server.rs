//! `GET /metrics` over plain HTTP/1.1 (hyper), for Prometheus to scrape.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;

use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::TelemetryError;
use crate::metrics::encode_text;

/// The content type of the OpenMetrics text format `prometheus-client` writes.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A bound metrics endpoint, not yet serving. Bind first to learn the port (tests bind
/// port 0), then [`MetricsServer::serve`].
#[derive(Debug)]
pub struct MetricsServer {
    listener: TcpListener,
    registry: &'static Registry,
}

impl MetricsServer {
    /// Binds `addr`, serving the process-wide [`crate::registry()`].
    pub async fn bind(addr: SocketAddr) -> Result<Self, TelemetryError> {
        Self::bind_registry(addr, crate::metrics::registry()).await
    }

    /// Binds `addr`, serving `registry`.
    pub async fn bind_registry(
        addr: SocketAddr,
        registry: &'static Registry,
    ) -> Result<Self, TelemetryError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| TelemetryError::Bind { addr, source })?;
        Ok(Self { listener, registry })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> Result<SocketAddr, TelemetryError> {
        Ok(self.listener.local_addr()?)
    }

    /// Serves scrapes until `shutdown` completes; then stops accepting connections.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> Result<(), TelemetryError> {
        let registry = self.registry;
        tokio::pin!(shutdown);
        loop {
            let (stream, peer) = tokio::select! {
                () = &mut shutdown => return Ok(()),
                accepted = self.listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        // Per-connection errors (e.g. EMFILE, ECONNABORTED) must not end the endpoint.
                        tracing::warn!(error = %err, "metrics endpoint: accept failed");
                        continue;
                    }
                },
            };
            tokio::spawn(async move {
                let service = service_fn(move |request| async move {
                    Ok::<_, Infallible>(respond(&request, registry))
                });
                if let Err(err) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    tracing::debug!(%peer, error = %err, "metrics endpoint: connection error");
                }
            });
        }
    }
}

/// Answers one request: the registry on `GET /metrics`, 404 / 405 otherwise.
fn respond(request: &Request<Incoming>, registry: &Registry) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
        (&Method::GET | &Method::HEAD, "/metrics") => {
            (StatusCode::OK, CONTENT_TYPE, encode_text(registry))
        }
        (_, "/metrics") => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "only GET /metrics\n".to_owned(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found: metrics are at /metrics\n".to_owned(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}

/// Serves the process-wide registry on `addr` at `GET /metrics` until `shutdown` completes.
pub async fn serve_metrics(
    addr: SocketAddr,
    shutdown: impl Future<Output = ()>,
) -> Result<(), TelemetryError> {
    let server = MetricsServer::bind(addr).await?;
    tracing::info!(addr = %server.local_addr()?, "serving Prometheus metrics at /metrics");
    server.serve(shutdown).await
}
