//! A small file store for the checkpoint token.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// Linux's limit on symbolic links followed while resolving one path.
const MAX_LINKS: usize = 40;

/// Keeps the last checkpoint's `next_batch` in one file, replaced atomically: a crash leaves
/// either the old token or the new one, never a torn file.
///
/// Save a token only after handling every event before its checkpoint; restart with
/// [`load`](Self::load) into [`Config::since`](crate::Config::since). Call
/// [`check_writable`](Self::check_writable) at start so that a file that cannot be replaced
/// is reported before the first checkpoint, not at every checkpoint.
///
/// The token is stored byte for byte, followed by one `\n`; [`load`](Self::load) returns
/// exactly what [`save`](Self::save) stored.
///
/// When the path is a symbolic link, the file it finally points to is replaced and the link
/// stays a link. The file must be a regular file: a FIFO, device, socket or directory is
/// refused, so a start never blocks on a FIFO.
///
/// A new file gets mode `0600` on Unix (the token is a position in the user's account); a
/// replaced file keeps its permission bits (its owner becomes the writing user).
#[derive(Clone, Debug)]
pub struct FileCheckpointStore {
    path: PathBuf,
}

/// Where a save lands: the final (non-link) path and, when it exists, its metadata.
struct Target {
    file: PathBuf,
    dir: PathBuf,
    name: OsString,
    existing: Option<fs::Metadata>,
}

impl FileCheckpointStore {
    /// A store at `path` (the file need not exist yet).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// The file this store writes.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The stored token, or `None` when there is no file or it is empty (or holds just `\n`).
    ///
    /// Strips exactly one trailing `\n`, the one [`save`](Self::save) appends, and nothing
    /// else. Read-only: it says nothing about whether later saves can succeed (see
    /// [`check_writable`](Self::check_writable)).
    ///
    /// A path that is not a regular file (after following links) fails with
    /// [`io::ErrorKind::InvalidInput`] before it is opened. The check and the open are two
    /// steps: a FIFO swapped in between them could still block the open.
    pub fn load(&self) -> io::Result<Option<String>> {
        let meta = match fs::metadata(&self.path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(at(&self.path, &self.path, e)),
        };
        regular(&self.path, &self.path, &meta)?;
        let wrap = |e| at(&self.path, &self.path, e);
        let mut file = File::open(&self.path).map_err(wrap)?;
        // Catches a swap for a directory or device after the check above.
        regular(&self.path, &self.path, &file.metadata().map_err(wrap)?)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(wrap)?;
        if bytes.last() == Some(&b'\n') {
            bytes.pop();
        }
        if bytes.is_empty() {
            return Ok(None);
        }
        String::from_utf8(bytes).map(Some).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: checkpoint file is not UTF-8", self.path.display()),
            )
        })
    }

    /// Replaces the stored token: writes a new file beside the target, syncs it, renames it
    /// over the target and syncs the directory.
    ///
    /// The temporary file has a random name and is created exclusively (an existing file or
    /// link at that name is never followed); it is removed on every error. An empty token
    /// loads back as `None`.
    pub fn save(&self, token: &str) -> io::Result<()> {
        let target = self.target()?;
        self.replace(&target, token)
    }

    /// Checks that [`save`](Self::save) can work: an existing file is a regular file, and a
    /// file can be created (and is removed again) in the directory the token is written to.
    ///
    /// Call it at start: [`load`](Self::load) only reads, so a read-only directory would
    /// otherwise show up as a failure at every checkpoint.
    pub fn check_writable(&self) -> io::Result<()> {
        let target = self.target()?;
        let probe = temp_in(&target).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "{}: cannot create a file in {} to store checkpoints: {e}",
                    label(&self.path, &target.file),
                    target.dir.display()
                ),
            )
        })?;
        probe.close().map_err(|e| at(&self.path, &target.file, e))
    }

    /// Resolves links to the file a save replaces, refusing a non-regular one.
    fn target(&self) -> io::Result<Target> {
        let file = resolve(&self.path)?;
        let name = file.file_name().map(OsString::from).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{}: checkpoint path has no file name",
                    label(&self.path, &file)
                ),
            )
        })?;
        let dir = match file.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let existing = match fs::symlink_metadata(&file) {
            Ok(meta) => {
                regular(&self.path, &file, &meta)?;
                Some(meta)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(at(&self.path, &file, e)),
        };
        Ok(Target {
            file,
            dir,
            name,
            existing,
        })
    }

    /// Writes `token` to a temporary file in `target.dir` and renames it over `target.file`.
    /// Every early return drops the temporary file, which removes it.
    fn replace(&self, target: &Target, token: &str) -> io::Result<()> {
        let wrap = |e| at(&self.path, &target.file, e);
        let mut tmp = temp_in(target).map_err(wrap)?;
        if let Some(meta) = &target.existing {
            copy_permissions(tmp.as_file(), meta).map_err(wrap)?;
        }
        let file = tmp.as_file_mut();
        file.write_all(token.as_bytes()).map_err(wrap)?;
        file.write_all(b"\n").map_err(wrap)?;
        file.sync_all().map_err(wrap)?;
        // The error holds the temporary file; dropping it here removes the file.
        tmp.persist(&target.file).map_err(|e| wrap(e.error))?;
        // Make the rename itself durable (best effort: not every platform can open a directory).
        if let Ok(d) = File::open(&target.dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

/// Gives the replacement the permission bits of the file it replaces (Unix only).
fn copy_permissions(file: &File, existing: &fs::Metadata) -> io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = existing.permissions().mode() & 0o777;
        file.set_permissions(fs::Permissions::from_mode(mode))
    }
    #[cfg(not(unix))]
    {
        let _ = (file, existing);
        Ok(())
    }
}

