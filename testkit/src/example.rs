//! The crate's example binaries, as built beside the test or benchmark that runs them.

use std::path::{Path, PathBuf};

/// `target/<profile>/examples/<name>`, next to the running test binary (in
/// `target/<profile>/deps`). Panics, saying how to build it, when it is missing or older than
/// `examples/<name>.rs`: a stale binary would test old behaviour.
pub fn example_binary(name: &str, how_to_build: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the running binary's path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let binary = profile_dir.join("examples").join(name);
    assert!(
        binary.exists(),
        "{} is missing: {how_to_build}",
        binary.display()
    );
    let source = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(format!("{name}.rs"));
    let modified = |p: &Path| {
        std::fs::metadata(p)
            .and_then(|m| m.modified())
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    };
    assert!(
        modified(&binary) >= modified(&source),
        "{} is older than examples/{name}.rs: {how_to_build}",
        binary.display()
    );
    binary
}
