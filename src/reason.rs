//! Why things happen, as types: why a connection was refused, why an origin request failed, what
//! the cache did, why a request was answered by the edge itself. The same names are metric labels,
//! log fields and the words of `rules explain`. A leaf: it depends on nothing in the crate.

/// Why a viewer connection was refused: in its handshake, or at a request once its certificate
/// or its connection rules no longer pass (after a reload). CloudFront's names where it has them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    ClientCertMissing,
    ClientCertExpired,
    ClientCertNotYetValid,
    ClientCertUntrusted,
    ClientCertIntentInvalid,
    ClientCertRevoked,
    ClientCertPathLenExceeded,
    ClientCertMaxChainDepthExceeded,
    /// A SAN (or the subject) falls outside a CA's nameConstraints.
    ClientCertNameConstraintsViolated,
    ClientCertRevocationUnknown,
    ClientCertInvalid,
    ConnectionRuleDenied,
    ConnectionRuleError,
    /// BoringSSL refused before chain verification (a bad signature, no shared cipher...).
    HandshakeFailed,
    /// The client closed the connection during the handshake.
    HandshakeAborted,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::ClientCertMissing => "ClientCertMissing",
            Refusal::ClientCertExpired => "ClientCertExpired",
            Refusal::ClientCertNotYetValid => "ClientCertNotYetValid",
            Refusal::ClientCertUntrusted => "ClientCertUntrusted",
            Refusal::ClientCertIntentInvalid => "ClientCertIntentInvalid",
            Refusal::ClientCertRevoked => "ClientCertRevoked",
            Refusal::ClientCertPathLenExceeded => "ClientCertPathLenExceeded",
            Refusal::ClientCertMaxChainDepthExceeded => "ClientCertMaxChainDepthExceeded",
            Refusal::ClientCertNameConstraintsViolated => "ClientCertNameConstraintsViolated",
            Refusal::ClientCertRevocationUnknown => "ClientCertRevocationUnknown",
            Refusal::ClientCertInvalid => "ClientCertInvalid",
            Refusal::ConnectionRuleDenied => "ConnectionRuleDenied",
            Refusal::ConnectionRuleError => "ConnectionRuleError",
            Refusal::HandshakeFailed => "HandshakeFailed",
            Refusal::HandshakeAborted => "HandshakeAborted",
        }
    }
}

/// A refusal and what it was about (the certificate, the rule), for logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub reason: Refusal,
    pub detail: String,
}

impl Refused {
    pub fn new(reason: Refusal, detail: impl Into<String>) -> Refused {
        Refused {
            reason,
            detail: detail.into(),
        }
    }
}

/// A limit a client ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Limit {
    HandshakeTimeout,
    HeaderTimeout,
    IdleTimeout,
    HeaderTooLarge,
    ConnectionsTotal,
    ConnectionsPerIp,
    RateLimited,
    FailedHandshakesPerIp,
}

impl Limit {
    pub const ALL: [Limit; 8] = [
        Limit::HandshakeTimeout,
        Limit::HeaderTimeout,
        Limit::IdleTimeout,
        Limit::HeaderTooLarge,
        Limit::ConnectionsTotal,
        Limit::ConnectionsPerIp,
        Limit::RateLimited,
        Limit::FailedHandshakesPerIp,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Limit::HandshakeTimeout => "HandshakeTimeout",
            Limit::HeaderTimeout => "HeaderTimeout",
            Limit::IdleTimeout => "IdleTimeout",
            Limit::HeaderTooLarge => "HeaderTooLarge",
            Limit::ConnectionsTotal => "ConnectionsTotal",
            Limit::ConnectionsPerIp => "ConnectionsPerIp",
            Limit::RateLimited => "RateLimited",
            Limit::FailedHandshakesPerIp => "FailedHandshakesPerIp",
        }
    }

    pub fn from_u8(v: u8) -> Limit {
        Limit::ALL.get(v as usize).copied().unwrap_or(Limit::HeaderTimeout)
    }
}

/// Why the admin listener refused a request (refused handshakes are counted as handshakes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminRefusal {
    TokenMissing,
    TokenInvalid,
}

impl AdminRefusal {
    pub fn as_str(self) -> &'static str {
        match self {
            AdminRefusal::TokenMissing => "TokenMissing",
            AdminRefusal::TokenInvalid => "TokenInvalid",
        }
    }
}

/// Why a request to an origin failed.
///
/// pingora 0.9 reports a failed upstream certificate check as `InvalidCert` without BoringSSL's
/// verify result, so an untrusted issuer, a wrong host name and an expired certificate share
/// `OriginCertInvalid`; the log line names the SNI the certificate was checked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OriginFailure {
    OriginCertInvalid,
    OriginRefusedClientCert,
    ConnectTimeout,
    ConnectRefused,
    OriginTlsHandshakeFailed,
    OriginTimeout,
    OriginConnectionError,
}

impl OriginFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            OriginFailure::OriginCertInvalid => "OriginCertInvalid",
            OriginFailure::OriginRefusedClientCert => "OriginRefusedClientCert",
            OriginFailure::ConnectTimeout => "ConnectTimeout",
            OriginFailure::ConnectRefused => "ConnectRefused",
            OriginFailure::OriginTlsHandshakeFailed => "OriginTlsHandshakeFailed",
            OriginFailure::OriginTimeout => "OriginTimeout",
            OriginFailure::OriginConnectionError => "OriginConnectionError",
        }
    }
}

