//! Name resolution for the driver's agent: an address that needs no look-up gets none.
//!
//! ureq resolves the homeserver's host before every request, a reused keep-alive connection
//! included, and its default resolver runs the look-up on a new thread whenever a timeout
//! applies, so that it can give up at the timeout. The driver sets a deadline on every
//! request, so every request paid for a thread (about 30 µs, `BENCHMARKS.md` section 9),
//! even for an IP address, which `getaddrinfo` merely parses. This resolver parses IP
//! literals itself, on the calling thread, and leaves names to ureq's resolver (a thread per
//! look-up, bounded by the resolve timeout): a name's look-up reads files or asks a DNS
//! server, which costs more than the thread, and a look-up that hangs must stay abandonable,
//! which a blocking look-up on the driver thread would not be.
//!
//! Built on ureq's `unversioned` resolver interface, which ureq may change in a minor
//! version: a ureq update that breaks it breaks this file's build, not its behaviour.

use std::net::{IpAddr, SocketAddr};

use ureq::config::Config;
use ureq::http::Uri;
use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::NextTimeout;

/// The driver's resolver for ureq: IP literals parsed here, names resolved by ureq's
/// [`DefaultResolver`]. For an application that builds its own agent
/// ([`DriverConfig::agent`](crate::DriverConfig::agent)) with `ureq::Agent::with_parts` and
/// wants the same saving.
#[derive(Debug, Default)]
pub struct LiteralFirst {
    names: DefaultResolver,
}

impl Resolver for LiteralFirst {
    fn resolve(
        &self,
        uri: &Uri,
        config: &Config,
        timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let Some(addr) = ip_literal(uri) else {
            return self.names.resolve(uri, config, timeout);
        };
        let mut addrs = self.empty();
        for wanted in config.ip_family().keep_wanted(std::iter::once(addr)) {
            addrs.push(wanted);
        }
        if addrs.is_empty() {
            // An IPv6 literal with IPv4 only, or the reverse: nothing to connect to.
            return Err(ureq::Error::HostNotFound);
        }
        Ok(addrs)
    }
}

/// The socket address of an `http` or `https` URI whose host is an IP address.
fn ip_literal(uri: &Uri) -> Option<SocketAddr> {
    let authority = uri.authority()?;
    let port = authority.port_u16().or(match uri.scheme_str()? {
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    })?;
    let host = authority.host();
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let ip: IpAddr = host.parse().ok()?;
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn literal(uri: &str) -> Option<SocketAddr> {
        ip_literal(&uri.parse().unwrap())
    }

    #[test]
    fn ip_literals_are_parsed_and_names_are_not() {
        assert_eq!(
            literal("http://127.0.0.1:8008/x"),
            "127.0.0.1:8008".parse().ok()
        );
        assert_eq!(literal("https://127.0.0.1/x"), "127.0.0.1:443".parse().ok());
        assert_eq!(literal("http://[::1]/"), "[::1]:80".parse().ok());
        assert_eq!(literal("https://[::1]:8448/"), "[::1]:8448".parse().ok());
        assert_eq!(literal("https://matrix.example.org/"), None);
        assert_eq!(literal("https://localhost:8448/"), None);
        assert_eq!(
            literal("socks5://127.0.0.1/"),
            None,
            "no known default port"
        );
        assert_eq!(
            literal("socks5://127.0.0.1:1080/"),
            "127.0.0.1:1080".parse().ok()
        );
    }

    #[test]
    fn the_ip_family_is_kept() {
        let resolve = |uri: &str, family| {
            let config = ureq::Agent::config_builder().ip_family(family).build();
            let timeout = NextTimeout::default();
            LiteralFirst::default().resolve(&uri.parse().unwrap(), &config, timeout)
        };
        use ureq::config::IpFamily;
        let addrs = resolve("http://[::1]:8008/", IpFamily::Any).unwrap();
        assert_eq!(addrs[..], ["[::1]:8008".parse().unwrap()]);
        assert!(matches!(
            resolve("http://[::1]:8008/", IpFamily::Ipv4Only),
            Err(ureq::Error::HostNotFound)
        ));
    }
}
