//! Starting the Spec-LLaVA service binaries as real processes on loopback ports, for the
//! end-to-end tests (`e2e`) and the benchmark (`bench`): free ports, spawning with the
//! output inherited or in a log file, waiting for gRPC health, and stopping with SIGTERM
//! (graceful drain) then kill. [`fuzz`] holds the knobs the fuzz harnesses share,
//! [`cuda_refusal`] the services' start-up check of an unavailable CUDA device, [`png`]
//! hand-made PNG headers for the image-limit tests; `pki` and
//! `test_host` (feature `pki`) generate certificates and serve HTTP(S) for tests of TLS.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use thiserror::Error;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

pub mod cuda_refusal;
pub mod fuzz;
#[cfg(feature = "pki")]
pub mod pki;
pub mod png;
#[cfg(feature = "pki")]
pub mod test_host;

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
        status: ExitStatus,
        /// Log file (or where its output went).
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
        /// Log file (or where its output went).
        log: String,
    },
    /// A free port could not be found.
    #[error("no free loopback port: {0}")]
    Port(std::io::Error),
    /// A bad endpoint.
    #[error("endpoint {0}: {1}")]
    Endpoint(String, tonic::transport::Error),
}

/// Ports [`free_port`] hands out: below Linux's default ephemeral range (32768-60999), from
/// which the kernel picks the local ports of outgoing connections and of binds to port 0.
const PORTS: std::ops::Range<u32> = 20_000..32_768;

/// A free loopback port (bound then released) that an outgoing connection cannot take
/// before the service binds it: one outside the ephemeral range (a port the kernel picked
/// for a bind to port 0 could go to another test's client connection in the meantime).
/// Ports are handed out in turn from a point that differs between processes, so one
/// process never hands out a port twice while others are unlikely to pick the same ones.
pub fn free_port() -> Result<u16, ServiceError> {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    static START: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let start = *START.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        nanos ^ std::process::id().wrapping_mul(2_654_435_761)
    });
    let span = PORTS.end - PORTS.start;
    for _ in 0..256 {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = (PORTS.start + start.wrapping_add(n) % span) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    // All tried were busy: let the kernel pick one.
    let l = TcpListener::bind("127.0.0.1:0").map_err(ServiceError::Port)?;
    Ok(l.local_addr().map_err(ServiceError::Port)?.port())
}

/// How to start one service process.
#[derive(Debug, Clone)]
pub struct Launch {
    bin: PathBuf,
    addr: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    log_filter: String,
    log_file: Option<PathBuf>,
    tls: Option<ClientTlsConfig>,
}

impl Launch {
    /// Runs `bin`, which will listen on `addr` (`host:port`; pass it in the arguments or
    /// environment too). Output is inherited and `RUST_LOG` is `warn` unless set.
    pub fn new(bin: impl Into<PathBuf>, addr: impl Into<String>) -> Self {
        Self {
            bin: bin.into(),
            addr: addr.into(),
            args: Vec::new(),
            env: Vec::new(),
            log_filter: "warn".into(),
            log_file: None,
            tls: None,
        }
    }

    /// The service serves TLS (pass its `--tls-*` flags too): health checks and
    /// [`ServiceProcess::channel`] connect with `tls` (CA, client certificate, domain).
    pub fn client_tls(mut self, tls: ClientTlsConfig) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Adds command-line arguments.
    pub fn args<S: AsRef<str>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Adds environment variables. Every flag of every service is also a `SPECLLAVA_*`
    /// variable and unknown variables are ignored, so settings a given build may not have
    /// yet can go through the environment.
    pub fn envs<K: AsRef<str>, V: AsRef<str>>(
        mut self,
        env: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        self.env.extend(
            env.into_iter()
                .map(|(k, v)| (k.as_ref().to_owned(), v.as_ref().to_owned())),
        );
        self
    }

    /// The `RUST_LOG` filter of the process.
    pub fn log_filter(mut self, filter: impl Into<String>) -> Self {
        self.log_filter = filter.into();
        self
    }

    /// Sends stdout and stderr to `path` instead of inheriting them.
    pub fn log_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.log_file = Some(path.into());
        self
    }

    /// Starts the process.
    pub fn spawn(self) -> Result<ServiceProcess, ServiceError> {
        let name = self.bin.file_name().map_or_else(
            || self.bin.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        if !self.bin.exists() {
            return Err(ServiceError::MissingBinary(self.bin));
        }
        let spawn_err = |source| ServiceError::Spawn {
            name: name.clone(),
            source,
        };
        let mut command = Command::new(&self.bin);
        command
            .args(&self.args)
            .env("RUST_LOG", &self.log_filter)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null());
        if let Some(log) = &self.log_file {
            let out = std::fs::File::create(log).map_err(spawn_err)?;
            let err = out.try_clone().map_err(spawn_err)?;
            command.stdout(out).stderr(err);
        }
        let child = command.spawn().map_err(spawn_err)?;
        Ok(ServiceProcess {
            name,
            addr: self.addr,
            log: self.log_file,
            tls: self.tls,
            child,
        })
    }
}

