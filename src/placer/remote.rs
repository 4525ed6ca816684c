//! `RemoteRunner`: a runner node over HTTP(S), through the shared client
//! (rustls, HTTP/1.1 or HTTP/2, a client certificate for mTLS: Fn's
//! MTLSRunnerFactory).

use futures::future::BoxFuture;
use http_body_util::BodyExt;

use super::{Attempt, PlacedCall, Runner, RunnerError};
use crate::call::{CALL_ID_HEADER, CALL_TYPE_HEADER, TIMEOUT_HEADER};
use crate::client::{ClientError, HttpClient};
use crate::guest::full_body;
use crate::runner::RunnerStatus;
use crate::server::errors::NACK_HEADER;

/// A node at a base URL (`http://host:port` or `https://host:port`).
pub struct RemoteRunner {
    base: String,
    client: HttpClient,
}

/// Request headers not forwarded to the node: the connection's own, and
/// the call metadata the runner sets itself.
const NOT_FORWARDED: &[&str] = &[
    "host",
    "content-length",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    CALL_ID_HEADER,
    TIMEOUT_HEADER,
    CALL_TYPE_HEADER,
    "fn-deadline",
];

impl RemoteRunner {
    pub fn new(base: &str, client: HttpClient) -> Result<Self, String> {
        let base = base.trim_end_matches('/');
        let uri: http::Uri = base.parse().map_err(|_| format!("bad runner URL `{base}`"))?;
        match (uri.scheme_str(), uri.host()) {
            (Some("http" | "https"), Some(_)) => Ok(Self {
                base: base.to_owned(),
                client,
            }),
            _ => Err(format!(
                "bad runner URL `{base}`: use http://HOST:PORT or https://HOST:PORT"
            )),
        }
    }

    fn unreachable(&self, reason: impl ToString) -> RunnerError {
        RunnerError::Unreachable {
            address: self.base.clone(),
            reason: reason.to_string(),
        }
    }

    fn failed(&self, reason: impl ToString) -> RunnerError {
        RunnerError::Failed {
            address: self.base.clone(),
            reason: reason.to_string(),
        }
    }

    async fn offer(&self, call: &PlacedCall) -> Result<Attempt, RunnerError> {
        let url = format!("{}/fn/{}{}", self.base, call.function, call.path_and_query);
        let mut request = crate::client::request(call.method.clone(), &url, full_body(call.body.clone()))
            .map_err(|e| self.unreachable(e))?;
        let headers = request.headers_mut();
        for (name, value) in &call.headers {
            if !NOT_FORWARDED.contains(&name.as_str()) {
                headers.append(name, value.clone());
            }
        }
        if let Some(id) = &call.options.call_id
            && let Ok(value) = http::HeaderValue::from_str(id.as_str())
        {
            headers.insert(CALL_ID_HEADER, value);
        }
        if let Some(left) = call.time_left() {
            headers.insert(
                TIMEOUT_HEADER,
                http::HeaderValue::from(left.as_millis().max(1) as u64),
            );
        }
        if call.options.detached {
            headers.insert(CALL_TYPE_HEADER, http::HeaderValue::from_static("detached"));
        }
        let response = match self.client.send(request).await {
            Ok(response) => response,
            // NB: only a connection that was never made is safe to retry
            // elsewhere; anything later may have run the call.
            Err(ClientError::Unreachable(reason)) => return Err(self.unreachable(reason)),
            Err(error) => return Err(self.failed(error)),
        };
        if response.status() == http::StatusCode::SERVICE_UNAVAILABLE
            && let Some(reason) = response.headers().get(NACK_HEADER)
        {
            let reason = reason.to_str().unwrap_or("busy").to_owned();
            // Read the small NACK body so the connection can be reused.
            let _ = response.into_body().collect().await;
            return Ok(Attempt::Nack { reason });
        }
        Ok(Attempt::Placed(response.map(|body| {
            body.map_err(wasmtime_wasi_http::Error::from).boxed_unsync()
        })))
    }
}

impl Runner for RemoteRunner {
    fn try_exec<'a>(&'a self, call: &'a PlacedCall) -> BoxFuture<'a, Result<Attempt, RunnerError>> {
        Box::pin(self.offer(call))
    }

    fn status(&self) -> BoxFuture<'_, Result<RunnerStatus, RunnerError>> {
        Box::pin(async move {
            let answer = self
                .client
                .get(&format!("{}/v1/status", self.base))
                .await
                .map_err(|e| self.unreachable(e))?;
            serde_json::from_slice(&answer.body).map_err(|e| self.failed(format!("bad status: {e}")))
        })
    }

    fn close(&self) -> BoxFuture<'_, Result<(), RunnerError>> {
        Box::pin(async { Ok(()) })
    }

    fn address(&self) -> &str {
        &self.base
    }
}
