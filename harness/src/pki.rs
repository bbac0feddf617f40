//! Certificates generated at test time (rcgen): a throwaway CA, a server certificate for
//! `localhost` / `127.0.0.1` that every test service serves, and a client certificate the
//! orchestrator presents to the replicas (mutual TLS). Keys live in a temporary directory
//! removed on drop; nothing is committed.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// A test PKI: PEM files of a CA, a server and a client certificate.
#[derive(Debug)]
pub struct TestPki {
    dir: tempfile::TempDir,
    /// The CA certificate (PEM file).
    pub ca: PathBuf,
    /// Server certificate for `localhost` and `127.0.0.1`, signed by the CA.
    pub server_cert: PathBuf,
    /// Its key.
    pub server_key: PathBuf,
    /// Client certificate (`CN=specllava-orchestrator`), signed by the CA.
    pub client_cert: PathBuf,
    /// Its key.
    pub client_key: PathBuf,
}

fn params(cn: &str, sans: &[&str]) -> CertificateParams {
    let mut p = CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .expect("certificate parameters");
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    p
}

impl TestPki {
    /// Generates the CA and both certificates into a fresh temporary directory.
    pub fn generate() -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = params("Spec-LLaVA test CA", &[]);
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key).expect("CA certificate");
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf = |cn: &str, sans: &[&str], usage: ExtendedKeyUsagePurpose| {
            let key = KeyPair::generate().expect("key");
            let mut p = params(cn, sans);
            p.key_usages = vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
            ];
            p.extended_key_usages = vec![usage];
            let cert = p.signed_by(&key, &issuer).expect("signed certificate");
            (cert.pem(), key.serialize_pem())
        };
        let (server_cert, server_key) = leaf(
            "localhost",
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (client_cert, client_key) = leaf(
            "specllava-orchestrator",
            &[],
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).expect("writing a PEM file");
            path
        };
        Self {
            ca: write("ca.pem", &ca_cert.pem()),
            server_cert: write("server.pem", &server_cert),
            server_key: write("server-key.pem", &server_key),
            client_cert: write("client.pem", &client_cert),
            client_key: write("client-key.pem", &client_key),
            dir,
        }
    }

    /// The directory holding the files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A service's flags serving TLS with the server certificate; with `mutual`, requiring
    /// client certificates signed by the CA.
    pub fn server_args(&self, mutual: bool) -> Vec<String> {
        let mut args = vec![
            "--tls-cert".into(),
            path(&self.server_cert),
            "--tls-key".into(),
            path(&self.server_key),
        ];
        if mutual {
            args.extend(["--tls-client-ca".into(), path(&self.ca)]);
        }
        args
    }

    /// The orchestrator's flags reaching the replicas over TLS (trusting the CA); with
    /// `client_cert`, presenting the client certificate.
    pub fn upstream_args(&self, client_cert: bool) -> Vec<String> {
        let mut args = vec!["--upstream-tls-ca".into(), path(&self.ca)];
        if client_cert {
            args.extend([
                "--upstream-tls-cert".into(),
                path(&self.client_cert),
                "--upstream-tls-key".into(),
                path(&self.client_key),
            ]);
        }
        args
    }

    /// A client TLS configuration trusting the CA; with `client_cert`, presenting the
    /// client certificate.
    pub fn client_tls(&self, client_cert: bool) -> ClientTlsConfig {
        let read = |p: &Path| std::fs::read(p).expect("reading a PEM file");
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(&self.ca)));
        if client_cert {
            tls = tls.identity(Identity::from_pem(
                read(&self.client_cert),
                read(&self.client_key),
            ));
        }
        tls
    }
}

impl TestPki {
    /// A TLS acceptor serving the server certificate, for [`crate::test_host`].
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(Arc::new(self.rustls_server_config()))
    }

    /// A rustls server configuration serving the server certificate (ring provider), for
    /// test servers that are not gRPC services (e.g. an https image host).
    pub fn rustls_server_config(&self) -> rustls::ServerConfig {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = CertificateDer::pem_file_iter(&self.server_cert)
            .expect("server certificate file")
            .collect::<Result<Vec<_>, _>>()
            .expect("server certificate PEM");
        let key = PrivateKeyDer::from_pem_file(&self.server_key).expect("server key PEM");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("server certificate and key")
    }
}

fn path(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}
