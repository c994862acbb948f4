//! Who may use a viewer connection, and for how long: its connection rules in the handshake,
//! those that read the client's address at its first request, and, once the state has changed
//! under an open connection, its certificate and connection rules checked again at its next
//! request. A refusal is final: the connection gets no further response.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};


use crate::identity::{ConnectionIdentity, ConnectionInfo, ViewerCert};
use crate::reason::{Refusal, Refused};
use crate::rules::{self, Decision, Phase, RuleSet};
use crate::trust_store::TrustStore;
use crate::{logs, metrics};

/// What connection rules decided.
pub enum Verdict {
    Refused(Refused),
    /// An `allow` ended the connection phase.
    Allowed,
    /// No `allow` or `deny` matched.
    Open,
}

/// Runs the connection rules of `phases` (the handshake's, where the client's address is not
/// known and `client_ip` is empty, or those after it).
pub fn connection_rules(
    rules: &RuleSet,
    phases: &[Phase],
    cert: Option<&ViewerCert>,
    info: &ConnectionInfo,
    client_ip: &str,
) -> Verdict {
    let facts = rules::Facts {
        cert,
        verified: true,
        connection: info,
        client_ip,
        request: None,
        lists: rules.lists(),
        now: rules::facts::unix_now(),
    };
    match rules.evaluate(phases, &facts, None).decision {
        Decision::Deny { rule, .. } => {
            Verdict::Refused(Refused::new(Refusal::ConnectionRuleDenied, format!("rule {rule}")))
        }
        Decision::Error { rule, message } => Verdict::Refused(Refused::new(
            Refusal::ConnectionRuleError,
            format!("rule {rule}: {message}"),
        )),
        Decision::Allow { .. } => Verdict::Allowed,
        Decision::Continue => Verdict::Open,
    }
}

/// What the state in force says about a connection's listener and SNI, at a request.
pub struct Current<'a> {
    pub generation: u64,
    /// `None` when the listener no longer asks for certificates (mode off).
    pub trust_store: Option<&'a TrustStore>,
    /// Mode required: a connection without a certificate is refused.
    pub cert_required: bool,
    pub rules: &'a RuleSet,
}

/// Counts the handshake once the connection rules after it have run: with their refusal, if any,
/// and the client's address.
pub type CountHandshake = Box<dyn FnOnce(Option<&Refused>, &str) + Send>;

/// Where a connection stands.
enum Status {
    /// Its handshake ran under `generation`; `after_handshake` connection rules are still to run
    /// at its first request, which also counts the handshake (`count`).
    Handshaken {
        generation: u64,
        after_handshake: bool,
        count: Option<CountHandshake>,
    },
    Admitted,
    Refused(Refused),
}

/// A viewer connection as requests see it: who it is, and whether it may still be served.
pub struct Connection {
    pub identity: ConnectionIdentity,
    /// Its deadline (request header, keep-alive idle), which `limits` enforces.
    pub clock: Arc<crate::limits::Clock>,
    /// The generation it was last admitted under (0: not yet); read without the lock.
    admitted: AtomicU64,
    status: Mutex<Status>,
    /// What each of its access lines says of it, rendered at its first.
    access_fields: OnceLock<logs::ConnectionFields>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Connection({:?})", self.identity)
    }
}

impl Connection {
    /// A connection whose handshake ran under `generation`. `refused`: connection rules refused it
    /// in the handshake's last step (a client without a certificate, where no verify step ran).
    pub fn new(
        identity: ConnectionIdentity,
        generation: u64,
        refused: Option<Refused>,
        after_handshake: Option<CountHandshake>,
    ) -> Arc<Connection> {
        metrics::OPEN_CONNECTIONS.with_label_values(&[&identity.listener]).inc();
        let status = match refused {
            Some(r) => Status::Refused(r),
            None => Status::Handshaken {
                generation,
                after_handshake: after_handshake.is_some(),
                count: after_handshake,
            },
        };
        Arc::new(Connection {
            identity,
            clock: Arc::default(),
            admitted: AtomicU64::new(0),
            status: Mutex::new(status),
            access_fields: OnceLock::new(),
        })
    }

