//! Where a connection goes: straight to the request's origin, or through the HTTP proxy of
//! the environment (read as the driver reads it: `ALL_PROXY`, `HTTPS_PROXY`, `HTTP_PROXY`,
//! then `NO_PROXY`). Through a proxy, an `https` origin is reached by a `CONNECT` tunnel, and
//! a plain `http` one by sending the proxy each request in absolute form, as curl does.

use crate::{TransportErrorKind, TransportFailure};

/// A response to `CONNECT` longer than this is refused.
const MAX_TUNNEL_HEAD: usize = 16 * 1024;

/// The scheme, host and port a request goes to; one connection serves one origin.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct Origin {
    pub(super) https: bool,
    /// The host, without the brackets of an IPv6 literal.
    pub(super) host: String,
    pub(super) port: u16,
}

impl Origin {
    pub(super) fn of(uri: &http::Uri) -> Result<Self, TransportFailure> {
        let other = |detail: &str| TransportFailure::new(TransportErrorKind::Other, detail);
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(other("the request URL is not http(s)://")),
        };
        let host = uri
            .host()
            .ok_or_else(|| other("the request URL has no host"))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        Ok(Self { https, host, port })
    }

    /// `host:port`, with brackets around an IPv6 literal.
    pub(super) fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// An HTTP proxy: its address and its credentials, as a `Proxy-Authorization` value.
#[derive(Debug, Clone)]
pub(super) struct HttpProxy {
    host: String,
    port: u16,
    authorization: Option<String>,
    inner: ureq::Proxy,
}

/// Why the environment's proxy cannot be used.
pub(super) const UNSUPPORTED_PROXY: &str =
    "the proxy of the environment is not an http:// proxy (the reactor speaks only to HTTP \
     proxies): set proxy_from_env to false, or name an http:// proxy";

impl HttpProxy {
    /// The proxy the environment names, if any; `Err` when it is not an `http://` proxy.
    pub(super) fn from_env() -> Result<Option<Self>, &'static str> {
        let Some(proxy) = ureq::Proxy::try_from_env() else {
            return Ok(None);
        };
        if proxy.protocol() != ureq::ProxyProtocol::Http {
            return Err(UNSUPPORTED_PROXY);
        }
        let authorization = proxy.username().map(|user| {
            let pair = format!("{user}:{}", proxy.password().unwrap_or_default());
            format!("Basic {}", base64(pair.as_bytes()))
        });
        log::info!(
            "reactor requests go through the proxy at {}:{}",
            proxy.host(),
            proxy.port()
        );
        Ok(Some(Self {
            host: proxy
                .host()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port: proxy.port(),
            authorization,
            inner: proxy,
        }))
    }

    /// The proxy's own address, to connect to.
    pub(super) fn origin(&self) -> Origin {
        Origin {
            https: false,
            host: self.host.clone(),
            port: self.port,
        }
    }

    /// Whether `NO_PROXY` sends requests to `uri` straight to it.
    pub(super) fn bypassed_for(&self, uri: &http::Uri) -> bool {
        self.inner.is_no_proxy(uri)
    }

    pub(super) fn authorization(&self) -> Option<&str> {
        self.authorization.as_deref()
    }
}

/// A `CONNECT` tunnel being opened: the request, then the proxy's answer head.
#[derive(Debug)]
pub(super) struct Tunnel {
    pub(super) request: Vec<u8>,
    pub(super) written: usize,
    answer: Vec<u8>,
}

impl Tunnel {
    pub(super) fn new(target: &Origin, authorization: Option<&str>) -> Self {
        let authority = target.authority();
        let mut request = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
        if let Some(value) = authorization {
            request.push_str(&format!("Proxy-Authorization: {value}\r\n"));
        }
        request.push_str("\r\n");
        Self {
            request: request.into_bytes(),
            written: 0,
            answer: Vec::new(),
        }
    }

    /// Takes bytes of the proxy's answer: `Ok(true)` once the tunnel is open.
    pub(super) fn answered(&mut self, bytes: &[u8]) -> Result<bool, TransportFailure> {
        self.answer.extend_from_slice(bytes);
        let Some(end) = self.answer.windows(4).position(|w| w == b"\r\n\r\n") else {
            if self.answer.len() > MAX_TUNNEL_HEAD {
                return Err(refused("the proxy's answer to CONNECT is too long"));
            }
            return Ok(false);
        };
        if end + 4 != self.answer.len() {
            return Err(refused("the proxy sent bytes after its answer to CONNECT"));
        }
        let head = String::from_utf8_lossy(&self.answer[..end]);
        let status_line = head.lines().next().unwrap_or_default();
        let mut parts = status_line.split(' ');
        let version = parts.next().unwrap_or_default();
        let status = parts.next().and_then(|s| s.parse::<u16>().ok());
        match status {
            Some(status) if version.starts_with("HTTP/1.") && (200..300).contains(&status) => {
                Ok(true)
            }
            _ => Err(refused(&format!(
                "the proxy refused the tunnel: {status_line}"
            ))),
        }
    }
}

fn refused(detail: &str) -> TransportFailure {
    TransportFailure::new(TransportErrorKind::Connect, detail)
}

/// Standard base64 with padding (for `Proxy-Authorization: Basic`).
pub(super) fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_as_in_rfc_4648() {
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), encoded);
        }
    }

    #[test]
    fn a_tunnel_opens_on_a_2xx_and_is_refused_otherwise() {
        let target = Origin {
            https: true,
            host: "::1".to_owned(),
            port: 8448,
        };
        let mut tunnel = Tunnel::new(&target, Some("Basic eDp5"));
        let request = String::from_utf8(tunnel.request.clone()).unwrap();
        assert_eq!(
            request,
            "CONNECT [::1]:8448 HTTP/1.1\r\nHost: [::1]:8448\r\n\
             Proxy-Authorization: Basic eDp5\r\n\r\n"
        );
        assert!(!tunnel.answered(b"HTTP/1.1 200 Connection").unwrap());
        assert!(tunnel.answered(b" established\r\n\r\n").unwrap());

        let mut refused = Tunnel::new(&target, None);
        let failure = refused
            .answered(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
            .unwrap_err();
        assert_eq!(failure.kind, TransportErrorKind::Connect);
        assert!(failure.detail.contains("407"), "{failure}");
    }

    #[test]
    fn origins_of_urls() {
        let origin = Origin::of(&"https://[::1]/x".parse().unwrap()).unwrap();
        assert_eq!(origin.authority(), "[::1]:443");
        let origin = Origin::of(&"http://example.org:8008/x".parse().unwrap()).unwrap();
        assert_eq!((origin.https, origin.port), (false, 8008));
        assert!(Origin::of(&"ftp://example.org/".parse().unwrap()).is_err());
    }
}
