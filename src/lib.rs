//! mtls-edge: a CDN edge node on Pingora that serves content only to clients that prove who they
//! are with an X.509 certificate, and proves its own identity to the origins behind it.
//!
//! A request flows one way through the modules:
//!
//! ```text
//! viewer_tls (handshake, trust_store) → identity (cert → headers) → rules (connection phase)
//!   → proxy (route, access) → rules (request phase) → cache → origin (mTLS)
//! ```
//!
//! `config` is the leaf every stage reads; `app` compiles the stages and runs them; `metrics`
//! counts what happens; `admin` serves the metrics; `demo` and `pki` give newcomers and tests a
//! working system with a freshly generated PKI.
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod cache;
pub mod config;
pub mod demo;
pub mod identity;
pub mod metrics;
pub mod origin;
pub mod pki;
pub mod proxy;
pub mod rules;
pub mod trust_store;
pub mod viewer_tls;
