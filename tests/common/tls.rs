//! Certificates for TLS tests (rcgen), and a TLS client speaking HTTP/1.1
//! or HTTP/2 (by ALPN) with an optional client certificate.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// A certificate authority.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// PEM files of one certificate and its key.
#[derive(Clone, Debug)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Ca {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().expect("key");
        Self {
            issuer: CertifiedIssuer::self_signed(params, key).expect("CA"),
        }
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    pub fn write(&self, path: &Path) -> PathBuf {
        std::fs::write(path, self.pem()).expect("write CA");
        path.to_owned()
    }

    /// A certificate for `names` (DNS names or IPs) signed by this CA,
    /// written as `dir/stem.crt` and `dir/stem.key`.
    pub fn issue(&self, names: &[&str], dir: &Path, stem: &str) -> CertFiles {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names).expect("params");
        params.distinguished_name.push(DnType::CommonName, stem);
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        let files = CertFiles {
            cert: dir.join(format!("{stem}.crt")),
            key: dir.join(format!("{stem}.key")),
        };
        std::fs::write(&files.cert, cert.pem()).expect("write cert");
        std::fs::write(&files.key, key.serialize_pem()).expect("write key");
        files
    }
}

/// A client configuration trusting `ca`, with an optional client cert.
pub fn client_config(ca: &Path, client: Option<&CertFiles>, alpn: &[&[u8]]) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("ca") {
        roots.add(cert.expect("ca cert")).expect("add root");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots);
    let mut config = match client {
        Some(files) => {
            let chain: Vec<_> = CertificateDer::pem_file_iter(&files.cert)
                .expect("cert")
                .map(|c| c.expect("cert"))
                .collect();
            let key = PrivateKeyDer::from_pem_file(&files.key).expect("key");
            builder.with_client_auth_cert(chain, key).expect("client auth")
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config
}

/// What a TLS request got.
#[derive(Debug)]
pub struct TlsReply {
    pub status: u16,
    pub body: Bytes,
    pub version: http::Version,
    /// The server's certificate, as it presented it.
    pub server_cert: Vec<u8>,
}

/// One TLS connection, ready for requests on it.
pub struct TlsConnection {
    sender: Sender,
    pub server_cert: Vec<u8>,
    addr: SocketAddr,
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

/// Connects (TLS handshake, then HTTP/2 if ALPN chose `h2`, else HTTP/1.1).
pub async fn connect(addr: SocketAddr, config: rustls::ClientConfig) -> Result<TlsConnection, String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from("localhost").map_err(|e| e.to_string())?;
    let tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let (_, session) = tls.get_ref();
    let server_cert = session
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|cert| cert.to_vec())
        .unwrap_or_default();
    let h2 = session.alpn_protocol() == Some(b"h2");
    let io = hyper_util::rt::TokioIo::new(tls);
    let sender = if h2 {
        let (sender, connection) =
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        Sender::H2(sender)
    } else {
        let (sender, connection) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        Sender::H1(sender)
    };
    Ok(TlsConnection {
        sender,
        server_cert,
        addr,
    })
}

impl TlsConnection {
    pub async fn get(&mut self, path: &str) -> Result<TlsReply, String> {
        let request = http::Request::get(format!("https://localhost:{}{path}", self.addr.port()))
            .header("host", format!("localhost:{}", self.addr.port()))
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        let response = match &mut self.sender {
            Sender::H1(sender) => sender.send_request(request).await,
            Sender::H2(sender) => sender.send_request(request).await,
        }
        .map_err(|e| format!("request: {e}"))?;
        let status = response.status().as_u16();
        let version = response.version();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        Ok(TlsReply {
            status,
            body,
            version,
            server_cert: self.server_cert.clone(),
        })
    }
}

/// Connects and makes one GET request.
pub async fn get(addr: SocketAddr, config: rustls::ClientConfig, path: &str) -> Result<TlsReply, String> {
    let mut connection = connect(addr, config).await?;
    connection.get(path).await
}
