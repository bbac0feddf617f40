//! Serving any Spec-LLaVA endpoint, shared by the three services: the gRPC server with
//! graceful shutdown, health, reflection and the `/metrics` endpoint ([`grpc`]); the drain
//! every port of a process sees at once ([`drain`]); the
//! credentials of the gRPC endpoints and public APIs: TLS / mutual TLS ([`tls`]) and bearer
//! tokens ([`auth`]); and the image-limit flags every service takes ([`image_args`]). Links no
//! candle.

pub mod auth;
pub mod drain;
pub mod grpc;
pub mod image_args;
pub mod tls;

pub use auth::{ApiKeys, AuthArgs, AuthError, BearerAuth};
pub use drain::{Drain, DrainStarter, shutdown_signal};
pub use grpc::{Health, MetricsEndpoint, reflection_services, run_with_telemetry, serve_grpc};
pub use image_args::ImageLimitArgs;
pub use tls::{ServerTls, ServerTlsArgs, UpstreamTlsArgs};
