//! Server helpers: graceful shutdown, the standard gRPC side services, and
//! [`serve_grpc`], which runs one Spec-LLaVA gRPC service with all of them.

use std::future::Future;
use std::net::SocketAddr;

use tonic::service::Routes;

use crate::drain::Drain;

/// Serves `routes` (one `specllava.v1` service, named `service_name` for the health
/// protocol) on `listen` with gRPC health, reflection, the tracing layer and, when
/// `metrics_addr` is set, a Prometheus `/metrics` endpoint; returns after SIGTERM /
/// ctrl-c once in-flight requests have drained. With a TLS configuration in `tls` (see
/// [`crate::tls::ServerTlsArgs`]) every service on the port, health and reflection
/// included, is served over TLS only (and needs a client certificate when it has a client
/// CA); the metrics endpoint stays plain HTTP for the scraper, and `tls.health_listen`
/// serves the health service alone in plaintext (for Kubernetes probes), until the drain
/// ends.
///
/// Health is SERVING from the start, and turns NOT_SERVING (for `service_name` and the
/// server as a whole, `""`, which the Kubernetes probes ask about) when `dead` resolves
/// (the model worker died: the liveness probe restarts the pod) and when the drain starts.
pub async fn serve_grpc(
    listen: SocketAddr,
    service_name: &'static str,
    routes: Routes,
    metrics_addr: Option<SocketAddr>,
    dead: impl Future<Output = ()> + Send + 'static,
    tls: crate::tls::ServerTls,
    drain: Drain,
) -> anyhow::Result<()> {
    let mut builder = tonic::transport::Server::builder();
    let secure = tls.config.is_some();
    if let Some(tls) = tls.config {
        builder = builder
            .tls_config(tls)
            .map_err(|e| anyhow::anyhow!("TLS configuration (--tls-*): {e}"))?;
    }
    let (health, health_service) = Health::new(service_name).await;
    let watcher = health.not_serving_when(dead, "the model worker died");
    let (reflection_v1, reflection_v1alpha) = reflection_services()?;
    let metrics = MetricsEndpoint::start_if(metrics_addr).await?;
    let health_port = match tls.health_listen {
        Some(addr) => Some(health.serve_plaintext(addr).await?),
        None => None,
    };
    tracing::info!(%listen, service = service_name, tls = secure, "listening");
    let shutdown = {
        let health = health.clone();
        // The worker stops once the server drained: that is no death.
        let watcher = watcher.abort_handle();
        async move {
            drain.started().await;
            watcher.abort();
            health.not_serving("draining").await;
        }
    };
    let served = builder
        .layer(specllava_telemetry::GrpcTraceLayer)
        .add_routes(routes)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .serve_with_shutdown(listen, shutdown)
        .await;
    watcher.abort();
    if let Some((stop, task)) = health_port {
        let _ = stop.send(());
        let _ = task.await;
    }
    served?;
    if let Some(m) = metrics {
        m.stop().await;
    }
    Ok(())
}

/// The gRPC health of one service: what the standard health protocol reports for it and
/// for the server as a whole (`""`).
#[derive(Clone)]
pub struct Health {
    reporter: tonic_health::server::HealthReporter,
    service_name: &'static str,
}

impl Health {
    /// SERVING health for `service_name`, and the health service that reports it.
    pub async fn new(
        service_name: &'static str,
    ) -> (
        Self,
        tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService>,
    ) {
        let reporter = tonic_health::server::HealthReporter::new();
        let service = tonic_health::server::HealthService::from_health_reporter(reporter.clone());
        let health = Self {
            reporter,
            service_name,
        };
        health.set(tonic_health::ServingStatus::Serving).await;
        (
            health,
            tonic_health::pb::health_server::HealthServer::new(service),
        )
    }

