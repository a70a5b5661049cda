//! Shared helpers for the integration tests: a throwaway Synapse homeserver,
//! a minimal blocking Matrix client, and a fault-injecting proxy.
#![allow(dead_code)]

pub mod client;
pub mod fake_server;
pub mod proxy;
pub mod service;
pub mod synapse;
