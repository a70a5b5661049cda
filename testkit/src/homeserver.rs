//! Either homeserver of the integration tests behind one interface, so that a scenario is
//! written once and run against both:
//!
//! ```no_run
//! use matrix_sync_testkit::homeserver::Server;
//!
//! fn scenario(server: Server) {
//!     let homeserver = server.shared();
//!     let url = homeserver.base_url();
//!     // ... register accounts with `client::Account::register(&url, "alice")` ...
//! }
//!
//! #[test]
//! fn scenario_on_synapse() {
//!     scenario(Server::Synapse)
//! }
//!
//! #[test]
//! fn scenario_on_palpo() {
//!     scenario(Server::Palpo)
//! }
//! ```

use std::fmt;

pub use crate::lifecycle::Options;
use crate::palpo::Palpo;
use crate::synapse::{Synapse, SynapseOptions};

/// Which homeserver implementation a test runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Server {
    /// Synapse, the reference implementation ([`Synapse`]).
    Synapse,
    /// palpo 0.0.2 with PostgreSQL ([`Palpo`]).
    Palpo,
}

impl Server {
    /// Both servers, Synapse first.
    pub const ALL: [Server; 2] = [Server::Synapse, Server::Palpo];

    /// The server's name, lowercase: `synapse` or `palpo`.
    pub fn name(self) -> &'static str {
        match self {
            Server::Synapse => "synapse",
            Server::Palpo => "palpo",
        }
    }

    /// The one server of this kind shared by all tests of the test binary, started on
    /// first use ([`Synapse::shared`], [`Palpo::shared`]).
    pub fn shared(self) -> &'static dyn Homeserver {
        match self {
            Server::Synapse => Synapse::shared(),
            Server::Palpo => Palpo::shared(),
        }
    }

    /// A fresh server of this kind, stopped when dropped ([`Synapse::start`],
    /// [`Palpo::start`]).
    pub fn start(self) -> Box<dyn Homeserver> {
        self.start_with(Options::new())
    }

    /// A fresh server of this kind started with `options`, stopped when dropped.
    pub fn start_with(self, options: Options) -> Box<dyn Homeserver> {
        match self {
            Server::Synapse => {
                let mut synapse = SynapseOptions::new();
                if options.discoverable {
                    synapse = synapse.discoverable();
                }
                if options.quick_passwords {
                    synapse = synapse.config("bcrypt_rounds", serde_json::json!(4));
                }
                Box::new(synapse.start())
            }
            Server::Palpo => Box::new(Palpo::start_with(options)),
        }
    }
}

impl fmt::Display for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What tests use of a running throwaway homeserver, whichever it is.
pub trait Homeserver: Send + Sync {
    /// Which implementation this is.
    fn server(&self) -> Server;
    /// `http://127.0.0.1:PORT`, without a trailing slash.
    fn base_url(&self) -> String;
    /// The loopback port the client API listens on.
    fn port(&self) -> u16;
    /// The server name, the suffix of user and room ids.
    fn server_name(&self) -> &str;
    /// The last `lines` lines of the server's logs, for failure messages.
    fn log_tail(&self, lines: usize) -> String;
    /// Stops the server hard (SIGKILL) and waits until it is gone. Idempotent.
    fn kill(&mut self);
    /// Starts the server again on the same port with its data (killing it first if it
    /// still runs) and waits until it answers.
    fn restart(&mut self);
    /// Whether the server is (still) running.
    fn is_running(&mut self) -> bool;
}

impl Homeserver for Synapse {
    fn server(&self) -> Server {
        Server::Synapse
    }
    fn base_url(&self) -> String {
        Synapse::base_url(self)
    }
    fn port(&self) -> u16 {
        Synapse::port(self)
    }
    fn server_name(&self) -> &str {
        Synapse::server_name(self)
    }
    fn log_tail(&self, lines: usize) -> String {
        Synapse::log_tail(self, lines)
    }
    fn kill(&mut self) {
        Synapse::kill(self)
    }
    fn restart(&mut self) {
        Synapse::restart(self)
    }
    fn is_running(&mut self) -> bool {
        Synapse::is_running(self)
    }
}

impl Homeserver for Palpo {
    fn server(&self) -> Server {
        Server::Palpo
    }
    fn base_url(&self) -> String {
        Palpo::base_url(self)
    }
    fn port(&self) -> u16 {
        Palpo::port(self)
    }
    fn server_name(&self) -> &str {
        Palpo::server_name(self)
    }
    fn log_tail(&self, lines: usize) -> String {
        Palpo::log_tail(self, lines)
    }
    fn kill(&mut self) {
        Palpo::kill(self)
    }
    fn restart(&mut self) {
        Palpo::restart(self)
    }
    fn is_running(&mut self) -> bool {
        Palpo::is_running(self)
    }
}