/// A running service process; stopped (SIGTERM, then kill) on drop.
pub struct ServiceProcess {
    /// Binary name.
    pub name: String,
    /// Address it listens on (`host:port`).
    pub addr: String,
    /// Where its stdout/stderr go (`None`: inherited).
    pub log: Option<PathBuf>,
    /// How clients reach it over TLS (`None`: plaintext).
    pub tls: Option<ClientTlsConfig>,
    child: Child,
}

impl ServiceProcess {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `http://addr`, or `https://addr` when it serves TLS.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// A lazily connecting channel to the service (over TLS when it serves TLS).
    pub fn channel(&self) -> Result<Channel, ServiceError> {
        channel_with(&self.addr, self.tls.clone())
    }

    /// The exit status, if the process has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits up to `timeout` for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(st) = self.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Kills the process at once (SIGKILL: a crash, no draining) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Pauses the process (SIGSTOP: a stuck replica; its sockets stay open).
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// Resumes a paused process (SIGCONT).
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Sends SIGTERM and returns at once (the drain starts; see [`ServiceProcess::wait_exit`]).
    pub fn begin_terminate(&self) {
        self.signal(libc::SIGTERM);
    }

    /// Sends SIGTERM and waits for the exit (graceful shutdown), killing the process
    /// after 10 s; returns the exit status. A paused process is resumed to see it.
    pub fn terminate(&mut self) -> Option<ExitStatus> {
        self.signal(libc::SIGTERM);
        self.signal(libc::SIGCONT);
        if let Some(st) = self.wait_exit(Duration::from_secs(10)) {
            return Some(st);
        }
        let _ = self.child.kill();
        self.child.wait().ok()
    }

    fn log_name(&self) -> String {
        self.log
            .as_ref()
            .map_or_else(|| "stderr".into(), |l| l.display().to_string())
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        if self.try_wait().is_none() {
            self.terminate();
        }
    }
}

/// Spawns `bin_dir/name args...` listening on `addr`, with `env` set, its output in
/// `log_dir/name.log` and `RUST_LOG` from this process (default `warn`).
pub fn spawn(
    bin_dir: &Path,
    name: &str,
    addr: String,
    args: &[String],
    env: &[(&str, String)],
    log_dir: &Path,
) -> Result<ServiceProcess, ServiceError> {
    Launch::new(bin_dir.join(name), addr)
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .log_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .log_file(log_dir.join(format!("{name}.log")))
        .spawn()
}

/// A lazily connecting channel to `http://addr`.
pub fn channel(addr: &str) -> Result<Channel, ServiceError> {
    channel_with(addr, None)
}

/// A lazily connecting channel to `addr` (`host:port` or a URL), over TLS (`https`) with
/// `tls`.
pub fn channel_with(addr: &str, tls: Option<ClientTlsConfig>) -> Result<Channel, ServiceError> {
    let host_port = addr
        .trim_start_matches("http://")
        .trim_start_matches("https://");
    let uri = match tls {
        Some(_) => format!("https://{host_port}"),
        None if addr.starts_with("http") => addr.to_owned(),
        None => format!("http://{host_port}"),
    };
    let mut endpoint = Endpoint::from_shared(uri.clone())
        .map_err(|e| ServiceError::Endpoint(uri.clone(), e))?
        .connect_timeout(Duration::from_secs(2));
    if let Some(tls) = tls {
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| ServiceError::Endpoint(uri.clone(), e))?;
    }
    Ok(endpoint.connect_lazy())
}

/// Waits until the process answers the gRPC health check with SERVING (overall status);
/// fails when it exits first or `timeout` passes.
pub async fn wait_healthy(p: &mut ServiceProcess, timeout: Duration) -> Result<(), ServiceError> {
    let start = Instant::now();
    let mut client = HealthClient::new(p.channel()?);
    loop {
        if let Some(status) = p.try_wait() {
            return Err(ServiceError::Exited {
                name: p.name.clone(),
                status,
                log: p.log_name(),
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
                log: p.log_name(),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_distinct_bindable_and_outside_the_ephemeral_range() {
        let ports: Vec<u16> = (0..64).map(|_| free_port().unwrap()).collect();
        let mut distinct = ports.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), ports.len());
        for p in ports {
            assert!(PORTS.contains(&u32::from(p)), "{p}");
            assert!(TcpListener::bind(("127.0.0.1", p)).is_ok());
        }
    }
}
