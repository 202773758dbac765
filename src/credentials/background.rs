//! One low-priority thread for bulk reads of file and environment sources. A 10,000-file reload
//! is ~80 ms of CPU; on the blocking pool at normal priority it took a core from the requests in
//! flight (their p99 rose by ~3 ms on two cores). At nice 19 the kernel runs requests first and
//! the reload in the gaps; under full load it still gets a share, so rotations are not starved.

use std::sync::mpsc;
use std::sync::OnceLock;

type Job = Box<dyn FnOnce() + Send>;

/// The reader's queue; `None` when the thread could not be started.
static READER: OnceLock<Option<mpsc::Sender<Job>>> = OnceLock::new();

/// The nice value of the reader thread (19: the lowest priority).
const READER_NICE: i32 = 19;

/// Runs `work` on the low-priority reader and waits for its result (on the blocking pool if the
/// reader is unavailable). `None` only if `work` panicked.
pub async fn run_in_background<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    let (reply, answer) = tokio::sync::oneshot::channel();
    let job: Job = Box::new(move || {
        let _ = reply.send(work());
    });
    match reader() {
        Some(queue) => match queue.send(job) {
            Ok(()) => answer.await.ok(),
            Err(mpsc::SendError(job)) => {
                tokio::task::spawn_blocking(job).await.ok()?;
                answer.await.ok()
            }
        },
        None => {
            tokio::task::spawn_blocking(job).await.ok()?;
            answer.await.ok()
        }
    }
}

fn reader() -> Option<&'static mpsc::Sender<Job>> {
    READER
        .get_or_init(|| {
            let (queue, jobs) = mpsc::channel::<Job>();
            std::thread::Builder::new()
                .name("keystamp-reader".into())
                .spawn(move || {
                    lower_priority();
                    for job in jobs {
                        // A panicking job drops its reply; the caller sees `None`.
                        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                    }
                })
                .ok()
                .map(|_| queue)
        })
        .as_ref()
}

#[cfg(target_os = "linux")]
fn lower_priority() {
    let thread = rustix::thread::gettid();
    if let Err(error) = rustix::process::setpriority_process(Some(thread), READER_NICE) {
        tracing::debug!(%error, "the credential reader keeps normal priority");
    }
}

#[cfg(not(target_os = "linux"))]
fn lower_priority() {
    let _ = READER_NICE;
}
