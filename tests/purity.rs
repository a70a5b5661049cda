//! The machine's modules never read a clock, sleep, spawn threads or touch sockets.

const MACHINE_MODULES: &[&str] = &[
    "auth.rs",
    "batch.rs",
    "classify.rs",
    "config.rs",
    "credentials.rs",
    "dedup.rs",
    "defaults.rs",
    "discovery.rs",
    "error.rs",
    "gapfill.rs",
    "machine.rs",
    "normalize.rs",
    "request.rs",
    "response.rs",
    "scan.rs",
    "schedule.rs",
    "sliding/mod.rs",
    "sliding/request.rs",
    "sliding/response.rs",
    "text.rs",
    "token.rs",
];

/// The modules allowed to do I/O: the driver (its loop, stages, transport and resolver) and
/// its agent's TLS roots, the reactor (many accounts on one thread), their lossy channels, the
/// file checkpoint store, the E2EE stage (its crypto store and runtime; a stage of its own
/// beside the machine), the fleet (NATS JetStream and the worker's threads), and the crate root
/// with the docs section it includes (their documentation examples).
const IO_MODULES: &[&str] = &[
    "checkpoint.rs",
    "docs_many_machines.md",
    "driver",
    "e2ee",
    "fleet",
    "lib.rs",
    "lossy.rs",
    "reactor",
    "tls.rs",
];

const FORBIDDEN: &[&str] = &[
    "Instant::now",
    "SystemTime::now",
    "thread::",
    "sleep(",
    "TcpStream",
    "TcpListener",
    "UdpSocket",
    "std::fs",
    "std::io",
    "println!",
    "eprintln!",
];

#[test]
fn machine_modules_do_no_io_and_read_no_clock() {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for module in MACHINE_MODULES {
        let text = std::fs::read_to_string(src.join(module)).expect("module exists");
        // A module's own unit tests and documentation examples may take an `Instant` from the
        // clock; its code may not.
        let code = text.lines().take_while(|line| *line != "#[cfg(test)]");
        for (n, line) in code.enumerate() {
            let trimmed = line.trim_start();
            if trimmed.starts_with("///") || trimmed.starts_with("//!") {
                continue;
            }
            for word in FORBIDDEN {
                assert!(
                    !line.contains(word),
                    "src/{module}:{}: `{word}` in the sans-IO machine: {line}",
                    n + 1
                );
            }
        }
    }
}

#[test]
fn every_module_is_either_pure_or_named_as_doing_io() {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for entry in std::fs::read_dir(src).expect("src exists") {
        let name = entry.expect("readable").file_name();
        let name = name.to_string_lossy();
        // A directory of the machine is listed by its files (`sliding/mod.rs`).
        let machine = MACHINE_MODULES
            .iter()
            .any(|m| *m == name || m.split_once('/').is_some_and(|(dir, _)| dir == name));
        assert!(
            machine || IO_MODULES.contains(&name.as_ref()),
            "src/{name} is in neither list of tests/purity.rs"
        );
    }
}
