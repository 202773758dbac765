//! Makes every path keystamp reads or watches absolute once, at load, against the working
//! directory at start. The watcher's events carry absolute paths; a relative spelling
//! (`conf/x.yaml`, `./x`, `../dir/x`) left as written never matched them, so hot reload went deaf.
//! Lexical only: symlinks are never resolved (kubelet's `..data` swap must stay visible).

use std::path::{Component, Path, PathBuf};

/// `path` joined onto the working directory when relative. Leading `..` components climb the
/// working directory itself, which the kernel reports without symlinks, so dropping them is
/// exact; a `..` after a named component stays, since that component may be a symlink.
pub fn absolute(path: &Path) -> PathBuf {
    if path.is_absolute() {
        return path.to_path_buf();
    }
    let Ok(mut joined) = std::env::current_dir() else {
        return path.to_path_buf();
    };
    let mut components = path.components().peekable();
    while let Some(component) = components.peek() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                joined.pop();
            }
            _ => break,
        }
        components.next();
    }
    joined.extend(components);
    joined
}

/// A path from the config, relative to the config file's directory `base` when not absolute.
/// `.` components are dropped (`./secrets/x` reads as `<base>/secrets/x` in logs and `/status`).
pub fn resolve(base: &Path, path: &str) -> PathBuf {
    base.join(path).components().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_spellings_become_the_same_absolute_path() {
        let cwd = std::env::current_dir().unwrap();
        let parent = cwd.parent().unwrap().to_path_buf();
        assert_eq!(absolute(Path::new("conf/k.yaml")), cwd.join("conf/k.yaml"));
        assert_eq!(
            absolute(Path::new("./conf/k.yaml")),
            cwd.join("conf/k.yaml")
        );
        assert_eq!(
            absolute(Path::new("../dir/k.yaml")),
            parent.join("dir/k.yaml")
        );
        assert_eq!(
            absolute(Path::new("/etc/k.yaml")),
            PathBuf::from("/etc/k.yaml")
        );
        // A `..` after a named component may climb out of a symlink: kept as written.
        assert_eq!(
            absolute(Path::new("conf/../k.yaml")),
            cwd.join("conf/../k.yaml")
        );
    }

    #[test]
    fn config_relative_paths_resolve_against_the_config_directory() {
        assert_eq!(
            resolve(Path::new("/etc/ks"), "tok"),
            PathBuf::from("/etc/ks/tok")
        );
        assert_eq!(
            resolve(Path::new("/etc/ks"), "/run/tok"),
            PathBuf::from("/run/tok")
        );
        assert_eq!(
            resolve(Path::new("/etc/ks"), "./a/./tok"),
            PathBuf::from("/etc/ks/a/tok")
        );
        assert_eq!(
            resolve(Path::new("/etc/ks"), "../tok"),
            PathBuf::from("/etc/ks/../tok")
        );
    }
}