/// What the cache did for a request on a cached route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheResult {
    Hit,
    Stale,
    Revalidated,
    Miss,
    Uncacheable,
    Bypass,
}

impl CacheResult {
    pub const ALL: [CacheResult; 6] = [
        CacheResult::Hit,
        CacheResult::Stale,
        CacheResult::Revalidated,
        CacheResult::Miss,
        CacheResult::Uncacheable,
        CacheResult::Bypass,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CacheResult::Hit => "hit",
            CacheResult::Stale => "stale",
            CacheResult::Revalidated => "revalidated",
            CacheResult::Miss => "miss",
            CacheResult::Uncacheable => "uncacheable",
            CacheResult::Bypass => "bypass",
        }
    }
}

/// Why the edge answered a request itself instead of forwarding it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answered {
    /// The connection was refused after its handshake: closed, unanswered.
    ConnectionRefused,
    /// The Host is not one the connection's SNI policy covers (421).
    HostNotCoveredBySni,
    /// The path has dot or empty segments or encoded separators (400).
    PathNotNormal,
    /// A header name has an underscore and `headers_with_underscores` is `refuse` (400).
    UnderscoreInHeaderName,
    /// The request line and headers exceed `limits.max_request_header_bytes` (431).
    HeaderTooLarge,
    /// The device's request bucket is empty (429 with Retry-After).
    RateLimited,
    NoRoute,
    CertificateRequiredForRoute,
    RuleDenied,
    RuleError,
    /// No identity from the handshake (cannot happen on the edge's own listeners).
    NoConnectionIdentity,
    /// On a shield: the edge's cache-key variants header is not what an edge sends (400).
    EdgeVariantsInvalid,
    /// On a shield: the origin the edge chose is not configured here (502).
    EdgeOriginUnknown,
}

impl Answered {
    pub fn as_str(self) -> &'static str {
        match self {
            Answered::ConnectionRefused => "ConnectionRefused",
            Answered::HostNotCoveredBySni => "HostNotCoveredBySni",
            Answered::PathNotNormal => "PathNotNormal",
            Answered::UnderscoreInHeaderName => "UnderscoreInHeaderName",
            Answered::HeaderTooLarge => "HeaderTooLarge",
            Answered::RateLimited => "RateLimited",
            Answered::NoRoute => "NoRoute",
            Answered::CertificateRequiredForRoute => "CertificateRequiredForRoute",
            Answered::RuleDenied => "RuleDenied",
            Answered::RuleError => "RuleError",
            Answered::NoConnectionIdentity => "NoConnectionIdentity",
            Answered::EdgeVariantsInvalid => "EdgeVariantsInvalid",
            Answered::EdgeOriginUnknown => "EdgeOriginUnknown",
        }
    }
}

/// A cache tier, as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    Memory,
    Disk,
}

impl Tier {
    pub const ALL: [Tier; 2] = [Tier::Memory, Tier::Disk];

    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Memory => "memory",
            Tier::Disk => "disk",
        }
    }
}

/// What the disk tier was doing when the filesystem failed it. A failure never fails the request:
/// the response is served from the origin (or the memory tier) and the disk is left alone for a
/// while.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskOp {
    /// Creating a fill's temporary file.
    Create,
    /// Writing a fill's body.
    Write,
    /// Renaming a finished fill (or a revalidated meta) into place.
    Commit,
    /// Reading an object.
    Read,
    /// Removing an evicted, purged or corrupt object.
    Remove,
    /// Scanning the directory at start.
    Load,
}

impl DiskOp {
    pub const ALL: [DiskOp; 6] = [
        DiskOp::Create,
        DiskOp::Write,
        DiskOp::Commit,
        DiskOp::Read,
        DiskOp::Remove,
        DiskOp::Load,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DiskOp::Create => "create",
            DiskOp::Write => "write",
            DiskOp::Commit => "commit",
            DiskOp::Read => "read",
            DiskOp::Remove => "remove",
            DiskOp::Load => "load",
        }
    }
}

/// Why an object file on disk was not served. It is removed, and the request is a miss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Corrupt {
    /// Not a file this edge wrote.
    Magic,
    /// Shorter than its own lengths say: a torn write.
    Truncated,
    /// A checksum does not match: flipped bits.
    Checksum,
    /// Lengths or fields that contradict each other.
    Fields,
}

impl Corrupt {
    pub const ALL: [Corrupt; 4] = [Corrupt::Magic, Corrupt::Truncated, Corrupt::Checksum, Corrupt::Fields];

    pub fn as_str(self) -> &'static str {
        match self {
            Corrupt::Magic => "magic",
            Corrupt::Truncated => "truncated",
            Corrupt::Checksum => "checksum",
            Corrupt::Fields => "fields",
        }
    }
}

/// Why a cacheable response was not written to disk (it is still served, and may still be kept
/// in memory).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskSkip {
    /// A recent I/O error: the disk is left alone for a while.
    Degraded,
    /// The budget or the filesystem's minimum free space left no room, even after eviction.
    NoSpace,
    /// Larger than `cache.disk.max_object_bytes`.
    TooLarge,
}

impl DiskSkip {
    pub const ALL: [DiskSkip; 3] = [DiskSkip::Degraded, DiskSkip::NoSpace, DiskSkip::TooLarge];

    pub fn as_str(self) -> &'static str {
        match self {
            DiskSkip::Degraded => "degraded",
            DiskSkip::NoSpace => "no_space",
            DiskSkip::TooLarge => "too_large",
        }
    }
}
