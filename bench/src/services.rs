//! Spawning the three real service binaries on loopback ports (or using running ones).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use thiserror::Error;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Failures starting or reaching the services.
#[derive(Debug, Error)]
pub enum ServiceError {
    /// A binary is missing.
    #[error("service binary {0} not found (build with `cargo build --release --bins`)")]
    MissingBinary(PathBuf),
    /// Spawning failed.
    #[error("spawning {name}: {source}")]
    Spawn {
        /// Binary name.
        name: String,
        /// Cause.
        source: std::io::Error,
    },
    /// A service exited early.
    #[error("{name} exited during start-up ({status}); its log is {log}")]
    Exited {
        /// Binary name.
        name: String,
        /// Exit status.
        status: std::process::ExitStatus,
        /// Log file.
        log: String,
    },
    /// A service did not become healthy in time.
    #[error("{name} at {addr} was not healthy after {secs} s; its log is {log}")]
    Timeout {
        /// Binary name.
        name: String,
        /// Address.
        addr: String,
        /// Seconds waited.
        secs: u64,
        /// Log file.
        log: String,
    },
    /// A free port could not be found.
    #[error("no free loopback port: {0}")]
    Port(std::io::Error),
    /// A bad endpoint.
    #[error("endpoint {0}: {1}")]
    Endpoint(String, tonic::transport::Error),
}

/// A running child process, killed on drop.
pub struct ServiceProcess {
    /// Binary name.
    pub name: String,
    /// Address it listens on (`host:port`).
    pub addr: String,
    /// Where its stdout/stderr go.
    pub log: PathBuf,
    child: Child,
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free loopback port (bound then released).
pub fn free_port() -> Result<u16, ServiceError> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(ServiceError::Port)?;
    Ok(l.local_addr().map_err(ServiceError::Port)?.port())
}

/// Spawns `bin_dir/name args...` with `env` set (every flag of every service is also a
/// `SPECLLAVA_*` environment variable, and unknown variables are ignored, so settings a given
/// build may not have yet, like the metrics address, go through the environment) and its output
/// in `log_dir/name.log`.
pub fn spawn(
    bin_dir: &Path,
    name: &str,
    addr: String,
    args: &[String],
    env: &[(&str, String)],
    log_dir: &Path,
) -> Result<ServiceProcess, ServiceError> {
    let bin = bin_dir.join(name);
    if !bin.exists() {
        return Err(ServiceError::MissingBinary(bin));
    }
    let log = log_dir.join(format!("{name}.log"));
    let out = std::fs::File::create(&log).map_err(|source| ServiceError::Spawn {
        name: name.to_owned(),
        source,
    })?;
    let err = out.try_clone().map_err(|source| ServiceError::Spawn {
        name: name.to_owned(),
        source,
    })?;
    let child = Command::new(&bin)
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|source| ServiceError::Spawn {
            name: name.to_owned(),
            source,
        })?;
    Ok(ServiceProcess {
        name: name.to_owned(),
        addr,
        log,
        child,
    })
}

/// A lazily connecting channel to `http://addr`.
pub fn channel(addr: &str) -> Result<Channel, ServiceError> {
    let uri = if addr.starts_with("http") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    };
    Ok(Endpoint::from_shared(uri.clone())
        .map_err(|e| ServiceError::Endpoint(uri.clone(), e))?
        .connect_timeout(Duration::from_secs(2))
        .connect_lazy())
}

/// Waits until the process answers the gRPC health check with SERVING (overall status).
pub async fn wait_healthy(p: &mut ServiceProcess, timeout: Duration) -> Result<(), ServiceError> {
    let start = Instant::now();
    let mut client = HealthClient::new(channel(&p.addr)?);
    loop {
        if let Ok(Some(status)) = p.child.try_wait() {
            return Err(ServiceError::Exited {
                name: p.name.clone(),
                status,
                log: p.log.display().to_string(),
            });
        }
        let req = HealthCheckRequest {
            service: String::new(),
        };
        if let Ok(r) = client.check(req).await
            && r.into_inner().status == ServingStatus::Serving as i32
        {
            return Ok(());
        }
        if start.elapsed() > timeout {
            return Err(ServiceError::Timeout {
                name: p.name.clone(),
                addr: p.addr.clone(),
                secs: timeout.as_secs(),
                log: p.log.display().to_string(),
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
