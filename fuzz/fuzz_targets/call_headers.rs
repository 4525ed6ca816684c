//! Call-metadata headers (`fn-call-id`, `fn-deadline`, `fn-timeout-ms`,
//! `fn-call-type`): any values parse or are refused, never a panic; a kept
//! call id is sane; a timeout never exceeds what was asked.
#![no_main]

use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;

const NAMES: [&str; 4] = ["fn-call-id", "fn-deadline", "fn-timeout-ms", "fn-call-type"];

fuzz_target!(|data: &[u8]| {
    let mut headers = http::HeaderMap::new();
    // Four values separated by NUL bytes, one per call header.
    for (name, value) in NAMES.iter().zip(data.split(|&b| b == 0)) {
        if let Ok(value) = http::HeaderValue::from_bytes(value) {
            headers.insert(*name, value);
        }
    }
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    if let Ok(options) = fnrunner::call::parse_call_headers(&headers, now) {
        if let Some(id) = &options.call_id {
            let id = id.as_str();
            assert!(!id.is_empty() && id.len() <= fnrunner::call::MAX_CALL_ID_LEN);
            assert!(id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b)));
        }
        if let (Some(timeout), Some(ms)) = (
            options.timeout,
            headers.get("fn-timeout-ms").and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok()),
        ) {
            assert!(timeout <= Duration::from_millis(ms));
        }
    }
});
