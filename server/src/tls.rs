//! TLS of the gRPC endpoints (rustls through tonic, `ring` provider): the server side every
//! service flattens into its flags ([`ServerTlsArgs`]: certificate, key, and the CA that
//! client certificates must chain to for mutual TLS), and the orchestrator's client side
//! towards the draft and target replicas ([`UpstreamTlsArgs`]). Both are off unless their
//! files are given; PEM files are read (and checked for a PEM block) at start-up, so a bad
//! path or file is a start-up error naming the file, never a failure of the first request.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// Why the TLS settings could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read.
    #[error("reading the {what} {path}: {source}")]
    Read {
        /// What the file is (`--tls-cert`...).
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file holds no PEM block (`-----BEGIN ...`).
    #[error("the {what} {path} is not PEM (no `-----BEGIN` block)")]
    NotPem {
        /// What the file is (`--tls-cert`...).
        what: &'static str,
        /// The file.
        path: PathBuf,
    },
    /// A flag needs another one (a certificate without its key...).
    #[error("{0}")]
    Incomplete(&'static str),
}

/// Reads a PEM file, checking it holds a PEM block.
pub fn read_pem(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })?;
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(TlsError::NotPem {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(bytes)
}

/// Server-side TLS of a gRPC endpoint (every service flattens these into its flags; every
/// flag is also an environment variable). Off unless `--tls-cert` and `--tls-key` are set.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServerTlsArgs {
    /// Serve gRPC over TLS with this certificate chain (PEM; with --tls-key). Unset:
    /// plaintext (local development; in a cluster, see deploy/README.md).
    #[arg(long, env = "SPECLLAVA_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "SPECLLAVA_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM): mutual TLS. Needs --tls-cert.
    #[arg(long, env = "SPECLLAVA_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Also serve the gRPC health service alone, in plaintext, on this address (e.g.
    /// `0.0.0.0:50061`): for Kubernetes gRPC probes, which cannot speak TLS. Unset: health
    /// is served only on the main port.
    #[arg(long, env = "SPECLLAVA_HEALTH_LISTEN")]
    pub health_listen: Option<SocketAddr>,
}

/// What [`ServerTlsArgs::load`] gives [`crate::serve_grpc`]: the TLS configuration of the
/// main port (`None`: plaintext) and the optional plaintext health-only port.
#[derive(Debug, Clone, Default)]
pub struct ServerTls {
    /// TLS of the main port.
    pub config: Option<ServerTlsConfig>,
    /// Plaintext health-only address.
    pub health_listen: Option<SocketAddr>,
}

impl ServerTlsArgs {
    /// Reads the files: what the server is started with.
    pub fn load(&self) -> Result<ServerTls, TlsError> {
        Ok(ServerTls {
            config: self.server_config()?,
            health_listen: self.health_listen,
        })
    }

    /// The server TLS configuration these flags give; `None`: plaintext.
    pub fn server_config(&self) -> Result<Option<ServerTlsConfig>, TlsError> {
        let (cert, key) = match (&self.tls_cert, &self.tls_key) {
            (None, None) => {
                return match self.tls_client_ca {
                    Some(_) => Err(TlsError::Incomplete(
                        "--tls-client-ca needs --tls-cert and --tls-key",
                    )),
                    None => Ok(None),
                };
            }
            (Some(cert), Some(key)) => (cert, key),
            _ => {
                return Err(TlsError::Incomplete("--tls-cert and --tls-key go together"));
            }
        };
        let identity =
            Identity::from_pem(read_pem("--tls-cert", cert)?, read_pem("--tls-key", key)?);
        let mut config = ServerTlsConfig::new().identity(identity);
        if let Some(ca) = &self.tls_client_ca {
            config = config.client_ca_root(Certificate::from_pem(read_pem("--tls-client-ca", ca)?));
        }
        Ok(Some(config))
    }

    /// Whether TLS is configured (logs).
    pub fn enabled(&self) -> bool {
        self.tls_cert.is_some()
    }

    /// Whether client certificates are required (logs).
    pub fn mutual(&self) -> bool {
        self.tls_client_ca.is_some()
    }
}

/// The orchestrator's TLS towards the draft and target replicas (every flag is also an
/// environment variable). Off unless `--upstream-tls-ca` is set; then the replica
/// endpoints are reached over `https`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct UpstreamTlsArgs {
    /// Reach the draft and target replicas over TLS, trusting this CA (PEM). Unset:
    /// plaintext.
    #[arg(long, env = "SPECLLAVA_UPSTREAM_TLS_CA")]
    pub upstream_tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) presented to the replicas (mutual TLS; with
    /// --upstream-tls-key and --upstream-tls-ca).
    #[arg(
        long,
        env = "SPECLLAVA_UPSTREAM_TLS_CERT",
        requires_all = ["upstream_tls_key", "upstream_tls_ca"]
    )]
    pub upstream_tls_cert: Option<PathBuf>,
    /// Private key of --upstream-tls-cert (PEM).
    #[arg(
        long,
        env = "SPECLLAVA_UPSTREAM_TLS_KEY",
        requires = "upstream_tls_cert"
    )]
    pub upstream_tls_key: Option<PathBuf>,
    /// Name the replicas' certificates are checked against. Unset: the host name of each
    /// endpoint as configured (before DNS resolution), e.g. `specllava-target`.
    #[arg(
        long,
        env = "SPECLLAVA_UPSTREAM_TLS_DOMAIN",
        requires = "upstream_tls_ca"
    )]
    pub upstream_tls_domain: Option<String>,
}

