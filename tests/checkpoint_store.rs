//! The file checkpoint store against hostile or unusual files: links, FIFOs, modes,
//! read-only places, concurrent savers.

#![cfg(unix)]

use std::collections::{BTreeMap, HashSet};
use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::Duration;

use matrix_sync_service::FileCheckpointStore;

/// Every entry of `dir` (not following links): name -> (file type, link target or contents).
fn snapshot(dir: &Path) -> BTreeMap<String, (String, Vec<u8>)> {
    fs::read_dir(dir)
        .unwrap()
        .map(|entry| {
            let entry = entry.unwrap();
            let path = entry.path();
            let kind = entry.file_type().unwrap();
            let content = if kind.is_symlink() {
                fs::read_link(&path)
                    .unwrap()
                    .as_os_str()
                    .as_bytes()
                    .to_vec()
            } else if kind.is_file() {
                fs::read(&path).unwrap()
            } else {
                Vec::new()
            };
            let name = entry.file_name().to_string_lossy().into_owned();
            (name, (format!("{kind:?}"), content))
        })
        .collect()
}

fn names(dir: &Path) -> Vec<String> {
    snapshot(dir).into_keys().collect()
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn mkfifo(path: &Path) {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
}

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// Runs `f` on a thread and fails (instead of hanging) when it takes over 2 s; `unblock` is
/// called on timeout to release the thread.
fn within_2s<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
    unblock: impl FnOnce(),
) -> T {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(Duration::from_secs(2)) {
        Ok(value) => value,
        Err(_) => {
            unblock();
            panic!("blocked for more than 2 s");
        }
    }
}

/// Opening a FIFO for reading and writing (without blocking) releases a reader or a writer
/// blocked in `open`.
fn unblock_fifo(path: PathBuf) -> impl FnOnce() {
    move || {
        let _ = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path);
    }
}

fn assert_refused(err: &io::Error, path: &Path, what: &str) {
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains(&path.display().to_string()),
        "names the path: {msg}"
    );
    assert!(msg.contains(what), "says it is {what}: {msg}");
}

// 1. Temporary file: exclusive creation, unpredictable name.

#[test]
fn save_ignores_a_symlink_planted_at_the_old_temporary_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("since");
    let victim = dir.path().join("victim");
    fs::write(&path, b"old\n").unwrap();
    fs::write(&victim, b"precious\n").unwrap();
    symlink(
        &victim,
        dir.path().join(format!("since.tmp{}", std::process::id())),
    )
    .unwrap();
    let before = snapshot(dir.path());

    FileCheckpointStore::new(&path).save("s_new").unwrap();

    assert_eq!(
        fs::read(&victim).unwrap(),
        b"precious\n",
        "victim untouched"
    );
    let mut after = snapshot(dir.path());
    let target = after.remove("since").unwrap();
    assert_eq!(target.1, b"s_new\n");
    assert!(fs::symlink_metadata(&path).unwrap().is_file());
    let mut expected = before;
    expected.remove("since");
    assert_eq!(after, expected, "no other entry of the directory changed");
}

// 2. No temporary file survives an error.

#[test]
fn save_over_a_non_empty_directory_is_refused_and_leaves_no_temporary_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("since");
    fs::create_dir(&path).unwrap();
    fs::write(path.join("inside"), b"x").unwrap();

    let err = FileCheckpointStore::new(&path).save("s1").unwrap_err();

    assert_eq!(names(dir.path()), ["since"], "no temporary file left");
    assert_eq!(names(&path), ["inside"]);
    assert_refused(&err, &path, "a directory");
}

#[test]
fn failing_saves_leave_no_hidden_temporary_files() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let fifo = dir.path().join("fifo");
    mkfifo(&fifo);
    let empty_dir = dir.path().join("empty");
    fs::create_dir(&empty_dir).unwrap();
    for path in [&sock, &fifo, &empty_dir] {
        let store = FileCheckpointStore::new(path);
        let unblock = unblock_fifo(fifo.clone());
        let result = within_2s(move || store.save("s1"), unblock);
        assert!(result.is_err(), "{}: save must fail", path.display());
    }
    let hidden: Vec<_> = names(dir.path())
        .into_iter()
        .filter(|n| n.starts_with('.') || n.contains("tmp"))
        .collect();
    assert!(hidden.is_empty(), "temporary files left: {hidden:?}");
    assert!(fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo());
    assert!(fs::symlink_metadata(&sock).unwrap().file_type().is_socket());
    assert!(fs::symlink_metadata(&empty_dir).unwrap().is_dir());
}

// 3. Modes.

#[test]
fn save_keeps_the_mode_of_an_existing_file() {
    let dir = tempfile::tempdir().unwrap();
    for wanted in [0o600, 0o640, 0o604] {
        let path = dir.path().join(format!("since{wanted:o}"));
        fs::write(&path, b"old\n").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(wanted)).unwrap();
        FileCheckpointStore::new(&path).save("s1").unwrap();
        assert_eq!(mode(&path), wanted, "mode of {}", path.display());
        assert_eq!(fs::read(&path).unwrap(), b"s1\n");
    }
}

