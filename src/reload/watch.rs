//! Watches the directories that hold secret files and the config, non-recursively. kubelet
//! updates a secret volume by writing a new hidden directory and swapping the `..data` symlink,
//! so a watch on the file itself goes deaf after the first swap; a watch on its directory does
//! not. A directory that does not exist yet is covered by a watch on its nearest existing
//! ancestor, and re-armed when it appears or when its identity changes (remounted).

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc::UnboundedSender;

/// Where a wanted directory's watch currently sits.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Armed {
    /// The directory itself, or its nearest existing ancestor while it is missing.
    on: PathBuf,
    /// (device, inode) of `on` when armed, to notice a directory replaced under the watch.
    identity: Option<(u64, u64)>,
}

pub struct DirWatcher {
    watcher: notify::RecommendedWatcher,
    armed: BTreeMap<PathBuf, Armed>,
    /// Paths whose events matter; everything else in a watched directory (a log file, an
    /// editor's swap file) is ignored.
    relevant: Arc<RwLock<BTreeSet<PathBuf>>>,
}

impl DirWatcher {
    /// Every relevant event sends `()` on `events`; the reloader debounces and re-reads.
    pub fn new(events: UnboundedSender<()>) -> notify::Result<Self> {
        let relevant: Arc<RwLock<BTreeSet<PathBuf>>> = Arc::default();
        let filter = relevant.clone();
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            match event {
                // Our own reads show up as access events; they change nothing.
                Ok(event) if matches!(event.kind, EventKind::Access(_)) => {}
                Ok(event) if !event.paths.iter().any(|path| is_relevant(&filter, path)) => {}
                Ok(_) | Err(_) => {
                    let _ = events.send(());
                }
            }
        })?;
        Ok(Self {
            watcher,
            armed: BTreeMap::new(),
            relevant,
        })
    }

    /// Watches the directories of `files` (and `files` themselves) from now on.
    pub fn set_files(&mut self, files: BTreeSet<PathBuf>) {
        let dirs: BTreeSet<PathBuf> = files
            .iter()
            .filter_map(|f| f.parent().map(Path::to_path_buf))
            .collect();
        if let Ok(mut relevant) = self.relevant.write() {
            *relevant = files.iter().chain(dirs.iter()).cloned().collect();
        }
        self.set_dirs(dirs);
    }

    fn set_dirs(&mut self, dirs: BTreeSet<PathBuf>) {
        let stale: Vec<PathBuf> = self
            .armed
            .keys()
            .filter(|d| !dirs.contains(*d))
            .cloned()
            .collect();
        for dir in stale {
            if let Some(armed) = self.armed.remove(&dir) {
                self.unwatch_if_unused(&armed.on);
            }
        }
        for dir in dirs {
            self.armed.entry(dir).or_insert(Armed {
                on: PathBuf::new(),
                identity: None,
            });
        }
        self.rearm();
    }

    /// Re-arms watches whose directory appeared, vanished or was replaced. Cheap: one stat per
    /// directory. Returns whether anything changed (then sources should be re-read).
    pub fn rearm(&mut self) -> bool {
        let mut changed = false;
        let dirs: Vec<PathBuf> = self.armed.keys().cloned().collect();
        for dir in dirs {
            let target = nearest_existing(&dir);
            let wanted = Armed {
                identity: identity(&target),
                on: target,
            };
            let Some(current) = self.armed.get(&dir).cloned() else {
                continue;
            };
            if current == wanted {
                continue;
            }
            changed = true;
            if !current.on.as_os_str().is_empty() {
                self.unwatch_if_unused_except(&current.on, &dir);
            }
            match self.watcher.watch(&wanted.on, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    tracing::debug!(dir = %dir.display(), on = %wanted.on.display(), "watching");
                    self.armed.insert(dir, wanted);
                }
                Err(error) => {
                    tracing::warn!(dir = %dir.display(), %error, "cannot watch; the periodic resync still covers it");
                }
            }
        }
        changed
    }

    fn unwatch_if_unused(&mut self, on: &Path) {
        if !self.armed.values().any(|a| a.on == on) {
            let _ = self.watcher.unwatch(on);
        }
    }

    fn unwatch_if_unused_except(&mut self, on: &Path, except: &Path) {
        if !self.armed.iter().any(|(d, a)| d != except && a.on == on) {
            let _ = self.watcher.unwatch(on);
        }
    }
}

/// A watched file or directory itself, kubelet's `..data` swap entries, or anything on the way
/// to a directory that does not exist yet.
fn is_relevant(relevant: &RwLock<BTreeSet<PathBuf>>, path: &Path) -> bool {
    if path
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with(".."))
    {
        return true;
    }
    let Ok(relevant) = relevant.read() else {
        return true;
    };
    relevant.contains(path) || relevant.iter().any(|wanted| wanted.starts_with(path))
}

fn nearest_existing(dir: &Path) -> PathBuf {
    let mut candidate = dir;
    loop {
        if candidate.is_dir() {
            return candidate.to_path_buf();
        }
        match candidate.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => candidate = parent,
            _ => return PathBuf::from("/"),
        }
    }
}

fn identity(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}
