//! SQL on a throwaway [`Synapse`]'s SQLite database, for tests that must change what the
//! server remembers behind its back (such as deleting a sliding sync connection, so that its
//! next request gets `M_UNKNOWN_POS`).
//!
//! Runs through the Python of Synapse's own virtualenv (its `sqlite3` module is always there;
//! no `sqlite3` command is needed), with foreign keys on, as Synapse itself opens the database,
//! so that deletions cascade the way Synapse's own do. Synapse keeps no cache of the sliding
//! sync tables: the next request sees the change.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

use crate::homeserver::Install;
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
