//! mtls-edge: a CDN edge node on Pingora that serves content only to clients that prove who they
//! are with an X.509 certificate, and proves its own identity to the origins behind it.
//!
//! A request flows one way through the modules:
//!
//! ```text
//! limits (accept: connection slots, deadlines) → viewer_tls (handshake, trust_store) →
//!   identity (cert → headers) → admission (connection rules, re-checked after a reload) →
//!   routes → rules (request phase) → cache → shield (a parent edge, mTLS) or origin (mTLS)
//! ```
//!
//! `config` is the YAML file and nothing else; `state` builds everything the stages run on from
//! it (the one place that reads certificates, keys, CRLs, rules and lists) and holds the state in
//! force; `reload` builds a new one and swaps it; `proxy` calls the stages in pingora's hook
//! order; `serve` runs each viewer connection, and `hit` answers fresh memory hits there with
//! the same stages, without pingora's request session; `app` runs it all, with `upgrade` for
//! the signals. `reason` names why things happen, for `metrics` and `logs`; `admin` serves the
//! metrics and reloads; `demo` and `pki` give newcomers and tests a working system with a
//! freshly generated PKI.
#![deny(unsafe_code)] // one audited exception: serve::ack_now borrows a socket pingora gives as a RawFd

pub mod admin;
pub mod admission;
pub mod app;
pub mod cache;
pub mod config;
pub mod demo;
pub mod fill;
pub mod fingerprint;
pub mod hit;
pub mod identity;
pub mod limits;
pub mod logs;
pub mod metrics;
pub mod origin;
pub mod pki;
#[cfg(test)]
mod properties;
pub mod proxy;
pub mod reason;
pub mod records;
pub mod reload;
pub mod routes;
pub mod rules;
pub mod serve;
pub mod shield;
pub mod state;
pub mod trust_store;
pub mod upgrade;
pub mod viewer_tls;
