//! The machine's modules never read a clock, sleep, spawn threads or touch sockets.

const MACHINE_MODULES: &[&str] = &[
    "backoff.rs",
    "batch.rs",
    "classify.rs",
    "config.rs",
    "dedup.rs",
    "error.rs",
    "machine.rs",
    "normalize.rs",
    "request.rs",
    "response.rs",
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
        for (n, line) in text.lines().enumerate() {
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
