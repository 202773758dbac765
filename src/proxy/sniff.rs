//! Tells a TLS ClientHello from plain HTTP at the start of a CONNECT tunnel (some clients, such
//! as Node's undici, tunnel `http://` URLs too), and hands the bytes it read back to the reader.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// The first byte of every TLS record carrying a handshake.
pub const TLS_HANDSHAKE: u8 = 0x16;

/// A stream with bytes already read from it put back in front.
pub struct Prefixed<S> {
    prefix: bytes::Bytes,
    inner: S,
}

impl<S> Prefixed<S> {
    /// `inner`, with `prefix` (bytes read from it already) read again first.
    pub fn new(prefix: bytes::Bytes, inner: S) -> Self {
        Self { prefix, inner }
    }
}

/// Bytes the sniff asks the socket for at once: a whole ClientHello (under 2 KiB for real
/// agents), so the TLS handshake reads it from memory rather than with a second system call.
const SNIFF_READ: usize = 4096;

/// Reads what the agent sent first (at least one byte): `Ok((true, ..))` when it opens a TLS
/// handshake. Every byte read is handed back in front of the stream.
pub async fn sniff_tls<S: AsyncRead + Unpin>(mut stream: S) -> io::Result<(bool, Prefixed<S>)> {
    let mut first = bytes::BytesMut::with_capacity(SNIFF_READ);
    if stream.read_buf(&mut first).await? == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok((
        first.first() == Some(&TLS_HANDSHAKE),
        Prefixed::new(first.freeze(), stream),
    ))
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() && buf.remaining() > 0 {
            let take = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix.split_to(take));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
