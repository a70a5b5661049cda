//! The driver's transport: its ureq agent, one request sent and its body read under the
//! cap, and ureq's errors as [`TransportFailure`]s.

use std::io;
use std::time::{Duration, Instant};

use super::DriverConfig;
use crate::tls;
use crate::{OutgoingRequest, TransportErrorKind, TransportFailure};

/// Connect and resolve are the only steps `Agent::shutdown` cannot interrupt; bound them so a
/// stop during a connect to a black-holed address still ends promptly enough.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The driver's own agent: statuses as values, no redirects, bounded connect and resolve,
/// the proxy of the environment if asked, the configured TLS roots, and a resolver that
/// spends no thread on an IP address (`super::resolve`).
pub(super) fn new_agent(options: &DriverConfig) -> ureq::Agent {
    let proxy = options
        .proxy_from_env
        .then(ureq::Proxy::try_from_env)
        .flatten();
    if let Some(proxy) = &proxy {
        log::info!("requests go through the proxy at {}", proxy.host());
    }
    // `validate` refused the combinations ureq cannot build; the fallback is never taken.
    let roots = tls::root_certs(options.trust_roots, &options.extra_ca)
        .unwrap_or(ureq::tls::RootCerts::WebPki);
    let tls = ureq::tls::TlsConfig::builder().root_certs(roots).build();
    let config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .proxy(proxy)
        .timeout_connect(Some(CONNECT_TIMEOUT))
        .timeout_resolve(Some(CONNECT_TIMEOUT))
        .max_redirects(0)
        .tls_config(tls)
        .user_agent(concat!("matrix-sync-service/", env!("CARGO_PKG_VERSION")))
        .build();
    ureq::Agent::with_parts(
        config,
        ureq::unversioned::transport::DefaultConnector::default(),
        super::resolve::LiteralFirst::default(),
    )
}

/// Sends one request and reads its whole body (up to `max_body` bytes).
pub(super) fn perform(
    agent: &ureq::Agent,
    request: OutgoingRequest,
    max_body: u64,
) -> Result<http::Response<Vec<u8>>, TransportFailure> {
    let timeout = request.deadline.saturating_duration_since(Instant::now());
    if timeout.is_zero() {
        return Err(TransportFailure::new(
            TransportErrorKind::TimedOut,
            "deadline passed before sending",
        ));
    }
    // Set on every request, so that an application's own agent keeps the guarantees.
    let http = agent
        .configure_request(request.http)
        .http_status_as_error(false)
        .max_redirects(0)
        .timeout_global(Some(timeout))
        .build();
    let response = agent.run(http).map_err(|e| transport_failure(e, false))?;
    let (parts, mut body) = response.into_parts();
    let bytes = body
        .with_config()
        .limit(max_body)
        .read_to_vec()
        .map_err(|e| transport_failure(e, true))?;
    Ok(http::Response::from_parts(parts, bytes))
}

fn transport_failure(error: ureq::Error, reading_body: bool) -> TransportFailure {
    use TransportErrorKind as K;
    let kind = match &error {
        // rustls reports a refused handshake (unknown issuer, wrong name, expired) as an
        // I/O error that carries its own.
        ureq::Error::Io(io) if is_tls(io) => K::Tls,
        ureq::Error::Io(io) => match io.kind() {
            io::ErrorKind::ConnectionRefused => K::Connect,
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => K::TimedOut,
            io::ErrorKind::UnexpectedEof if reading_body => K::Truncated,
            _ => K::Reset,
        },
        ureq::Error::Timeout(_) => K::TimedOut,
        ureq::Error::HostNotFound => K::Dns,
        // A proxy that refused the tunnel: no connection to the homeserver was made.
        ureq::Error::ConnectionFailed | ureq::Error::ConnectProxyFailed(_) => K::Connect,
        ureq::Error::Tls(_) | ureq::Error::Rustls(_) | ureq::Error::TlsRequired => K::Tls,
        ureq::Error::BodyExceedsLimit(_) => K::BodyTooLarge,
        ureq::Error::Protocol(_) if reading_body => K::Truncated,
        _ => K::Other,
    };
    TransportFailure::new(kind, error.to_string())
}

fn is_tls(io: &io::Error) -> bool {
    io.get_ref()
        .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some())
}
