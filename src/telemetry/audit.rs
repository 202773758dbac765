//! The audit log: one JSON line per request and per tunnel, written by a background task so a
//! slow terminal never stalls a request. It names the agent, route, credential and the version's
//! fingerprint; it never holds a secret or a query string (a query-injected key would be in it).
//! When the writer falls behind, lines are dropped and counted rather than buffered without end.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::Notify;

use crate::telemetry::Metrics;

/// Bytes of lines waiting for the writer before new ones are dropped (about 65,000 lines).
const MAX_PENDING: usize = 16 * 1024 * 1024;

/// Lines are written in batches: this long after the first line of a batch, or as soon as this
/// much is waiting. One write per request cost 15 % of keep-alive throughput, and waking the
/// writer for every line cost more than the write: requests append to one buffer and only the
/// first line of a batch wakes the writer.
const BATCH_BYTES: usize = 64 * 1024;
const BATCH_WAIT: std::time::Duration = std::time::Duration::from_millis(20);

/// Where audit lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditOutput {
    Stdout,
    File(PathBuf),
    Off,
}

#[derive(Clone)]
pub struct AuditLog {
    shared: Option<Arc<Shared>>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("on", &self.is_on())
            .finish()
    }
}

/// What requests and the writer share.
struct Shared {
    /// Serialised lines, each ending in a newline, not yet handed to the writer.
    pending: Mutex<Vec<u8>>,
    /// A batch has begun (its first line landed in an empty buffer).
    batch_started: Notify,
    /// The buffer reached `BATCH_BYTES`: write without waiting out `BATCH_WAIT`.
    batch_full: Notify,
    output: tokio::sync::Mutex<BufWriter<Box<dyn AsyncWrite + Send + Unpin>>>,
}

impl AuditLog {
    /// Opens the output and starts the writer task.
    pub async fn start(output: &AuditOutput) -> std::io::Result<Self> {
        let writer: Box<dyn AsyncWrite + Send + Unpin> = match output {
            AuditOutput::Off => return Ok(Self { shared: None }),
            AuditOutput::Stdout => Box::new(tokio::io::stdout()),
            AuditOutput::File(path) => {
                if let Some(parent) = path.parent() {
                    tokio::fs::create_dir_all(parent).await?;
                }
                Box::new(
                    tokio::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(path)
                        .await?,
                )
            }
        };
        let shared = Arc::new(Shared {
            pending: Mutex::new(Vec::with_capacity(BATCH_BYTES)),
            batch_started: Notify::new(),
            batch_full: Notify::new(),
            output: tokio::sync::Mutex::new(BufWriter::new(writer)),
        });
        tokio::spawn(write_batches(shared.clone()));
        Ok(Self {
            shared: Some(shared),
        })
    }

    pub fn is_on(&self) -> bool {
        self.shared.is_some()
    }

    /// Appends one line for the writer; never waits for it. A line that does not fit under
    /// `MAX_PENDING` is dropped and counted.
    pub fn record(&self, line: &impl serde::Serialize, metrics: &Metrics) {
        self.record_with(|out| serde_json::to_writer(out, line), metrics);
    }

    /// [`record`](Self::record) for a line that writes its own JSON (no newline) into `out`.
    pub fn record_with(
        &self,
        write: impl FnOnce(&mut Vec<u8>) -> Result<(), serde_json::Error>,
        metrics: &Metrics,
    ) {
        let Some(shared) = &self.shared else { return };
        let Ok(mut pending) = shared.pending.lock() else {
            metrics.audit_dropped.inc();
            return;
        };
        let before = pending.len();
        if before >= MAX_PENDING || write(&mut pending).is_err() {
            pending.truncate(before);
            metrics.audit_dropped.inc();
            return;
        }
        pending.push(b'\n');
        let after = pending.len();
        drop(pending);
        if before == 0 {
            shared.batch_started.notify_one();
        }
        if before < BATCH_BYTES && after >= BATCH_BYTES {
            shared.batch_full.notify_one();
        }
    }

    /// Writes every line recorded so far (at shutdown, after the last request).
    pub async fn flush(&self) {
        if let Some(shared) = &self.shared {
            shared.write_pending(&mut Vec::new()).await;
        }
    }
}

impl Shared {
    /// Hands what is pending to the output; `spare` (emptied) becomes the next buffer, so the
    /// two buffers are reused rather than reallocated.
    async fn write_pending(&self, spare: &mut Vec<u8>) {
        let mut output = self.output.lock().await;
        spare.clear();
        match self.pending.lock() {
            Ok(mut pending) => std::mem::swap(&mut *pending, spare),
            Err(_) => return,
        }
        if spare.is_empty() {
            return;
        }
        let written = output.write_all(spare).await;
        if let Err(error) = written.and(output.flush().await) {
            tracing::warn!(%error, "audit log write failed");
        }
        // A burst may have grown this buffer to MAX_PENDING; do not keep that much for good.
        if spare.capacity() > 4 * BATCH_BYTES {
            *spare = Vec::with_capacity(BATCH_BYTES);
        }
    }
}

/// The writer: sleeps until a batch begins, lets it gather for `BATCH_WAIT` (or until it is
/// full), writes it. Lives as long as the runtime; `flush` covers the lines of the last batch.
async fn write_batches(shared: Arc<Shared>) {
    let mut spare = Vec::with_capacity(BATCH_BYTES);
    loop {
        shared.batch_started.notified().await;
        tokio::select! {
            () = tokio::time::sleep(BATCH_WAIT) => {}
            () = shared.batch_full.notified() => {}
        }
        shared.write_pending(&mut spare).await;
    }
}
