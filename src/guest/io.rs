//! Bounded capture of a guest's output streams: the CGI response (stdout),
//! and the call's log (stderr, and a component's stdout).

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};

/// Largest single write a guest is offered; WASI writes are chunked to it.
const WRITE_PERMIT: usize = 64 << 10;

/// Collects a stream up to `limit` bytes. A write past the limit marks the
/// capture as overflowed and traps the guest: a response that does not fit
/// is refused whole rather than delivered cut short.
#[derive(Clone)]
pub struct OutputCapture {
    inner: Arc<Shared>,
    limit: usize,
}

struct Shared {
    buffer: Mutex<BytesMut>,
    overflowed: AtomicBool,
}

#[derive(Debug, thiserror::Error)]
#[error("output exceeds the limit of {0} bytes")]
struct OutputTooLarge(usize);

impl OutputCapture {
    pub fn new(limit: usize) -> Self {
        Self {
            inner: Arc::new(Shared {
                buffer: Mutex::new(BytesMut::new()),
                overflowed: AtomicBool::new(false),
            }),
            limit,
        }
    }

    /// `Some(limit)` if the guest tried to write past the limit.
    pub fn overflowed(&self) -> Option<usize> {
        self.inner
            .overflowed
            .load(Ordering::Relaxed)
            .then_some(self.limit)
    }

    /// Takes what was written so far.
    pub fn take(&self) -> Bytes {
        std::mem::take(&mut *crate::lock(&self.inner.buffer)).freeze()
    }

    fn append(&self, bytes: &[u8]) -> Result<(), OutputTooLarge> {
        let mut buffer = crate::lock(&self.inner.buffer);
        if buffer.len().saturating_add(bytes.len()) > self.limit {
            self.inner.overflowed.store(true, Ordering::Relaxed);
            return Err(OutputTooLarge(self.limit));
        }
        buffer.extend_from_slice(bytes);
        Ok(())
    }
}

#[wasmtime_wasi::async_trait]
impl OutputStream for OutputCapture {
    fn write(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        self.append(&bytes)
            .map_err(|error| StreamError::Trap(wasmtime::Error::new(error)))
    }
    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }
    fn check_write(&mut self) -> Result<usize, StreamError> {
        Ok(WRITE_PERMIT)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for OutputCapture {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for OutputCapture {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Poll::Ready(
            self.append(buf)
                .map(|()| buf.len())
                .map_err(|error| std::io::Error::new(std::io::ErrorKind::StorageFull, error)),
        )
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl IsTerminal for OutputCapture {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for OutputCapture {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

/// Keeps the first `limit` bytes of a log stream and counts the rest. It
/// never fails a write: a chatty guest loses log lines, not its call.
#[derive(Clone)]
pub struct LogCapture {
    inner: Arc<LogShared>,
    limit: usize,
}

struct LogShared {
    buffer: Mutex<BytesMut>,
    dropped: AtomicUsize,
}

impl LogCapture {
    pub fn new(limit: usize) -> Self {
        Self {
            inner: Arc::new(LogShared {
                buffer: Mutex::new(BytesMut::new()),
                dropped: AtomicUsize::new(0),
            }),
            limit,
        }
    }

    /// Takes the kept bytes and the count of dropped ones, resetting both.
    pub fn take(&self) -> (Bytes, usize) {
        let kept = std::mem::take(&mut *crate::lock(&self.inner.buffer)).freeze();
        (kept, self.inner.dropped.swap(0, Ordering::Relaxed))
    }

    fn append(&self, bytes: &[u8]) {
        let mut buffer = crate::lock(&self.inner.buffer);
        let room = self.limit.saturating_sub(buffer.len());
        let kept = room.min(bytes.len());
        buffer.extend_from_slice(&bytes[..kept]);
        if kept < bytes.len() {
            self.inner
                .dropped
                .fetch_add(bytes.len() - kept, Ordering::Relaxed);
        }
    }
}

#[wasmtime_wasi::async_trait]
impl OutputStream for LogCapture {
    fn write(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        self.append(&bytes);
        Ok(())
    }
    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }
    fn check_write(&mut self) -> Result<usize, StreamError> {
        Ok(WRITE_PERMIT)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for LogCapture {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for LogCapture {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.append(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl IsTerminal for LogCapture {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LogCapture {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

/// A body that fails, and records that it did, once more than `limit`
/// bytes have passed through it.
struct LimitedBody {
    inner: super::GuestBody,
    remaining: usize,
    exceeded: Arc<AtomicBool>,
    error: fn() -> wasmtime_wasi_http::Error,
}

impl http_body::Body for LimitedBody {
    type Data = Bytes;
    type Error = wasmtime_wasi_http::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let frame = std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx));
        if let Some(Ok(frame)) = &frame
            && let Some(data) = frame.data_ref()
        {
            if data.len() > self.remaining {
                self.exceeded.store(true, Ordering::Relaxed);
                return Poll::Ready(Some(Err((self.error)())));
            }
            self.remaining -= data.len();
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Wraps `body` so that it fails with `error()` past `limit` bytes, setting
/// `exceeded` when it does.
pub fn limit_body(
    body: super::GuestBody,
    limit: usize,
    exceeded: Arc<AtomicBool>,
    error: fn() -> wasmtime_wasi_http::Error,
) -> super::GuestBody {
    use http_body_util::BodyExt;
    LimitedBody {
        inner: body,
        remaining: limit,
        exceeded,
        error,
    }
    .boxed_unsync()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_capture_refuses_a_write_past_its_limit_and_says_so() {
        let mut out = OutputCapture::new(8);
        out.write(Bytes::from_static(b"12345")).expect("fits");
        assert!(out.overflowed().is_none());
        assert!(matches!(
            out.write(Bytes::from_static(b"6789")),
            Err(StreamError::Trap(_))
        ));
        assert_eq!(out.overflowed(), Some(8));
        assert_eq!(&out.take()[..], b"12345");
    }

    #[test]
    fn log_capture_keeps_the_head_and_counts_the_rest() {
        let mut log = LogCapture::new(4);
        log.write(Bytes::from_static(b"abc")).expect("write");
        log.write(Bytes::from_static(b"defg")).expect("never fails");
        let (kept, dropped) = log.take();
        assert_eq!(&kept[..], b"abcd");
        assert_eq!(dropped, 3);
        assert_eq!(log.take(), (Bytes::new(), 0));
    }
}
