//! How the rest of keystamp reaches the one writer: "re-read everything now" (SIGHUP) and the
//! 401 path's "is there a version newer than the one just rejected?". A cheap, cloneable handle.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::credentials::Version;

/// What the rest of keystamp can ask of the reloader.
pub(super) enum Ask {
    ReloadAll,
    /// Re-read one credential now (an operator's or a rotation job's push).
    Refresh {
        credential: Arc<str>,
        reply: oneshot::Sender<Option<Refreshed>>,
    },
    NewerThan {
        credential: Arc<str>,
        stale: String,
        reply: oneshot::Sender<Option<Arc<Version>>>,
    },
}

impl std::fmt::Debug for Ask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ask::ReloadAll => f.write_str("ReloadAll"),
            Ask::Refresh { credential, .. } => write!(f, "Refresh({credential})"),
            Ask::NewerThan { credential, .. } => write!(f, "NewerThan({credential})"),
        }
    }
}

/// What a refresh found: the credential's fingerprint before and after, and why a read failed.
#[derive(Debug, Clone)]
pub struct Refreshed {
    pub before: Option<String>,
    pub after: Option<String>,
    pub last_error: Option<String>,
}

/// A cheap, cloneable way to reach the reloader.
#[derive(Clone, Debug)]
pub struct ReloadHandle {
    asks: mpsc::UnboundedSender<Ask>,
}

/// The receiving end, handed to the reloader.
pub struct ReloadRequests(pub(super) mpsc::UnboundedReceiver<Ask>);

impl ReloadHandle {
    pub fn channel() -> (Self, ReloadRequests) {
        let (asks, receiver) = mpsc::unbounded_channel();
        (Self { asks }, ReloadRequests(receiver))
    }

    /// Re-reads the config and every source now (SIGHUP).
    pub fn reload_all(&self) {
        let _ = self.asks.send(Ask::ReloadAll);
    }

    /// Re-reads `credential` now; `None` when there is no such credential.
    pub async fn refresh(&self, credential: &str) -> Option<Refreshed> {
        let (reply, answer) = oneshot::channel();
        let ask = Ask::Refresh {
            credential: Arc::from(credential),
            reply,
        };
        self.asks.send(ask).ok()?;
        answer.await.ok().flatten()
    }

    /// A version of `credential` newer than the one with fingerprint `stale`, fetching one now if
    /// the source can say (re-read the file, ask the token endpoint). `None`: there is none.
    pub async fn newer_than(&self, credential: &Arc<str>, stale: &str) -> Option<Arc<Version>> {
        let (reply, answer) = oneshot::channel();
        let ask = Ask::NewerThan {
            credential: credential.clone(),
            stale: stale.to_string(),
            reply,
        };
        self.asks.send(ask).ok()?;
        answer.await.ok().flatten()
    }
}
