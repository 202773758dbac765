//! One agent connection's life: accepted (backing off when the process is out of descriptors),
//! admitted under the `max_connections` cap or refused with a 503, counted for as long as its
//! socket lives (through a CONNECT upgrade too), and closed when idle or when keystamp drains.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::telemetry::Metrics;

/// Waited after a failed accept (out of file descriptors and the like) instead of spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// What a refused connection reads before it is closed.
const REFUSAL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nx-keystamp-error: too_many_connections\r\ncontent-type: application/json\r\ncontent-length: 77\r\nconnection: close\r\n\r\n{\"code\":\"too_many_connections\",\"message\":\"too many agent connections; retry\"}";

/// The next connection on `listener`, or `None` once `shutdown` is cancelled. Used by the proxy
/// and the admin listener alike.
pub async fn accept_next(
    listener: &TcpListener,
    shutdown: &CancellationToken,
) -> Option<TcpStream> {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => return None,
        };
        match accepted {
            Ok((stream, _peer)) => return Some(stream),
            Err(error) => {
                tracing::warn!(%error, "accept failed; backing off");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// The cap on agent connections served at once.
pub struct ConnectionCap {
    slots: Arc<Semaphore>,
    metrics: Arc<Metrics>,
}

impl ConnectionCap {
    pub fn new(max: usize, metrics: Arc<Metrics>) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(max)),
            metrics,
        }
    }

    /// Admits `stream` if a slot is free; otherwise answers 503 on it (best effort, never
    /// waiting), counts the refusal and closes it.
    pub fn admit(&self, stream: TcpStream) -> Option<TrackedStream> {
        let Ok(permit) = self.slots.clone().try_acquire_owned() else {
            self.metrics.connections_refused.inc();
            let _ = stream.try_write(REFUSAL);
            return None;
        };
        self.metrics.connections_open.inc();
        Some(TrackedStream {
            inner: stream,
            _permit: permit,
            open: self.metrics.connections_open.clone(),
        })
    }
}

/// An agent's socket that holds its slot and its `keystamp_connections_open` count until it is
/// dropped, wherever it ends up (hyper's connection, an intercepted or blind tunnel).
pub struct TrackedStream {
    inner: TcpStream,
    _permit: OwnedSemaphorePermit,
    open: prometheus::IntGauge,
}

impl Drop for TrackedStream {
    fn drop(&mut self) {
        self.open.dec();
    }
}

impl AsyncRead for TrackedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TrackedStream {
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

/// Whether a connection has requests in flight, and since when it has had none. A response
/// counts as in flight until its body ends, so a long SSE stream is never idle.
#[derive(Debug)]
pub struct IdleWatch {
    in_flight: AtomicUsize,
    quiet_since: Mutex<Instant>,
}

/// One request in flight; dropped when its response body ends.
pub struct InFlight(Arc<IdleWatch>);

impl IdleWatch {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            in_flight: AtomicUsize::new(0),
            quiet_since: Mutex::new(Instant::now()),
        })
    }

    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    /// Resolves once the connection has had nothing in flight for `idle`.
    async fn expired(&self, idle: Duration) {
        loop {
            let quiet_since = self
                .quiet_since
                .lock()
                .map_or_else(|_| Instant::now(), |at| *at);
            let deadline = quiet_since + idle;
            if deadline <= Instant::now() && self.in_flight.load(Ordering::Acquire) == 0 {
                return;
            }
            // Busy or not yet due: look again at the deadline, or a full period later.
            let next = if deadline > Instant::now() {
                deadline
            } else {
                Instant::now() + idle
            };
            tokio::time::sleep_until(next).await;
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            if let Ok(mut quiet_since) = self.0.quiet_since.lock() {
                *quiet_since = Instant::now();
            }
        }
    }
}

/// Serves a connection to its end. When keystamp drains, or the connection has been idle for
/// `idle`, lets in-flight requests finish and closes it (keep-alive ends, h2 sends GOAWAY).
pub async fn serve_until_done<C, E>(
    connection: C,
    shutdown: CancellationToken,
    idle: Option<(&IdleWatch, Duration)>,
    start_draining: impl FnOnce(Pin<&mut C>),
) where
    C: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    tokio::pin!(connection);
    let idle_expired = async {
        match idle {
            Some((watch, after)) => watch.expired(after).await,
            None => std::future::pending().await,
        }
    };
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = shutdown.cancelled() => {
            start_draining(connection.as_mut());
            connection.as_mut().await
        }
        () = idle_expired => {
            tracing::debug!("agent connection idle; closing it");
            start_draining(connection.as_mut());
            connection.as_mut().await
        }
    };
    if let Err(error) = result {
        tracing::debug!(%error, "connection ended with an error");
    }
}
