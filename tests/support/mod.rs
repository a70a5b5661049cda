//! Shared helpers for the integration tests that need the driver: a throwaway Synapse
//! homeserver and a minimal blocking Matrix client (from the test kit), a fake server, a
//! fault-injecting proxy and the service wrapper.
#![allow(dead_code)]

#[allow(unused_imports)]
pub use matrix_sync_testkit::{client, fake_server, proxy, synapse};

pub mod connect_proxy;
pub mod service;