#[test]
fn a_new_file_is_private() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("since");
    FileCheckpointStore::new(&path).save("s1").unwrap();
    assert_eq!(mode(&path), 0o600);
}

// 4. Symbolic links stay links.

#[test]
fn save_through_a_symlink_replaces_its_target_and_keeps_the_link() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    fs::create_dir(&data).unwrap();
    let real = data.join("since");
    fs::write(&real, b"old\n").unwrap();
    fs::set_permissions(&real, fs::Permissions::from_mode(0o640)).unwrap();
    let link = dir.path().join("since-link");
    symlink("data/since", &link).unwrap();
    let chain = dir.path().join("since-chain");
    symlink(&link, &chain).unwrap();

    let store = FileCheckpointStore::new(&chain);
    store.save("s_new").unwrap();

    assert!(fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(fs::symlink_metadata(&chain)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(fs::read_link(&link).unwrap(), Path::new("data/since"));
    assert_eq!(fs::read(&real).unwrap(), b"s_new\n");
    assert_eq!(mode(&real), 0o640);
    assert_eq!(store.load().unwrap().as_deref(), Some("s_new"));
    assert_eq!(names(dir.path()), ["data", "since-chain", "since-link"]);
    assert_eq!(
        names(&data),
        ["since"],
        "no temporary file beside the target"
    );
}

#[test]
fn save_through_a_dangling_symlink_creates_its_target() {
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("real");
    let link = dir.path().join("since");
    symlink("real", &link).unwrap();
    let store = FileCheckpointStore::new(&link);
    assert_eq!(store.load().unwrap(), None);

    store.save("s1").unwrap();

    assert!(fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(fs::read(&real).unwrap(), b"s1\n");
    assert_eq!(mode(&real), 0o600);
}

// 5. Concurrent savers in one process.

#[test]
fn concurrent_saves_never_collide_or_tear() {
    const THREADS: usize = 8;
    const SAVES: usize = 50;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("since");
    // Lengths differ so that a mix of two tokens cannot pass for a saved one.
    let token = |t: usize, i: usize| format!("t{t}_{i}_{}", "x".repeat(t * 7 + i % 13));
    let mut saved: HashSet<String> = (0..THREADS)
        .flat_map(|t| (0..SAVES).map(move |i| token(t, i)))
        .collect();
    saved.insert("initial".to_owned());
    let saved = Arc::new(saved);
    FileCheckpointStore::new(&path).save("initial").unwrap();

    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let (store, saved, done) = (FileCheckpointStore::new(&path), saved.clone(), done.clone());
        thread::spawn(move || {
            let mut loads = 0;
            while !done.load(Ordering::Relaxed) || loads == 0 {
                let got = store.load().unwrap().expect("a token is always there");
                assert!(saved.contains(&got), "torn or unknown token {got:?}");
                loads += 1;
            }
        })
    };
    let writers: Vec<_> = (0..THREADS)
        .map(|t| {
            let store = FileCheckpointStore::new(&path);
            thread::spawn(move || {
                for i in 0..SAVES {
                    store.save(&token(t, i)).unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.join().expect("saves succeed");
    }
    done.store(true, Ordering::Relaxed);
    reader.join().expect("every load is a saved token");

    let last = FileCheckpointStore::new(&path).load().unwrap().unwrap();
    assert!(
        (0..THREADS).any(|t| last == token(t, SAVES - 1)),
        "the last save of some thread wins: {last:?}"
    );
    assert_eq!(names(dir.path()), ["since"], "no temporary file left");
}

// 6. Byte-for-byte round trip.

#[test]
fn tokens_round_trip_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("since");
    let store = FileCheckpointStore::new(&path);
    for token in [
        "s72594_4483_1934",
        "  pad  ",
        "\ttab",
        "cr\r",
        "two\nlines",
        "ends with newline\n",
        "\n",
        " ",
        "ünïcödé",
    ] {
        store.save(token).unwrap();
        assert_eq!(fs::read(&path).unwrap(), format!("{token}\n").as_bytes());
        assert_eq!(store.load().unwrap().as_deref(), Some(token), "{token:?}");
    }
}

#[test]
fn load_strips_exactly_one_trailing_newline() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("since");
    let store = FileCheckpointStore::new(&path);
    for (content, expected) in [
        (&b""[..], None),
        (b"\n", None),
        (b"abc", Some("abc")),
        (b"abc  ", Some("abc  ")),
        (b"  abc\n", Some("  abc")),
        (b"abc\n\n", Some("abc\n")),
        (b"abc\r\n", Some("abc\r")),
        (b"\n\n", Some("\n")),
    ] {
        fs::write(&path, content).unwrap();
        assert_eq!(
            store.load().unwrap().as_deref(),
            expected,
            "{:?}",
            String::from_utf8_lossy(content)
        );
    }
}

#[test]
fn load_of_a_missing_file_is_none_and_of_non_utf8_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("since");
    let store = FileCheckpointStore::new(&path);
    assert_eq!(store.load().unwrap(), None);
    fs::write(&path, b"\xff\xfe\n").unwrap();
    let err = store.load().unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
}

// 7. Non-regular files are refused without blocking.

#[test]
fn load_refuses_a_fifo_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("since");
    mkfifo(&fifo);
    let store = FileCheckpointStore::new(&fifo);
    let err = within_2s(move || store.load(), unblock_fifo(fifo.clone())).unwrap_err();
    assert_refused(&err, &fifo, "a FIFO");
}

#[test]
fn load_refuses_a_symlink_to_a_fifo_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    mkfifo(&fifo);
    let link = dir.path().join("since");
    symlink("fifo", &link).unwrap();
    let store = FileCheckpointStore::new(&link);
    let err = within_2s(move || store.load(), unblock_fifo(fifo.clone())).unwrap_err();
    assert_refused(&err, &link, "a FIFO");
}

