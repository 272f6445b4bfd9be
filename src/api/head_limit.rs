//! The answer to a request head over the limits (hyper's `max_buf_size`, 64 headers).
//!
//! hyper refuses such a request itself, with an empty `431`, before any router or
//! middleware sees it. This wrapper around a connection's stream gives that refusal the
//! API's own shape: an OperationOutcome when the request line names a FHIR route (every
//! error on a FHIR route is one), plain text otherwise, like the `413`. It notes the start
//! of each request as it is read (at most one request line, 256 bytes) and, when hyper
//! writes its `431`, writes the full answer in its place; hyper closes the connection
//! after it. Nothing else passes through differently.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::access::FHIR_JSON;

/// How much of a request line is kept to see its path.
const LINE: usize = 256;

/// A connection stream whose `431` answers say why, in the route's format.
#[derive(Debug)]
pub struct HeadLimit<S> {
    inner: S,
    /// The start of the request being read, until its first line is complete.
    line: Vec<u8>,
    /// A new request starts with the next bytes read.
    at_start: bool,
    /// The request being read names a FHIR route.
    fhir: bool,
    /// The replacement answer still to write, and how much of it is written.
    pending: Option<(Vec<u8>, usize)>,
}

impl<S> HeadLimit<S> {
    /// Wraps a connection's stream.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            line: Vec::new(),
            at_start: true,
            fhir: false,
            pending: None,
        }
    }

    fn note_read(&mut self, bytes: &[u8]) {
        if self.at_start {
            self.line.clear();
            self.fhir = false;
            self.at_start = false;
        }
        if self.line.len() >= LINE || self.line.contains(&b'\n') {
            return;
        }
        let room = LINE - self.line.len();
        self.line
            .extend_from_slice(bytes.get(..room.min(bytes.len())).unwrap_or_default());
        // "GET /fhir/… HTTP/1.1": the path is the second word of the line.
        let first = self.line.split(|b| *b == b'\n').next().unwrap_or_default();
        let path = first.split(|b| *b == b' ').nth(1).unwrap_or_default();
        self.fhir = path == b"/fhir" || path.starts_with(b"/fhir/") || path.starts_with(b"/fhir?");
    }

    fn replacement(&self) -> Vec<u8> {
        const TEXT: &str =
            "request head too large (at most the configured header bytes and 64 headers)";
        let (content_type, body) = if self.fhir {
            let oo = carecache_fhir::model::Resource::OperationOutcome(
                carecache_fhir::document::operation_outcome("error", "too-long", TEXT),
            );
            (FHIR_JSON, serde_json::to_vec(&oo).unwrap_or_default())
        } else {
            (
                "text/plain; charset=utf-8",
                format!("{TEXT}\n").into_bytes(),
            )
        };
        let mut out = format!(
            "HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        out.extend_from_slice(&body);
        out
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for HeadLimit<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled
            && let Some(new) = buf.filled().get(before..)
            && !new.is_empty()
        {
            this.note_read(new);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for HeadLimit<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.pending.is_none() && buf.starts_with(b"HTTP/1.1 431 ") {
            this.pending = Some((this.replacement(), 0));
        }
        let Some((answer, written)) = this.pending.as_mut() else {
            // An answer is being written: the next bytes read start a new request.
            this.at_start = true;
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        };
        while let Some(rest) = answer.get(*written..).filter(|r| !r.is_empty()) {
            match Pin::new(&mut this.inner).poll_write(cx, rest) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => *written += n,
                other => return other,
            }
        }
        // hyper's own answer is taken as written: ours went in its place.
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
