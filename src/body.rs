//! The one body type responses and forwarded requests use: boxed, streaming, never buffered whole.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, BodyStream, Empty, Full, StreamBody};
use hyper::body::Frame;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub fn empty() -> ProxyBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// A failure reading the agent's request body (a bad chunk size, oversized chunk extensions or
/// trailers, an early end): the agent's fault, never to be blamed on the upstream.
#[derive(Debug, thiserror::Error)]
#[error("the agent's request body could not be read: {0}")]
pub struct AgentBodyError(#[source] hyper::Error);

/// Set when an agent's streamed body failed. An HTTP/1.1 upstream request fails with the
/// [`AgentBodyError`] in its chain; an h2 one only resets its stream, so the sender checks this.
#[derive(Clone, Default)]
pub struct AgentBodyFailed(Arc<AtomicBool>);

impl AgentBodyFailed {
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// Streams an agent's request body through as it arrives; its errors are [`AgentBodyError`]s,
/// and each sets `failed`.
pub fn from_agent(body: hyper::body::Incoming, failed: AgentBodyFailed) -> ProxyBody {
    body.map_err(move |error| -> BoxError {
        failed.0.store(true, Ordering::Release);
        Box::new(AgentBodyError(error))
    })
    .boxed_unsync()
}

/// How much of a refused request's body is read and discarded before the refusal is sent.
pub const DISCARD_LIMIT: usize = 4 * 1024 * 1024;
/// How long the agent gets to finish sending a refused request's body.
const DISCARD_TIME: std::time::Duration = std::time::Duration::from_secs(10);

/// Reads and throws away what is left of an agent's body, up to [`DISCARD_LIMIT`] bytes and
/// [`DISCARD_TIME`], so that the answer keystamp gives instead of forwarding reaches an agent
/// still sending (the way servers linger before closing): answering mid-upload made clients
/// report a broken pipe or an h2 stream reset instead of the refusal. Returns whether the body
/// ended; past either bound the connection closes after the answer.
pub async fn discard<B>(mut body: B) -> bool
where
    B: http_body::Body + Unpin,
{
    let reading = async {
        let mut read = 0usize;
        loop {
            match body.frame().await {
                None => return true,
                Some(Err(_)) => return false,
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        read = read.saturating_add(bytes::Buf::remaining(data));
                        if read > DISCARD_LIMIT {
                            return false;
                        }
                    }
                }
            }
        }
    };
    tokio::time::timeout(DISCARD_TIME, reading)
        .await
        .unwrap_or(false)
}

/// Streams an upstream's body through as it arrives.
pub fn stream<B>(body: B) -> ProxyBody
where
    B: http_body::Body<Data = Bytes, Error = hyper::Error> + Send + 'static,
{
    body.map_err(|error| -> BoxError { Box::new(error) })
        .boxed_unsync()
}

/// Reads up to `limit` bytes from the front of `body` and returns them with a body that yields
/// the same bytes again followed by the rest, still streaming.
pub async fn peek<B>(mut body: B, limit: usize) -> (Bytes, ProxyBody)
where
    B: http_body::Body<Data = Bytes, Error = hyper::Error> + Send + Unpin + 'static,
{
    let mut prefix = bytes::BytesMut::new();
    let mut trailers = None;
    let mut ended = false;
    while prefix.len() < limit {
        match body.frame().await {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => prefix.extend_from_slice(&data),
                Err(frame) => {
                    trailers = frame.into_trailers().ok();
                    ended = true;
                    break;
                }
            },
            Some(Err(_)) | None => {
                ended = true;
                break;
            }
        }
    }
    let prefix = prefix.freeze();
    let head = futures_util::stream::iter(
        std::iter::once(Ok::<_, BoxError>(Frame::data(prefix.clone())))
            .chain(trailers.map(|t| Ok(Frame::trailers(t)))),
    );
    let rebuilt = if ended {
        StreamBody::new(head).boxed_unsync()
    } else {
        let rest = BodyStream::new(body)
            .map(|frame| frame.map_err(|error| -> BoxError { Box::new(error) }));
        StreamBody::new(head.chain(rest)).boxed_unsync()
    };
    (prefix, rebuilt)
}

/// A body that counts the data bytes passing through it into `counter`, and calls `on_end`
/// once with the total when it ends or is dropped (the agent went away mid-stream).
pub struct Counted {
    inner: ProxyBody,
    bytes: u64,
    counter: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
    on_end: Option<Box<dyn FnOnce(u64) + Send>>,
}

impl Counted {
    pub fn new(
        inner: ProxyBody,
        counter: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
        on_end: Option<Box<dyn FnOnce(u64) + Send>>,
    ) -> Self {
        Self {
            inner,
            bytes: 0,
            counter,
            on_end,
        }
    }

    fn end(&mut self) {
        if let Some(on_end) = self.on_end.take() {
            on_end(self.bytes);
        }
    }
}

impl http_body::Body for Counted {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            std::task::Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let length = data.len() as u64;
                    self.bytes += length;
                    if let Some(counter) = &self.counter {
                        counter.fetch_add(length, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }
            std::task::Poll::Ready(None) => self.end(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.end();
    }
}
