//! Tells a TLS ClientHello from plain HTTP at the start of a CONNECT tunnel (some clients, such
//! as Node's undici, tunnel `http://` URLs too), and hands the byte it read back to the reader.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// The first byte of every TLS record carrying a handshake.
const TLS_HANDSHAKE: u8 = 0x16;

/// A stream with bytes already read from it put back in front.
pub struct Prefixed<S> {
    prefix: Option<u8>,
    inner: S,
}

/// Reads the first byte of `stream`: `Ok((true, ..))` when it opens a TLS handshake.
pub async fn sniff_tls<S: AsyncRead + Unpin>(mut stream: S) -> io::Result<(bool, Prefixed<S>)> {
    let first = stream.read_u8().await?;
    Ok((
        first == TLS_HANDSHAKE,
        Prefixed {
            prefix: Some(first),
            inner: stream,
        },
    ))
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(byte) = this.prefix {
            if buf.remaining() > 0 {
                buf.put_slice(&[byte]);
                this.prefix = None;
                return Poll::Ready(Ok(()));
            }
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
