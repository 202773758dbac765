//! The audit log: one JSON line per request and per tunnel, written by a background task so a
//! slow terminal never stalls a request. It names the agent, route, credential and the version's
//! fingerprint; it never holds a secret or a query string (a query-injected key would be in it).
//! When the writer falls behind, lines are dropped and counted rather than buffered without end.

use std::path::PathBuf;

use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::mpsc;

use crate::telemetry::Metrics;

/// Lines waiting for the writer before new ones are dropped.
const QUEUE: usize = 65_536;

/// Where audit lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditOutput {
    Stdout,
    File(PathBuf),
    Off,
}

#[derive(Debug, Clone)]
pub struct AuditLog {
    lines: Option<mpsc::Sender<String>>,
}

impl AuditLog {
    /// Opens the output and starts the writer task.
    pub async fn start(output: &AuditOutput) -> std::io::Result<Self> {
        let writer: Box<dyn AsyncWrite + Send + Unpin> = match output {
            AuditOutput::Off => return Ok(Self { lines: None }),
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
        let (lines, receiver) = mpsc::channel(QUEUE);
        tokio::spawn(write_lines(receiver, BufWriter::new(writer)));
        Ok(Self { lines: Some(lines) })
    }

    pub fn is_on(&self) -> bool {
        self.lines.is_some()
    }

    /// Queues one line; never waits.
    pub fn record(&self, line: &impl serde::Serialize, metrics: &Metrics) {
        let Some(lines) = &self.lines else { return };
        let Ok(text) = serde_json::to_string(line) else {
            return;
        };
        if lines.try_send(text).is_err() {
            metrics.audit_dropped.inc();
        }
    }
}

/// Lines are flushed in batches: when this much is buffered or this long after the first line of
/// a batch. One write per request cost 15 % of keep-alive throughput; batches cost a few.
const BATCH_BYTES: usize = 64 * 1024;
const BATCH_WAIT: std::time::Duration = std::time::Duration::from_millis(20);

async fn write_lines(
    mut receiver: mpsc::Receiver<String>,
    mut writer: BufWriter<Box<dyn AsyncWrite + Send + Unpin>>,
) {
    while let Some(first) = receiver.recv().await {
        let mut batch = first;
        batch.push('\n');
        let deadline = tokio::time::Instant::now() + BATCH_WAIT;
        while batch.len() < BATCH_BYTES {
            match tokio::time::timeout_at(deadline, receiver.recv()).await {
                Ok(Some(line)) => {
                    batch.push_str(&line);
                    batch.push('\n');
                }
                Ok(None) | Err(_) => break,
            }
        }
        let written = writer.write_all(batch.as_bytes()).await;
        if let Err(error) = written.and(writer.flush().await) {
            tracing::warn!(%error, "audit log write failed");
        }
    }
}