    /// Whether the connection was admitted under the state of `generation`: the check of every
    /// request after its connection's first, until a reload.
    /// What each of its access lines says of it (listener, client address, SNI, certificate),
    /// rendered at its first; `ip` is asked for then.
    pub fn access_fields(&self, ip: impl FnOnce() -> String) -> &logs::ConnectionFields {
        self.access_fields.get_or_init(|| {
            let id = &self.identity;
            logs::ConnectionFields::new(&id.listener, &ip(), id.sni.as_deref(), id.cert.as_ref())
        })
    }

    pub fn admitted_under(&self, generation: u64) -> bool {
        self.admitted.load(Ordering::Acquire) == generation
    }

    /// Whether the connection may be served under `current`; `client_ip` is read only when rules
    /// run. The first request runs the connection rules left for after the handshake; a request
    /// under a newer state than the last one checks the certificate against its trust store and
    /// runs every connection rule. A refusal then is counted and logged here, and stays.
    pub fn check(&self, current: &Current, client_ip: &str) -> Result<(), Refused> {
        if self.admitted_under(current.generation) {
            return Ok(());
        }
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        if self.admitted_under(current.generation) {
            return Ok(());
        }
        let (result, recheck) = match &mut *status {
            Status::Refused(r) => return Err(r.clone()),
            Status::Handshaken {
                generation,
                after_handshake,
                count,
            } if *generation == current.generation => {
                let result = match after_handshake {
                    true => self.rules(current, &[Phase::AfterHandshake], client_ip),
                    false => Ok(()),
                };
                if let Some(count) = count.take() {
                    count(result.as_ref().err(), client_ip);
                }
                (result, false)
            }
            Status::Handshaken { count, .. } => {
                let result = self.recheck(current, client_ip);
                if let Some(count) = count.take() {
                    count(None, client_ip);
                }
                (result, true)
            }
            Status::Admitted => (self.recheck(current, client_ip), true),
        };
        match &result {
            Ok(()) => {
                *status = Status::Admitted;
                self.admitted.store(current.generation, Ordering::Release);
            }
            Err(r) => {
                if recheck {
                    self.count_closed(r, client_ip);
                }
                *status = Status::Refused(r.clone());
            }
        }
        result
    }

    fn rules(&self, current: &Current, phases: &[Phase], client_ip: &str) -> Result<(), Refused> {
        let id = &self.identity;
        match connection_rules(current.rules, phases, id.cert.as_ref(), &id.info, client_ip) {
            Verdict::Refused(r) => Err(r),
            Verdict::Allowed | Verdict::Open => Ok(()),
        }
    }

    /// The certificate against the current trust store, then every connection rule.
    fn recheck(&self, current: &Current, client_ip: &str) -> Result<(), Refused> {
        let id = &self.identity;
        match (current.trust_store, id.chain.split_first()) {
            (Some(store), Some(_)) => {
                store.verify_chain(&id.chain, rules::facts::unix_now())?;
            }
            (Some(_), None) if current.cert_required => {
                return Err(Refused::new(Refusal::ClientCertMissing, "no client certificate"));
            }
            _ => {}
        }
        self.rules(current, &[Phase::Connection, Phase::AfterHandshake], client_ip)
    }

    fn count_closed(&self, r: &Refused, client_ip: &str) {
        let id = &self.identity;
        metrics::CONNECTIONS_CLOSED
            .with_label_values(&[&id.listener, r.reason.as_str()])
            .inc();
        logs::connection(&logs::ConnectionEvent {
            event: "closed",
            listener: &id.listener,
            sni: id.sni.as_deref(),
            client_ip: Some(client_ip),
            reason: r.reason,
            detail: &format!("{}, at a request after a reload", r.detail),
            cert: id.cert.as_ref(),
            tls_version: Some(&id.info.tls_version),
        });
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        metrics::OPEN_CONNECTIONS
            .with_label_values(&[&self.identity.listener])
            .dec();
    }
}
