//! The one place failures become HTTP responses: DESIGN.md's table of
//! statuses, a small JSON body (`code`, `message`, `call_id`), and the NACK.
//! Internal details go to the log with the call id, never to the client.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use serde::Serialize;

use crate::guest::{CallError, FaultKind, GuestBody, full_body};
use crate::runner::NackReason;

/// Header a NACK carries, saying why (`busy`, `draining`).
pub const NACK_HEADER: &str = "fn-runner-nack";
/// Seconds a NACKed client is told to wait before retrying here.
pub const RETRY_AFTER_SECS: u32 = 1;

/// The HTTP status of a call failure (DESIGN.md's table).
pub fn status_of(kind: FaultKind) -> StatusCode {
    match kind {
        FaultKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
        FaultKind::Trap
        | FaultKind::MemoryLimit
        | FaultKind::OutputTooLarge
        | FaultKind::BadOutput
        | FaultKind::Exit
        | FaultKind::NoResponse => StatusCode::BAD_GATEWAY,
        FaultKind::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        FaultKind::BodyRead => StatusCode::BAD_REQUEST,
        FaultKind::Busy => StatusCode::SERVICE_UNAVAILABLE,
        // The client is gone; this status only reaches logs.
        FaultKind::Canceled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        FaultKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    code: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    call_id: Option<&'a str>,
}

/// A JSON error response.
pub fn error_response(
    status: StatusCode,
    code: &str,
    message: &str,
    call_id: Option<&str>,
) -> Response<GuestBody> {
    let body = serde_json::to_vec(&ErrorBody {
        code,
        message,
        call_id,
    })
    .unwrap_or_default();
    let mut response = Response::new(full_body(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// The response for a failed call. Runner faults are logged in full and
/// answered with a generic message.
pub fn call_error_response(error: &CallError, call_id: &str) -> Response<GuestBody> {
    let kind = error.kind();
    let message = match kind {
        FaultKind::Internal => {
            tracing::error!(call_id, %error, "runner fault");
            "internal error".to_owned()
        }
        _ => error.to_string(),
    };
    let mut response = error_response(status_of(kind), kind.code(), &message, Some(call_id));
    if kind == FaultKind::Busy {
        add_nack_headers(&mut response, NackReason::Busy, u64::from(RETRY_AFTER_SECS));
    }
    response
}

/// A NACK: 503 with `fn-runner-nack` and `retry-after`, sent before the
/// request body is read so a load balancer can replay the call elsewhere.
pub fn nack_response(
    reason: NackReason,
    retry_after: std::time::Duration,
    call_id: &str,
) -> Response<GuestBody> {
    let (code, message) = match reason {
        NackReason::Busy => (
            "server_busy",
            "no capacity for this call on this node; try another",
        ),
        NackReason::Draining => ("server_busy", "this node is draining; try another"),
        NackReason::Quarantined => (
            "quarantined",
            "this function is quarantined on this node after repeated faults; try another",
        ),
    };
    let mut response = error_response(StatusCode::SERVICE_UNAVAILABLE, code, message, Some(call_id));
    let seconds = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
    add_nack_headers(&mut response, reason, seconds.max(1));
    response
}

fn add_nack_headers(response: &mut Response<GuestBody>, reason: NackReason, retry_after_secs: u64) {
    let headers = response.headers_mut();
    headers.insert(NACK_HEADER, HeaderValue::from_static(reason.as_str()));
    headers.insert(http::header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_failure_class_has_its_documented_status() {
        assert_eq!(status_of(FaultKind::Timeout), 504);
        assert_eq!(status_of(FaultKind::Trap), 502);
        assert_eq!(status_of(FaultKind::MemoryLimit), 502);
        assert_eq!(status_of(FaultKind::BadOutput), 502);
        assert_eq!(status_of(FaultKind::OutputTooLarge), 502);
        assert_eq!(status_of(FaultKind::BodyTooLarge), 413);
        assert_eq!(status_of(FaultKind::Busy), 503);
        assert_eq!(status_of(FaultKind::Internal), 500);
    }

    #[test]
    fn a_nack_says_why_and_when_to_retry() {
        let response = nack_response(NackReason::Draining, std::time::Duration::from_millis(200), "c1");
        assert_eq!(response.status(), 503);
        assert_eq!(response.headers()[NACK_HEADER], "draining");
        assert_eq!(response.headers()["retry-after"], "1");
    }

    #[test]
    fn runner_faults_hide_their_details_from_the_client() {
        let error = CallError::internal("f", "doing things", "secret /etc/path detail");
        let response = call_error_response(&error, "c1");
        assert_eq!(response.status(), 500);
        let body = futures::executor::block_on(http_body_util::BodyExt::collect(response.into_body()))
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        let text = String::from_utf8_lossy(&body);
        assert!(!text.contains("secret"), "{text}");
        assert!(text.contains("\"call_id\":\"c1\""), "{text}");
    }
}
