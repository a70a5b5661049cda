//! A connection: a non-blocking socket, a `CONNECT` tunnel through a proxy while it opens,
//! and TLS (rustls' sans-IO `ClientConnection`) or plain HTTP over it, read and written like a
//! non-blocking socket.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;

use mio::net::TcpStream;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, RootCertStore};

use super::proxy::{Origin, Tunnel};
use crate::tls::{CaCertificate, TrustRoots};
use crate::{TransportErrorKind, TransportFailure};

/// The rustls configuration every `https` connection shares: ring (the provider under ureq),
/// and the roots of `roots` plus `extra`. `None` for the platform's verifier with extra CAs
/// (it takes none).
pub(super) fn client_config(
    roots: TrustRoots,
    extra: &[CaCertificate],
) -> Result<Option<Arc<ClientConfig>>, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder =
        ClientConfig::builder_with_provider(provider).with_safe_default_protocol_versions()?;
    let config = match roots {
        TrustRoots::Platform if !extra.is_empty() => return Ok(None),
        TrustRoots::Platform => {
            use rustls_platform_verifier::BuilderVerifierExt;
            builder.with_platform_verifier()?.with_no_client_auth()
        }
        _ => {
            let mut store = RootCertStore::empty();
            let bundled = webpki_root_certs::TLS_SERVER_ROOT_CERTS.iter().cloned();
            let (_, unusable) = store.add_parsable_certificates(bundled);
            if unusable > 0 {
                log::debug!("{unusable} bundled roots are not usable by rustls");
            }
            for ca in extra {
                store.add(ca.der().to_vec().into())?;
            }
            builder.with_root_certificates(store).with_no_client_auth()
        }
    };
    Ok(Some(Arc::new(config)))
}

/// A keep-alive connection to one origin (through a proxy or not).
pub(super) struct Conn {
    pub(super) stream: TcpStream,
    transport: Transport,
    /// The TCP connection is established.
    pub(super) connected: bool,
    /// Opening the tunnel through the proxy (until the proxy said yes).
    pub(super) tunnel: Option<Tunnel>,
    /// Whether it already carried a whole exchange (then a close before any answer byte is a
    /// keep-alive race, and the request is sent again once on a fresh connection).
    pub(super) reused: bool,
}

/// What runs over a connection's socket: HTTP itself, or TLS carrying it.
enum Transport {
    Plain,
    Tls(Box<ClientConnection>),
}

impl Conn {
    /// Starts connecting to `addr` for `origin` (`tls` for an `https` origin; `tunnel` when
    /// `addr` is a proxy's).
    pub(super) fn open(
        addr: SocketAddr,
        origin: &Origin,
        tls: Option<&Arc<ClientConfig>>,
        tunnel: Option<Tunnel>,
    ) -> Result<Self, TransportFailure> {
        let transport = match (origin.https, tls) {
            (false, _) => Transport::Plain,
            (true, None) => {
                return Err(TransportFailure::new(
                    TransportErrorKind::Tls,
                    "no TLS configuration",
                ))
            }
            (true, Some(config)) => {
                let name = ServerName::try_from(origin.host.clone()).map_err(|e| {
                    TransportFailure::new(
                        TransportErrorKind::Tls,
                        format!("{} cannot be a TLS server name: {e}", origin.host),
                    )
                })?;
                let connection = ClientConnection::new(config.clone(), name)
                    .map_err(|e| TransportFailure::new(TransportErrorKind::Tls, e.to_string()))?;
                Transport::Tls(Box::new(connection))
            }
        };
        let stream = TcpStream::connect(addr)
            .map_err(|e| TransportFailure::new(TransportErrorKind::Connect, e.to_string()))?;
        let _ = stream.set_nodelay(true);
        Ok(Self {
            stream,
            transport,
            connected: false,
            tunnel,
            reused: false,
        })
    }

    /// Whether the TCP connection is established now (`Ok(false)`: not yet).
    pub(super) fn check_connected(&mut self) -> Result<bool, TransportFailure> {
        let failed =
            |e: io::Error| TransportFailure::new(TransportErrorKind::Connect, e.to_string());
        if let Ok(Some(e)) | Err(e) = self.stream.take_error() {
            return Err(failed(e));
        }
        match self.stream.peer_addr() {
            Ok(_) => {
                self.connected = true;
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
            Err(e) => Err(failed(e)),
        }
    }

    /// Writes raw bytes to the socket, under any TLS (the tunnel's request).
    pub(super) fn write_raw(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.stream.write(bytes)
    }

    /// Reads raw bytes from the socket, under any TLS (the proxy's answer).
    pub(super) fn read_raw(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        self.stream.read(buffer)
    }

    /// Writes (some of) `bytes` of plaintext, like a non-blocking socket: TLS takes them into
    /// its buffer and sends what the socket accepts now; `WouldBlock` only when nothing was
    /// taken.
    pub(super) fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let Transport::Tls(tls) = &mut self.transport else {
            return self.stream.write(bytes);
        };
        let taken = tls.writer().write(bytes)?;
        match send_tls(tls, &mut self.stream) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && taken > 0 => Ok(taken),
            Err(e) => Err(e),
            Ok(()) if taken == 0 => Err(io::ErrorKind::WouldBlock.into()),
            Ok(()) => Ok(taken),
        }
    }

    /// Sends the ciphertext TLS has queued, until the socket would block. Nothing to do for
    /// plain HTTP.
    pub(super) fn flush(&mut self) -> io::Result<()> {
        match &mut self.transport {
            Transport::Plain => Ok(()),
            Transport::Tls(tls) => send_tls(tls, &mut self.stream),
        }
    }

    /// Reads plaintext, like a non-blocking socket: `Ok(0)` at the end of the stream, and a
    /// TLS failure as an `InvalidData` error carrying the `rustls::Error`.
    pub(super) fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        let Transport::Tls(tls) = &mut self.transport else {
            return self.stream.read(buffer);
        };
        loop {
            match tls.reader().read(buffer) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                read => return read, // plaintext, close_notify (0), or a cut stream
            }
            if tls.read_tls(&mut self.stream)? == 0 {
                return Ok(0);
            }
            tls.process_new_packets()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            // The handshake's answers, and the request that waited for its end, go out now.
            match send_tls(tls, &mut self.stream) {
                Err(e) if e.kind() != io::ErrorKind::WouldBlock => return Err(e),
                _ => {}
            }
        }
    }
}

/// Writes TLS's queued ciphertext to the socket until it is sent or the socket would block.
fn send_tls(tls: &mut ClientConnection, stream: &mut TcpStream) -> io::Result<()> {
    while tls.wants_write() {
        tls.write_tls(stream)?;
    }
    Ok(())
}

/// A TLS failure (the certificate refused, a bad record) as the machine's failure kind.
pub(super) fn tls_failure(e: &io::Error) -> Option<TransportFailure> {
    let tls = e.get_ref()?.downcast_ref::<rustls::Error>()?;
    Some(TransportFailure::new(
        TransportErrorKind::Tls,
        tls.to_string(),
    ))
}