/// A new, exclusively created file named `.<name>.<random>.tmp` beside the target; mode
/// `0600` on Unix.
fn temp_in(target: &Target) -> io::Result<tempfile::NamedTempFile> {
    let mut prefix = OsString::from(".");
    prefix.push(&target.name);
    prefix.push(".");
    tempfile::Builder::new()
        .prefix(&prefix)
        .suffix(".tmp")
        .tempfile_in(&target.dir)
}

/// Follows symbolic links from `path` to a path that is not a link (it may not exist: a
/// dangling link resolves to the file it names, which a save then creates).
/// Errors name `path` and the link target that failed.
fn resolve(path: &Path) -> io::Result<PathBuf> {
    let mut current = path.to_path_buf();
    for _ in 0..MAX_LINKS {
        match fs::symlink_metadata(&current) {
            Ok(meta) if meta.file_type().is_symlink() => {
                let link = fs::read_link(&current).map_err(|e| at(path, &current, e))?;
                // A relative link is relative to the link's directory; an absolute one
                // replaces the whole path.
                current = match current.parent() {
                    Some(dir) => dir.join(link),
                    None => link,
                };
            }
            Ok(_) => return Ok(current),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(current),
            Err(e) => return Err(at(path, &current, e)),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{}: too many levels of symbolic links", path.display()),
    ))
}

/// Refuses anything but a regular file, naming what it is.
fn regular(path: &Path, file: &Path, meta: &fs::Metadata) -> io::Result<()> {
    if meta.is_file() {
        return Ok(());
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidInput,
        format!(
            "{}: is {}, not a regular file; refusing to use it as a checkpoint file",
            label(path, file),
            describe(meta.file_type())
        ),
    ))
}

fn describe(kind: fs::FileType) -> &'static str {
    if kind.is_dir() {
        return "a directory";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if kind.is_fifo() {
            return "a FIFO";
        }
        if kind.is_socket() {
            return "a socket";
        }
        if kind.is_char_device() {
            return "a character device";
        }
        if kind.is_block_device() {
            return "a block device";
        }
    }
    "a special file"
}

/// Names the store's path in an I/O error, and the file it resolved to when that differs.
fn at(path: &Path, file: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", label(path, file)))
}

fn label(path: &Path, file: &Path) -> String {
    if path == file {
        path.display().to_string()
    } else {
        format!("{} (-> {})", path.display(), file.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn saves_and_loads_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileCheckpointStore::new(dir.path().join("since"));
        assert_eq!(store.load().unwrap(), None);
        store.save("s1_2_3").unwrap();
        assert_eq!(store.load().unwrap().as_deref(), Some("s1_2_3"));
        store.save("s4").unwrap();
        assert_eq!(store.load().unwrap().as_deref(), Some("s4"));
        assert_eq!(fs::read(dir.path().join("since")).unwrap(), b"s4\n");
        assert_eq!(
            names(dir.path()),
            ["since"],
            "no temporary file left behind"
        );
    }

    /// Forces the rename to fail after the temporary file was written (the target check
    /// that normally refuses a directory is bypassed): the temporary file must go.
    #[test]
    fn failed_rename_removes_the_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("since");
        fs::create_dir(&path).unwrap();
        fs::write(path.join("inside"), b"x").unwrap();
        let store = FileCheckpointStore::new(&path);
        let target = Target {
            file: path.clone(),
            dir: dir.path().to_path_buf(),
            name: "since".into(),
            existing: None,
        };
        let err = store.replace(&target, "s1").unwrap_err();
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "error names the path: {err}"
        );
        assert_eq!(names(dir.path()), ["since"], "temporary file removed");
        assert_eq!(names(&path), ["inside"]);
    }

    #[test]
    fn temporary_names_are_hidden_random_and_beside_the_target() {
        let dir = tempfile::tempdir().unwrap();
        let target = Target {
            file: dir.path().join("since"),
            dir: dir.path().to_path_buf(),
            name: "since".into(),
            existing: None,
        };
        let a = temp_in(&target).unwrap();
        let b = temp_in(&target).unwrap();
        assert_ne!(a.path(), b.path());
        for t in [&a, &b] {
            assert_eq!(t.path().parent(), Some(dir.path()));
            let name = t.path().file_name().unwrap().to_string_lossy().into_owned();
            assert!(
                name.starts_with(".since.") && name.ends_with(".tmp"),
                "{name}"
            );
        }
    }

    #[test]
    fn resolves_relative_absolute_and_dangling_links() {
        #[cfg(unix)]
        {
            use std::os::unix::fs::symlink;
            let dir = tempfile::tempdir().unwrap();
            let sub = dir.path().join("sub");
            fs::create_dir(&sub).unwrap();
            symlink("sub/real", dir.path().join("rel")).unwrap();
            symlink(dir.path().join("rel"), dir.path().join("abs")).unwrap();
            // Dangling: "real" does not exist yet.
            assert_eq!(resolve(&dir.path().join("abs")).unwrap(), sub.join("real"));
            fs::write(sub.join("real"), b"t\n").unwrap();
            assert_eq!(resolve(&dir.path().join("rel")).unwrap(), sub.join("real"));
            symlink("loop", dir.path().join("loop")).unwrap();
            assert!(resolve(&dir.path().join("loop")).is_err());
        }
        let plain = Path::new("since");
        assert_eq!(resolve(plain).unwrap(), plain);
    }
}
