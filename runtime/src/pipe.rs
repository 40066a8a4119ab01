//! Guest output streams (stdout, stderr): kept in memory up to a cap; bytes
//! past it are accepted and discarded at once, and counted.
//!
//! A stream that refused writes past its cap would turn a loud guest into a
//! failed one (Rust's `println!` panics when a write fails) or a stalled one
//! (a guest waiting for a full stream to drain spends its whole timeout);
//! one that kept everything would be a memory bomb. Accepting and dropping
//! costs the guest nothing and the host nothing.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};

/// How much a guest may write in one go (WASI's `check-write` permit). Any
/// size works, since nothing is ever refused; a large one means few calls.
const PERMIT: usize = 1 << 20;

#[derive(Default)]
struct Kept {
    bytes: BytesMut,
    dropped: u64,
}

/// An output stream that keeps its first `cap` bytes.
#[derive(Clone)]
pub struct CappedPipe {
    cap: usize,
    kept: Arc<Mutex<Kept>>,
}

impl CappedPipe {
    pub fn new(cap: usize) -> CappedPipe {
        CappedPipe {
            cap,
            kept: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Kept> {
        self.kept.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What was kept.
    pub fn contents(&self) -> Bytes {
        self.lock().bytes.clone().freeze()
    }

    /// Bytes written past the cap, discarded.
    pub fn dropped(&self) -> u64 {
        self.lock().dropped
    }

    fn take(&self, buf: &[u8]) {
        let mut kept = self.lock();
        let room = self.cap.saturating_sub(kept.bytes.len());
        let keep = buf.len().min(room);
        kept.bytes.extend_from_slice(&buf[..keep]);
        kept.dropped += (buf.len() - keep) as u64;
    }
}

#[async_trait::async_trait]
impl OutputStream for CappedPipe {
    fn write(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        self.take(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        Ok(PERMIT)
    }
}

#[async_trait::async_trait]
impl Pollable for CappedPipe {
    async fn ready(&mut self) {}
}

impl AsyncWrite for CappedPipe {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.take(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl IsTerminal for CappedPipe {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CappedPipe {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_first_bytes_and_counts_the_rest() {
        let mut pipe = CappedPipe::new(5);
        OutputStream::write(&mut pipe, Bytes::from_static(b"abc")).unwrap();
        OutputStream::write(&mut pipe, Bytes::from_static(b"defgh")).unwrap();
        assert_eq!(pipe.check_write().unwrap(), PERMIT);
        OutputStream::write(&mut pipe, Bytes::from_static(b"ijk")).unwrap();
        assert_eq!(pipe.contents(), "abcde");
        assert_eq!(pipe.dropped(), 6);
    }
}
