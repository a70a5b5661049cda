//! A loopback TLS terminator: `https://127.0.0.1:PORT` (and `https://localhost:PORT`) in
//! front of a plain-TCP backend, with a certificate from a throwaway CA made at start.
//!
//! ```no_run
//! # use matrix_sync_testkit::tls::TlsTerminator;
//! let tls = TlsTerminator::start(8008); // in front of 127.0.0.1:8008
//! let ca_pem = tls.ca_pem(); // trust this to reach tls.base_url()
//! ```
//!
//! One thread accepts, one thread per connection moves bytes both ways (rustls' sans-IO
//! `ServerConnection` between the client socket and the backend socket, woken by `poll(2)`).
//! Dropping it stops accepting; open connections end within about 200 ms.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::{ServerConfig, ServerConnection};

/// How often a connection thread looks at the stop flag while both sides are quiet.
const POLL_MS: libc::c_int = 200;

/// A running terminator; stops when dropped.
pub struct TlsTerminator {
    port: u16,
    ca_pem: String,
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    handshakes: AtomicUsize,
    refused: AtomicUsize,
}

impl TlsTerminator {
    /// Listens on a free loopback port and forwards each connection, decrypted, to
    /// `127.0.0.1:backend_port`. The server certificate names `127.0.0.1`, `::1` and
    /// `localhost`, and is signed by a CA made for this terminator alone.
    pub fn start(backend_port: u16) -> TlsTerminator {
        let (ca_pem, config) = certificates();
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Shared::default());
        let accepting = shared.clone();
        thread::Builder::new()
            .name("tls-accept".to_owned())
            .spawn(move || {
                for client in listener.incoming() {
                    if accepting.stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(client) = client else { continue };
                    let (config, shared) = (config.clone(), accepting.clone());
                    let _ = thread::Builder::new()
                        .name("tls-conn".to_owned())
                        .spawn(move || serve(client, backend_port, config, &shared));
                }
            })
            .expect("spawn the accept thread");
        TlsTerminator {
            port,
            ca_pem,
            shared,
        }
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `https://127.0.0.1:PORT`.
    pub fn base_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// The CA certificate that signed the server's, in PEM.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// TLS handshakes completed so far.
    pub fn handshakes(&self) -> usize {
        self.shared.handshakes.load(Ordering::SeqCst)
    }

    /// Connections that ended before their handshake completed (the client refused the
    /// certificate and closed, or spoke no TLS).
    pub fn refused(&self) -> usize {
        self.shared.refused.load(Ordering::SeqCst)
    }
}

impl Drop for TlsTerminator {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop, which sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// A fresh CA (its PEM) and a server configuration with a certificate it signed.
fn certificates() -> (String, Arc<ServerConfig>) {
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "matrix-sync-testkit throwaway CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);

    let names = ["127.0.0.1", "::1", "localhost"].map(str::to_owned);
    let mut server = CertificateParams::new(names.to_vec()).unwrap();
    server
        .distinguished_name
        .push(DnType::CommonName, "matrix-sync-testkit server");
    let server_key = KeyPair::generate().unwrap();
    let server_cert = server.signed_by(&server_key, &issuer).unwrap();

    let chain: Vec<CertificateDer<'static>> = vec![server_cert.der().clone()];
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    (ca_cert.pem(), Arc::new(config))
}

/// Moves one connection's bytes until either side closes, the handshake fails, or the
/// terminator stops.
fn serve(mut client: TcpStream, backend_port: u16, config: Arc<ServerConfig>, shared: &Shared) {
    let Ok(mut tls) = ServerConnection::new(config) else {
        return;
    };
    let Ok(mut backend) = TcpStream::connect(("127.0.0.1", backend_port)) else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = backend.set_nodelay(true);
    let mut handshaking = true;
    let mut buffer = vec![0u8; 64 * 1024];
    // Why it ended matters only as "before or after the handshake".
    let _ended: io::Result<()> = loop {
        if shared.stop.load(Ordering::SeqCst) {
            break Ok(());
        }
        let (client_ready, backend_ready) = match readable(&client, &backend) {
            Ok(ready) => ready,
            Err(e) => break Err(e),
        };
        if client_ready {
            match tls.read_tls(&mut client) {
                Ok(0) => break Ok(()),
                Ok(_) => {}
                Err(e) => break Err(e),
            }
            if let Err(e) = tls.process_new_packets() {
                let _ = tls.write_tls(&mut client); // the alert, if any
                break Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
            if handshaking && !tls.is_handshaking() {
                handshaking = false;
                shared.handshakes.fetch_add(1, Ordering::SeqCst);
            }
            match forward_plaintext(&mut tls, &mut backend, &mut buffer) {
                Ok(true) => {}
                Ok(false) => break Ok(()), // close_notify
                Err(e) => break Err(e),
            }
        }
        if backend_ready {
            match backend.read(&mut buffer) {
                Ok(0) => {
                    tls.send_close_notify();
                    let _ = flush(&mut tls, &mut client);
                    break Ok(());
                }
                Ok(n) => {
                    if let Err(e) = tls.writer().write_all(&buffer[..n]) {
                        break Err(e);
                    }
                }
                Err(e) => break Err(e),
            }
        }
        if let Err(e) = flush(&mut tls, &mut client) {
            break Err(e);
        }
    };
    if handshaking {
        shared.refused.fetch_add(1, Ordering::SeqCst);
    }
    let _ = client.shutdown(Shutdown::Both);
    let _ = backend.shutdown(Shutdown::Both);
}

/// Writes the plaintext rustls decrypted to the backend; `false` once the client closed.
fn forward_plaintext(
    tls: &mut ServerConnection,
    backend: &mut TcpStream,
    buffer: &mut [u8],
) -> io::Result<bool> {
    loop {
        match tls.reader().read(buffer) {
            Ok(0) => return Ok(false),
            Ok(n) => backend.write_all(&buffer[..n])?,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
            Err(e) => return Err(e),
        }
    }
}

fn flush(tls: &mut ServerConnection, client: &mut TcpStream) -> io::Result<()> {
    while tls.wants_write() {
        tls.write_tls(client)?;
    }
    Ok(())
}

/// Waits up to [`POLL_MS`] for either socket to be readable (or closed).
fn readable(client: &TcpStream, backend: &TcpStream) -> io::Result<(bool, bool)> {
    let mut fds = [client.as_raw_fd(), backend.as_raw_fd()].map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    // SAFETY: `fds` is a valid array of two pollfd for the duration of the call.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, POLL_MS) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.kind() {
            io::ErrorKind::Interrupted => Ok((false, false)),
            _ => Err(e),
        };
    }
    let ready =
        |fd: &libc::pollfd| fd.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0;
    Ok((ready(&fds[0]), ready(&fds[1])))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_certificate_is_made_and_its_ca_is_pem() {
        let (pem, _) = certificates();
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");
    }
}