impl UpstreamTlsArgs {
    /// The client TLS configuration these flags give, without a domain name: the caller
    /// sets one per replica (`upstream_tls_domain`, or the endpoint's host name); `None`:
    /// plaintext.
    pub fn client_config(&self) -> Result<Option<ClientTlsConfig>, TlsError> {
        let Some(ca) = &self.upstream_tls_ca else {
            return match (&self.upstream_tls_cert, &self.upstream_tls_domain) {
                (None, None) => Ok(None),
                _ => Err(TlsError::Incomplete(
                    "--upstream-tls-cert and --upstream-tls-domain need --upstream-tls-ca",
                )),
            };
        };
        let identity = match (&self.upstream_tls_cert, &self.upstream_tls_key) {
            (Some(cert), Some(key)) => Some((cert.as_path(), key.as_path())),
            (None, None) => None,
            _ => {
                return Err(TlsError::Incomplete(
                    "--upstream-tls-cert and --upstream-tls-key go together",
                ));
            }
        };
        client_config(ca, identity, None).map(Some)
    }

    /// Whether a client certificate is presented (logs).
    pub fn mutual(&self) -> bool {
        self.upstream_tls_cert.is_some()
    }
}

/// A client TLS configuration trusting the CA in `ca` (PEM file), presenting the client
/// certificate and key in `identity` (PEM files) when given, and checking the server's
/// certificate against `domain` when given (else the URI's host).
pub fn client_config(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
    domain: Option<&str>,
) -> Result<ClientTlsConfig, TlsError> {
    let mut config =
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read_pem("CA", ca)?));
    if let Some((cert, key)) = identity {
        config = config.identity(Identity::from_pem(
            read_pem("client certificate", cert)?,
            read_pem("client key", key)?,
        ));
    }
    if let Some(domain) = domain {
        config = config.domain_name(domain);
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Flags {
        #[command(flatten)]
        server: ServerTlsArgs,
        #[command(flatten)]
        upstream: UpstreamTlsArgs,
    }

    #[test]
    fn tls_is_off_by_default() {
        let f = Flags::try_parse_from(["x"]).unwrap();
        assert!(f.server.server_config().unwrap().is_none());
        assert!(f.upstream.client_config().unwrap().is_none());
    }

    #[test]
    fn a_certificate_needs_its_key() {
        assert!(Flags::try_parse_from(["x", "--tls-cert", "c.pem"]).is_err());
        assert!(Flags::try_parse_from(["x", "--tls-client-ca", "ca.pem"]).is_err());
        assert!(Flags::try_parse_from(["x", "--upstream-tls-cert", "c.pem"]).is_err());
        assert!(
            Flags::try_parse_from([
                "x",
                "--upstream-tls-ca",
                "ca.pem",
                "--upstream-tls-key",
                "k"
            ])
            .is_err()
        );
    }

    #[test]
    fn missing_and_non_pem_files_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, b"not a certificate").unwrap();
        let f = Flags::try_parse_from([
            "x",
            "--tls-cert",
            junk.to_str().unwrap(),
            "--tls-key",
            "/nonexistent/key.pem",
        ])
        .unwrap();
        let err = f.server.server_config().unwrap_err().to_string();
        assert!(
            err.contains("--tls-cert") && err.contains("junk.pem"),
            "{err}"
        );
        let f = Flags::try_parse_from(["x", "--upstream-tls-ca", "/nonexistent/ca.pem"]).unwrap();
        let err = f.upstream.client_config().unwrap_err().to_string();
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");
    }

    #[test]
    fn generated_pem_files_load() {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let write = |name: &str, text: String| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p.to_string_lossy().into_owned()
        };
        let (cert, key, ca) = (
            write("cert.pem", ca.pem()),
            write("key.pem", ca_key.serialize_pem()),
            write("ca.pem", ca.pem()),
        );
        let f = Flags::try_parse_from([
            "x",
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--tls-client-ca",
            &ca,
            "--upstream-tls-ca",
            &ca,
            "--upstream-tls-cert",
            &cert,
            "--upstream-tls-key",
            &key,
        ])
        .unwrap();
        assert!(f.server.enabled() && f.server.mutual());
        assert!(f.server.server_config().unwrap().is_some());
        assert!(f.upstream.client_config().unwrap().is_some());
    }
}
