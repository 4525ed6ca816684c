//! The CGI output parser: any stdout a guest writes is either a response or
//! a clear error, never a panic; a response's body is what followed the
//! header block (or all of stdout), and its status is a final one.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let stdout = bytes::Bytes::copy_from_slice(data);
    match fnrunner::guest::cgi::parse_output(stdout) {
        Ok((status, headers, body)) => {
            assert!((200..=599).contains(&status.as_u16()));
            assert!(data.ends_with(&body), "the body is the tail of stdout");
            assert!(headers.len() <= fnrunner::guest::cgi::MAX_CGI_HEADERS);
            assert!(!headers.contains_key(http::header::CONTENT_LENGTH));
            assert!(!headers.contains_key(http::header::TRANSFER_ENCODING));
        }
        Err(reason) => assert!(!reason.is_empty()),
    }
});
