//! TLS for the listeners: rustls with ALPN `h2` and `http/1.1`, optional
//! client-certificate verification (mTLS, the LB-to-runner hop), and a
//! reload of the certificate files (on SIGHUP) that new handshakes pick up
//! while open connections carry on.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpStream;

/// The PEM files a TLS listener is built from.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// When set, clients must present a certificate signed by one of these.
    pub client_ca: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS certificate {path}: {reason}")]
    Cert { path: PathBuf, reason: String },
    #[error("TLS key {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("TLS client CA {path}: {reason}")]
    ClientCa { path: PathBuf, reason: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// Reads every certificate in a PEM file; none is an error.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| e.to_string())?
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    if certs.is_empty() {
        return Err("no PEM certificate found".into());
    }
    Ok(certs)
}

/// Reads the private key of a PEM file.
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| e.to_string())
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TlsFiles {
    /// Builds a server configuration from the files, checking each.
    pub fn server_config(&self) -> Result<rustls::ServerConfig, TlsError> {
        let certs = read_certs(&self.cert).map_err(|reason| TlsError::Cert {
            path: self.cert.clone(),
            reason,
        })?;
        let key = read_key(&self.key).map_err(|reason| TlsError::Key {
            path: self.key.clone(),
            reason,
        })?;
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(path) => {
                let ca_err = |reason: String| TlsError::ClientCa {
                    path: path.clone(),
                    reason,
                };
                let mut roots = rustls::RootCertStore::empty();
                for cert in read_certs(path).map_err(ca_err)? {
                    roots.add(cert).map_err(|e| ca_err(e.to_string()))?;
                }
                let verifier =
                    rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                        .build()
                        .map_err(|e| ca_err(e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_single_cert(certs, key).map_err(|e| TlsError::Key {
            path: self.key.clone(),
            reason: format!("does not match the certificate: {e}"),
        })?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }
}

/// Accepts TLS connections with the current configuration.
#[derive(Clone)]
pub struct TlsAcceptor {
    files: TlsFiles,
    current: Arc<RwLock<Arc<rustls::ServerConfig>>>,
}

impl TlsAcceptor {
    pub fn new(files: TlsFiles) -> Result<Self, TlsError> {
        let config = files.server_config()?;
        Ok(Self {
            files,
            current: Arc::new(RwLock::new(Arc::new(config))),
        })
    }

    /// Re-reads the files; on any error the previous configuration stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = Arc::new(self.files.server_config()?);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = config;
        Ok(())
    }

    pub async fn accept(
        &self,
        stream: TcpStream,
    ) -> std::io::Result<tokio_rustls::server::TlsStream<TcpStream>> {
        let config = self.current.read().unwrap_or_else(|p| p.into_inner()).clone();
        tokio_rustls::TlsAcceptor::from(config).accept(stream).await
    }
}
