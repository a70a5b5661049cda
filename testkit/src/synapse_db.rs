//! SQL on a throwaway [`Synapse`]'s SQLite database, for tests that must change what the
//! server remembers behind its back (such as deleting a sliding sync connection, so that its
//! next request gets `M_UNKNOWN_POS`, or setting back when it was last used).
//!
//! Runs through the Python of Synapse's own virtualenv (its `sqlite3` module is always there;
//! no `sqlite3` command is needed), with foreign keys on, as Synapse itself opens the database,
//! so that deletions cascade the way Synapse's own do.
//!
//! Synapse does cache what it read of the sliding sync tables: Synapse 1.163's
//! `get_and_clear_connection_positions` is `@cached`, per connection position, with the
//! connection's `last_used_ts` as read then. A change here shows once the connection records
//! new state (a new position, read afresh on its next request), for instance when a room
//! enters its list; a request with a position already read is answered from the cache.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::lifecycle::Install;
use crate::synapse::Synapse;

/// The Python of the virtualenv Synapse runs from (`SYNAPSE_VENV`, or the repository's
/// `.synapse/venv`).
fn python() -> PathBuf {
    let venv = match std::env::var_os("SYNAPSE_VENV") {
        Some(dir) => PathBuf::from(dir),
        None => Install::repo_root().join(".synapse").join("venv"),
    };
    venv.join("bin").join("python")
}

/// The SQLite database in `synapse`'s data directory.
fn database(synapse: &Synapse) -> PathBuf {
    let dir = synapse.data_dir();
    let found = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| path.extension().is_some_and(|ext| ext == "db"));
    found.unwrap_or_else(|| panic!("no SQLite database in {}", dir.display()))
}

const SCRIPT: &str = r#"
import json, sqlite3, sys
db = sqlite3.connect(sys.argv[1], timeout=30)
db.execute("PRAGMA foreign_keys = ON")
cursor = db.execute(sys.argv[2], json.loads(sys.argv[3]))
rows = cursor.fetchall()
db.commit()
print(json.dumps({"rows": rows, "changed": db.total_changes}))
"#;

/// Runs one SQL statement with positional `?` parameters on `synapse`'s database and returns
/// its rows (each an array of columns) and the number of rows it changed. Panics, with
/// Python's message, when the statement fails.
pub fn execute(synapse: &Synapse, sql: &str, params: &[Value]) -> (Vec<Value>, u64) {
    let out = Command::new(python())
        .arg("-c")
        .arg(SCRIPT)
        .arg(database(synapse))
        .arg(sql)
        .arg(Value::from(params.to_vec()).to_string())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python().display()));
    assert!(
        out.status.success(),
        "{sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: Value = serde_json::from_slice(&out.stdout).expect("the script prints JSON");
    let rows = result["rows"].as_array().cloned().unwrap_or_default();
    (rows, result["changed"].as_u64().unwrap_or(0))
}

/// Sets the `last_used_ts` of `user_id`'s sliding sync connections (the column Synapse's
/// expiry rules read, in milliseconds since the epoch) to `ago` before now; returns how many
/// connections it changed.
pub fn set_sliding_sync_last_used(synapse: &Synapse, user_id: &str, ago: Duration) -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970");
    let then = now.saturating_sub(ago).as_millis() as u64;
    let (_, changed) = execute(
        synapse,
        "UPDATE sliding_sync_connections SET last_used_ts = ? WHERE user_id = ?",
        &[Value::from(then), Value::from(user_id)],
    );
    changed
}

const SWEEP: &str = r#"
import inspect, json, re, sqlite3, sys, time
from synapse.storage.databases.main import sliding_sync
source = inspect.getsource(sliding_sync.SlidingSyncStore.delete_old_sliding_sync_connections)
statements = re.findall(r'sql = """(.*?)"""', source, re.S)
assert len(statements) == 1, f"the sweep no longer has one statement: {source}"
expiry = sliding_sync.CONNECTION_EXPIRY.as_millis()
db = sqlite3.connect(sys.argv[1], timeout=30)
db.execute("PRAGMA foreign_keys = ON")
db.execute(statements[0], (int(time.time() * 1000) - expiry,))
db.commit()
print(json.dumps({"deleted": db.total_changes, "expiry_ms": expiry}))
"#;

/// What [`sweep_expired_sliding_sync_connections`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sweep {
    /// Connections deleted.
    pub deleted: u64,
    /// Synapse's `CONNECTION_EXPIRY`, in milliseconds.
    pub expiry_ms: u64,
}

/// Runs, once and now, the sweep Synapse runs every hour (`CONNECTION_EXPIRY_FREQUENCY`, first
/// an hour after start) to expire sliding sync connections unused for `CONNECTION_EXPIRY` (7
/// days): the statement and the constant are read from the installed Synapse's
/// `SlidingSyncStore.delete_old_sliding_sync_connections`, not copied, and the statement is run
/// on `synapse`'s database with Synapse's cutoff (now minus the expiry, in milliseconds).
pub fn sweep_expired_sliding_sync_connections(synapse: &Synapse) -> Sweep {
    let out = Command::new(python())
        .arg("-c")
        .arg(SWEEP)
        .arg(database(synapse))
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python().display()));
    assert!(
        out.status.success(),
        "the sweep: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: Value = serde_json::from_slice(&out.stdout).expect("the sweep prints JSON");
    Sweep {
        deleted: result["deleted"].as_u64().expect("a count"),
        expiry_ms: result["expiry_ms"].as_u64().expect("the expiry"),
    }
}
