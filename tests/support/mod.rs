//! Shared helpers for the integration tests that need the driver: throwaway homeservers
//! (Synapse, and palpo through `matrix_sync_testkit::homeserver`) and a minimal blocking
//! Matrix client (from the test kit), a fake server, a fault-injecting proxy, the service
//! wrapper and, with the `e2ee` feature, an independent encrypting client.
#![allow(dead_code)]

#[allow(unused_imports)]
pub use matrix_sync_testkit::{client, fake_server, proxy, synapse};

pub mod connect_proxy;
#[cfg(feature = "e2ee")]
pub mod e2ee_sender;
pub mod palpo_stream;
pub mod service;
