//! An HTTP(S) client for runner nodes — calls, deploys, removals, status —
//! over HTTP/1.1, or HTTP/2 when TLS negotiates it (ALPN `h2`), with rustls and,
//! for mTLS, a client certificate (Fn's MTLSRunnerFactory side).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::guest::{GuestBody, full_body};
use crate::server::tls::{read_certs, read_key};

/// PEM files of a TLS client.
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    /// Trusted CA certificates; the public web roots when `None`.
    pub ca: Option<PathBuf>,
    /// A client certificate and its key, for mTLS.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl ClientTls {
    /// The rustls configuration of these files.
    pub fn config(&self) -> Result<rustls::ClientConfig, String> {
        let mut roots = rustls::RootCertStore::empty();
        match &self.ca {
            Some(path) => {
                for cert in read_certs(path).map_err(|e| format!("TLS CA {}: {e}", path.display()))? {
                    roots
                        .add(cert)
                        .map_err(|e| format!("TLS CA {}: {e}", path.display()))?;
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots);
        let config = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                let chain = read_certs(cert)
                    .map_err(|e| format!("TLS client certificate {}: {e}", cert.display()))?;
                let key = read_key(key).map_err(|e| format!("TLS client key {}: {e}", key.display()))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| format!("TLS client certificate: {e}"))?
            }
            (None, None) => builder.with_no_client_auth(),
            _ => return Err("a TLS client certificate needs its key, and a key its certificate".into()),
        };
        Ok(config)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("bad URL `{0}`")]
    Url(String),
    /// No connection could be made: the request was not sent.
    #[error("{0}")]
    Unreachable(String),
    /// The exchange failed after the connection was made: the request may
    /// have reached the node.
    #[error("{0}")]
    Connect(String),
    #[error("{status}: {body}")]
    Status { status: StatusCode, body: String },
}

/// A response read whole, with its `server-timing` split.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
    /// `sched` and `exec` of the node's `server-timing` header.
    pub server_timing: Option<(Duration, Duration)>,
}

/// How long a connection may take to establish.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A pooled client for `http://` and `https://` node URLs.
#[derive(Clone)]
pub struct HttpClient {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, GuestBody>,
}

impl HttpClient {
    pub fn new(mut tls: rustls::ClientConfig) -> Result<Self, ClientError> {
        // NB: the connector offers ALPN `h2` and `http/1.1` itself.
        tls.alpn_protocols.clear();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Ok(Self { client })
    }

    /// Sends a request; the response body is left to the caller.
    pub async fn send(
        &self,
        request: Request<GuestBody>,
    ) -> Result<http::Response<hyper::body::Incoming>, ClientError> {
        self.client.request(request).await.map_err(|e| {
            if e.is_connect() {
                ClientError::Unreachable(error_text(&e))
            } else {
                ClientError::Connect(error_text(&e))
            }
        })
    }

    /// Sends a request and reads the whole answer.
    pub async fn fetch(&self, request: Request<GuestBody>) -> Result<Answer, ClientError> {
        let response = self.send(request).await?;
        let (parts, body) = response.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| ClientError::Connect(format!("reading the response: {e}")))?
            .to_bytes();
        Ok(Answer {
            server_timing: parts.headers.get("server-timing").and_then(parse_server_timing),
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    pub async fn get(&self, url: &str) -> Result<Answer, ClientError> {
        self.fetch(request(Method::GET, url, full_body(Bytes::new()))?)
            .await
    }

    /// `PUT /v1/functions/{name}` with the module and settings.
    pub async fn deploy(
        &self,
        base: &str,
        name: &str,
        module: Bytes,
        settings: &str,
    ) -> Result<(), ClientError> {
        let boundary = "fnrunner-deploy-3f9a1c";
        let mut body = Vec::with_capacity(module.len() + settings.len() + 512);
        for (field, bytes) in [("module", &module[..]), ("settings", settings.as_bytes())] {
            body.extend_from_slice(
                format!(
                    "--{boundary}\r\ncontent-disposition: form-data; name=\"{field}\"; filename=\"{field}\"\r\n\
                     content-type: application/octet-stream\r\n\r\n"
                )
                .as_bytes(),
            );
            body.extend_from_slice(bytes);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
        let mut request = request(
            Method::PUT,
            &format!("{base}/v1/functions/{name}"),
            full_body(Bytes::from(body)),
        )?;
        if let Ok(value) = HeaderValue::from_str(&format!("multipart/form-data; boundary={boundary}")) {
            request.headers_mut().insert(http::header::CONTENT_TYPE, value);
        }
        expect_success(self.fetch(request).await?)
    }

    /// `DELETE /v1/functions/{name}`.
    pub async fn remove(&self, base: &str, name: &str) -> Result<(), ClientError> {
        let request = request(
            Method::DELETE,
            &format!("{base}/v1/functions/{name}"),
            full_body(Bytes::new()),
        )?;
        expect_success(self.fetch(request).await?)
    }
}

fn expect_success(answer: Answer) -> Result<(), ClientError> {
    if answer.status.is_success() {
        Ok(())
    } else {
        Err(ClientError::Status {
            status: answer.status,
            body: String::from_utf8_lossy(&answer.body).trim().to_owned(),
        })
    }
}

/// A request to `url`.
pub fn request(method: Method, url: &str, body: GuestBody) -> Result<Request<GuestBody>, ClientError> {
    let uri: http::Uri = url.parse().map_err(|_| ClientError::Url(url.to_owned()))?;
    if uri.host().is_none() {
        return Err(ClientError::Url(url.to_owned()));
    }
    Request::builder()
        .method(method)
        .uri(uri)
        .body(body)
        .map_err(|_| ClientError::Url(url.to_owned()))
}

/// `sched;dur=…, exec;dur=…` → the two durations.
pub fn parse_server_timing(value: &HeaderValue) -> Option<(Duration, Duration)> {
    let text = value.to_str().ok()?;
    let field = |name: &str| -> Option<Duration> {
        let ms: f64 = text
            .split(',')
            .map(str::trim)
            .find_map(|part| part.strip_prefix(name)?.strip_prefix(";dur="))?
            .parse()
            .ok()?;
        (ms.is_finite() && ms >= 0.0).then(|| Duration::from_secs_f64(ms / 1000.0))
    };
    Some((field("sched")?, field("exec")?))
}

/// An error and its sources on one line.
fn error_text(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_timing_is_parsed_into_sched_and_exec() {
        let value = HeaderValue::from_static("sched;dur=1.500, exec;dur=0.250");
        assert_eq!(
            parse_server_timing(&value),
            Some((Duration::from_micros(1500), Duration::from_micros(250)))
        );
        assert_eq!(
            parse_server_timing(&HeaderValue::from_static("sched;dur=x")),
            None
        );
    }
}