    /// Serves this health alone, in plaintext, on `addr` (bound now: a taken address fails
    /// here) until the returned sender fires.
    pub async fn serve_plaintext(
        &self,
        addr: SocketAddr,
    ) -> anyhow::Result<(
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    )> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("binding the health port {addr}: {e}"))?;
        tracing::info!(addr = %listener.local_addr()?, "plaintext health port");
        let service = tonic_health::pb::health_server::HealthServer::new(
            tonic_health::server::HealthService::from_health_reporter(self.reporter.clone()),
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let served = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    async {
                        let _ = stopped.await;
                    },
                )
                .await;
            if let Err(e) = served {
                tracing::warn!(error = %e, "health port stopped");
            }
        });
        Ok((stop, task))
    }

    /// Reports NOT_SERVING once `event` resolves, for `why` (a background task).
    pub fn not_serving_when(
        &self,
        event: impl Future<Output = ()> + Send + 'static,
        why: &'static str,
    ) -> tokio::task::JoinHandle<()> {
        let health = self.clone();
        tokio::spawn(async move {
            event.await;
            health.not_serving(why).await;
        })
    }

    /// Reports NOT_SERVING from now on, for `why` (logged).
    pub async fn not_serving(&self, why: &str) {
        tracing::warn!(service = self.service_name, why, "health: NOT_SERVING");
        self.set(tonic_health::ServingStatus::NotServing).await;
    }

    async fn set(&self, status: tonic_health::ServingStatus) {
        for name in ["", self.service_name] {
            self.reporter.set_service_status(name, status).await;
        }
    }
}
/// The reflection services (v1, and v1alpha for older grpcurl) serving the
/// `specllava.v1` descriptors plus the health protocol's, so `grpcurl list`
/// and `grpcurl describe` work without local protos.
#[allow(clippy::type_complexity)]
pub fn reflection_services() -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    tonic_reflection::server::Error,
> {
    let v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(specllava_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(specllava_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    Ok((v1, v1alpha))
}

/// A running Prometheus `/metrics` endpoint; stop it with [`MetricsEndpoint::stop`]
/// after the gRPC server drained (dropping it stops it too).
#[derive(Debug)]
pub struct MetricsEndpoint {
    addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl MetricsEndpoint {
    /// Binds `addr` (fails fast on a bad or taken address) and serves the process-wide
    /// `specllava_*` registry at `GET /metrics` on a background task.
    pub async fn start(
        addr: std::net::SocketAddr,
    ) -> Result<Self, specllava_telemetry::TelemetryError> {
        let server = specllava_telemetry::MetricsServer::bind(addr).await?;
        let addr = server.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            if let Err(e) = server.serve(shutdown).await {
                tracing::warn!(error = %e, "metrics endpoint stopped");
            }
        });
        tracing::info!(%addr, "serving Prometheus metrics at /metrics");
        Ok(Self {
            addr,
            stop: Some(stop),
            task,
        })
    }

    /// [`MetricsEndpoint::start`] when an address is configured.
    pub async fn start_if(
        addr: Option<std::net::SocketAddr>,
    ) -> Result<Option<Self>, specllava_telemetry::TelemetryError> {
        match addr {
            Some(addr) => Ok(Some(Self::start(addr).await?)),
            None => Ok(None),
        }
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// Stops accepting scrapes and waits for the accept loop to end.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}

impl Drop for MetricsEndpoint {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Runs a service binary's `run` future with telemetry set up for `service_name` (logs,
/// OTLP span export when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, W3C propagation), then
/// flushes the last spans once the server drained.
pub async fn run_with_telemetry(
    service_name: &str,
    log_json: bool,
    run: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let telemetry = specllava_telemetry::init_telemetry(service_name, log_json)?;
    let result = run.await;
    // The flush blocks on the exporter, which runs on this (multi-threaded) runtime.
    tokio::task::block_in_place(|| drop(telemetry));
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_health::pb::health_check_response::ServingStatus as Status;
    use tonic_health::pb::health_server::Health as _;
    use tonic_health::pb::{HealthCheckRequest, health_server::HealthServer};

    async fn status(reporter: &tonic_health::server::HealthReporter, service: &str) -> Status {
        let svc = tonic_health::server::HealthService::from_health_reporter(reporter.clone());
        let resp = svc
            .check(tonic::Request::new(HealthCheckRequest {
                service: service.into(),
            }))
            .await
            .unwrap()
            .into_inner();
        Status::try_from(resp.status).unwrap()
    }

    #[tokio::test]
    async fn health_turns_not_serving_for_the_service_and_the_server() {
        let (health, _server): (Health, HealthServer<_>) = Health::new("specllava.v1.Test").await;
        for name in ["", "specllava.v1.Test"] {
            assert_eq!(status(&health.reporter, name).await, Status::Serving);
        }
        let (die, dead) = tokio::sync::oneshot::channel::<()>();
        let watcher = health.not_serving_when(
            async move {
                let _ = dead.await;
            },
            "the model worker died",
        );
        assert_eq!(status(&health.reporter, "").await, Status::Serving);
        drop(die);
        watcher.await.unwrap();
        for name in ["", "specllava.v1.Test"] {
            assert_eq!(status(&health.reporter, name).await, Status::NotServing);
        }
    }

    #[tokio::test]
    async fn serve_grpc_reports_not_serving_once_the_worker_dies_and_stops_on_the_drain() {
        use tonic_health::pb::health_client::HealthClient;
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap();
        let (die, dead) = tokio::sync::oneshot::channel::<()>();
        let (drain, start_drain) = Drain::manual();
        let server = tokio::spawn(serve_grpc(
            addr,
            "specllava.v1.Test",
            Routes::default(),
            None,
            async move {
                let _ = dead.await;
            },
            crate::tls::ServerTls::default(),
            drain,
        ));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let mut client = loop {
            let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"));
            match endpoint.unwrap().connect().await {
                Ok(channel) => break HealthClient::new(channel),
                Err(_) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                Err(e) => panic!("the server did not start: {e}"),
            }
        };
        let mut check = async |service: &str| {
            let resp = client
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .unwrap()
                .into_inner();
            Status::try_from(resp.status).unwrap()
        };
        assert_eq!(check("").await, Status::Serving);
        assert_eq!(check("specllava.v1.Test").await, Status::Serving);
        drop(die);
        loop {
            if check("").await == Status::NotServing {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "health never turned");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert_eq!(check("specllava.v1.Test").await, Status::NotServing);
        // The drain stops it (nothing in flight).
        start_drain.start();
        tokio::time::timeout(std::time::Duration::from_secs(30), server)
            .await
            .expect("the drain stops the server")
            .unwrap()
            .unwrap();
    }
}
