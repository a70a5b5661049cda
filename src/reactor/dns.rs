//! Name resolution off the loop thread: a look-up runs on a short-lived thread of its own and
//! its answer comes back through a channel and the loop's waker, so a slow resolver delays
//! only the accounts waiting for that name. Answers are kept for a minute, per host and port.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use mio::Waker;

/// How long an answer is reused for new connections.
const KEEP: Duration = Duration::from_secs(60);

type Name = (String, u16);

/// A look-up's outcome: the first address, or why there is none.
pub(super) type Resolved = Result<SocketAddr, String>;

enum Entry<W> {
    /// Being looked up; these wait for it.
    Pending(Vec<W>),
    Known(SocketAddr, Instant),
}

/// The cache and the look-ups in flight; `W` names who waits (an account's slot).
pub(super) struct Resolver<W> {
    entries: HashMap<Name, Entry<W>>,
    done_tx: Sender<(Name, Resolved)>,
    done_rx: Receiver<(Name, Resolved)>,
    waker: Arc<Waker>,
}

/// What [`Resolver::lookup`] gives at once.
pub(super) enum Lookup {
    Ready(SocketAddr),
    /// Asked: the answer comes from [`Resolver::finished`] after a wake-up.
    Waiting,
    /// No thread for the look-up.
    Failed(String),
}

impl<W> Resolver<W> {
    pub(super) fn new(waker: Arc<Waker>) -> Self {
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        Self {
            entries: HashMap::new(),
            done_tx,
            done_rx,
            waker,
        }
    }

    /// The address of `host:port`: at once for an IP literal or a known name, else `waiter`
    /// waits for a look-up.
    pub(super) fn lookup(&mut self, host: &str, port: u16, waiter: W, now: Instant) -> Lookup {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Lookup::Ready(SocketAddr::new(ip, port));
        }
        let name = (host.to_owned(), port);
        match self.entries.get_mut(&name) {
            Some(Entry::Known(addr, at)) if now.saturating_duration_since(*at) < KEEP => {
                return Lookup::Ready(*addr)
            }
            Some(Entry::Pending(waiters)) => {
                waiters.push(waiter);
                return Lookup::Waiting;
            }
            _ => {}
        }
        let (done, waker) = (self.done_tx.clone(), self.waker.clone());
        let asked = name.clone();
        let spawned = thread::Builder::new()
            .name("matrix-sync-resolve".to_owned())
            .spawn(move || {
                let resolved = (asked.0.as_str(), asked.1)
                    .to_socket_addrs()
                    .map_err(|e| format!("cannot resolve {}: {e}", asked.0))
                    .and_then(|mut addrs| {
                        addrs
                            .next()
                            .ok_or_else(|| format!("{} has no address", asked.0))
                    });
                if done.send((asked, resolved)).is_ok() {
                    let _ = waker.wake();
                }
            });
        match spawned {
            Ok(_) => {
                self.entries.insert(name, Entry::Pending(vec![waiter]));
                Lookup::Waiting
            }
            Err(e) => Lookup::Failed(format!("no thread for a name look-up: {e}")),
        }
    }

    /// The look-ups that ended since the last call, each with those who waited for it.
    pub(super) fn finished(&mut self, now: Instant) -> Vec<(Vec<W>, Resolved)> {
        let mut ended = Vec::new();
        while let Ok((name, resolved)) = self.done_rx.try_recv() {
            let waiters = match self.entries.remove(&name) {
                Some(Entry::Pending(waiters)) => waiters,
                _ => Vec::new(),
            };
            if let Ok(addr) = &resolved {
                self.entries.insert(name, Entry::Known(*addr, now));
            }
            ended.push((waiters, resolved));
        }
        ended
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_at_once_names_through_a_look_up_then_from_the_cache() {
        let poll = mio::Poll::new().unwrap();
        let waker = Arc::new(Waker::new(poll.registry(), mio::Token(0)).unwrap());
        let mut resolver = Resolver::new(waker);
        let now = Instant::now();
        assert!(matches!(
            resolver.lookup("::1", 80, 1, now),
            Lookup::Ready(addr) if addr == "[::1]:80".parse().unwrap()
        ));
        assert!(matches!(
            resolver.lookup("localhost", 80, 1, now),
            Lookup::Waiting
        ));
        assert!(matches!(
            resolver.lookup("localhost", 80, 2, now),
            Lookup::Waiting
        ));
        let deadline = Instant::now() + Duration::from_secs(10);
        let ended = loop {
            let ended = resolver.finished(now);
            if !ended.is_empty() || Instant::now() > deadline {
                break ended;
            }
            thread::sleep(Duration::from_millis(5));
        };
        let [(waiters, Ok(addr))] = ended.as_slice() else {
            panic!("one look-up, resolved: {}", ended.len())
        };
        assert_eq!(waiters, &[1, 2]);
        assert!(addr.ip().is_loopback());
        assert!(matches!(resolver.lookup("localhost", 80, 3, now), Lookup::Ready(a) if a == *addr));
        let later = now + KEEP;
        assert!(matches!(
            resolver.lookup("localhost", 80, 4, later),
            Lookup::Waiting
        ));
    }
}