#[test]
fn load_refuses_a_directory_a_socket_and_a_device() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let cases = [
        (dir.path().to_path_buf(), "a directory"),
        (sock, "a socket"),
        (PathBuf::from("/dev/null"), "a character device"),
    ];
    for (path, what) in cases {
        let err = FileCheckpointStore::new(&path).load().unwrap_err();
        assert_refused(&err, &path, what);
    }
}

#[test]
fn save_refuses_a_fifo_and_leaves_it_alone() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("since");
    mkfifo(&fifo);
    let store = FileCheckpointStore::new(&fifo);
    let err = within_2s(move || store.save("s1"), unblock_fifo(fifo.clone())).unwrap_err();
    assert_refused(&err, &fifo, "a FIFO");
    assert!(fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo());
    assert_eq!(names(dir.path()), ["since"]);
}

// 8. Writability is checked up front, by `check_writable` only.

#[test]
fn check_writable_succeeds_and_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("since");
    let store = FileCheckpointStore::new(&path);
    store.check_writable().unwrap();
    assert!(names(dir.path()).is_empty(), "the probe is removed");
    fs::write(&path, b"old\n").unwrap();
    store.check_writable().unwrap();
    assert_eq!(snapshot(dir.path())["since"].1, b"old\n");
    assert_eq!(names(dir.path()), ["since"]);
}

#[test]
fn check_writable_fails_when_the_parent_is_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("file");
    fs::write(&file, b"").unwrap();
    let path = file.join("since");
    let err = FileCheckpointStore::new(&path)
        .check_writable()
        .unwrap_err();
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
}

#[test]
fn check_writable_looks_at_the_directory_of_the_link_target() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("file");
    fs::write(&file, b"").unwrap();
    let link = dir.path().join("since");
    symlink("file/since", &link).unwrap();
    // The link's own directory is writable; the target's "directory" is a file.
    let err = FileCheckpointStore::new(&link)
        .check_writable()
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains(&link.display().to_string()), "{msg}");
    assert!(
        msg.contains(&file.display().to_string()),
        "names the directory: {msg}"
    );
}

#[test]
fn check_writable_refuses_a_non_regular_target() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("since");
    mkfifo(&fifo);
    let store = FileCheckpointStore::new(&fifo);
    let err = within_2s(move || store.check_writable(), unblock_fifo(fifo.clone())).unwrap_err();
    assert_refused(&err, &fifo, "a FIFO");
    let err = FileCheckpointStore::new(dir.path())
        .check_writable()
        .unwrap_err();
    assert_refused(&err, dir.path(), "a directory");
}

/// A since-file that can be read but not replaced: `load` works, `check_writable` says why
/// saves will fail. Permissions do not stop root, so as root the file is one in `/proc`,
/// where no file can be created.
#[test]
fn read_only_directory_loads_but_fails_check_writable() {
    let dir = tempfile::tempdir().unwrap();
    let ro = dir.path().join("ro");
    fs::create_dir(&ro).unwrap();
    let (path, expected, unwritable_dir) = if is_root() {
        let link = ro.join("since");
        symlink("/proc/self/comm", &link).unwrap();
        (link, None, PathBuf::from("/proc/self"))
    } else {
        let path = ro.join("since");
        fs::write(&path, b"s1\n").unwrap();
        fs::set_permissions(&ro, fs::Permissions::from_mode(0o555)).unwrap();
        (path, Some("s1"), ro.clone())
    };
    let store = FileCheckpointStore::new(&path);

    let loaded = store.load();
    let checked = store.check_writable();
    let saved = store.save("s2");
    fs::set_permissions(&ro, fs::Permissions::from_mode(0o755)).unwrap();

    let loaded = loaded.expect("load only reads").expect("a token");
    if let Some(expected) = expected {
        assert_eq!(loaded, expected);
    }
    let err = checked.expect_err("check_writable reports the unwritable directory");
    let msg = err.to_string();
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(msg.contains(&unwritable_dir.display().to_string()), "{msg}");
    assert!(saved.is_err(), "and save indeed fails");
    assert_eq!(names(&ro), ["since"], "nothing created");
}
