//! The shield tier, edge side: which shield node is an object's home (consistent hashing of its
//! cache key with pingora-ketama, so every edge picks the same one), which nodes are passed over
//! after a failed connection, and the control headers that carry what the edge decided about a
//! request (its cache-key variants, its origin) to the shield, which keys and routes by them.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use http::HeaderValue;
use pingora_ketama::{Bucket, Continuum};

use crate::origin::Origin;

/// The cache-key variants (cohort, rule-chosen origin and headers: `proxy::key_variants`),
/// percent-encoded. Set by an edge toward its shield; removed from every other client's request.
pub const VARIANTS_HEADER: &str = "x-mtls-edge-cache-variants";
/// The name of the origin the edge's route or rules chose.
pub const ORIGIN_HEADER: &str = "x-mtls-edge-origin";

/// Points per node on the ring (ketama's 160 per unit of weight; every node weighs 1).
const POINTS_PER_NODE: usize = 160;

/// What a miss does when no shield node can be tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    Origin,
    None,
}

struct Node {
    peer: Arc<Origin>,
    /// The node is this process (one of its listeners for edges): its objects are fetched here.
    itself: bool,
    /// Milliseconds since [`epoch`] until which the node is passed over (0: up).
    down_until: AtomicU64,
}

/// The shield nodes of one state, and the ring over them.
pub struct Shield {
    nodes: Vec<Node>,
    ring: Continuum,
    down_for: Duration,
    pub fallback: Fallback,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    u64::try_from(epoch().elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Where a miss goes.
pub enum Pick<'a> {
    /// To this shield node (its index).
    Node(usize, &'a Arc<Origin>),
    /// To the origin, from here: this node is the object's shield.
    Itself,
    /// To the fallback: no node can take it.
    Nowhere,
}

/// The shield nodes a request has tried, by index (config refuses more than 64 nodes).
#[derive(Debug, Clone, Copy, Default)]
pub struct Tried(u64);

impl Tried {
    fn has(self, i: usize) -> bool {
        self.0 & (1 << i) != 0
    }
    pub fn add(&mut self, i: usize) {
        self.0 |= 1 << i;
    }
}

impl Shield {
    /// `own`: the addresses of this process's listeners for edges. A node at one of them is
    /// this process, and stays on the ring, so that every node agrees on each object's home.
    pub fn new(peers: Vec<Arc<Origin>>, own: &[SocketAddr], down_for: Duration, fallback: Fallback) -> Shield {
        let buckets: Vec<Bucket> = peers.iter().map(|p| Bucket::new(p.address(), 1)).collect();
        Shield {
            ring: Continuum::new(&buckets),
            nodes: peers
                .into_iter()
                .map(|peer| Node {
                    itself: own.iter().any(|l| is_listener_of(*l, peer.address())),
                    peer,
                    down_until: AtomicU64::new(0),
                })
                .collect(),
            down_for,
            fallback,
        }
    }

    fn index_of(&self, addr: &SocketAddr) -> Option<usize> {
        self.nodes.iter().position(|n| n.peer.address() == *addr)
    }

    /// The nodes for `key` in ring order, each once: its home first, then the nodes that take
    /// over when the ones before are out.
    fn order(&self, key: &[u8]) -> impl Iterator<Item = usize> + '_ {
        let mut seen = Tried::default();
        self.ring
            .node_iter(key)
            .take(self.nodes.len() * POINTS_PER_NODE)
            .filter_map(move |a| {
                let i = self.index_of(a)?;
                (!seen.has(i)).then(|| {
                    seen.add(i);
                    i
                })
            })
    }

    /// Where a miss for `key` goes next: the first node in ring order not yet tried and not
    /// passed over (this process itself, when it comes first). When every untried node is
    /// passed over and there is no fallback, the first untried one is tried anyway: an old mark
    /// is no reason to fail a request.
    pub fn next(&self, key: &[u8], tried: Tried) -> Pick<'_> {
        let now = now_ms();
        let mut untried = self.order(key).filter(|i| !tried.has(*i)).peekable();
        let first = untried.peek().copied();
        let up = untried.find(|i| self.nodes[*i].itself || self.nodes[*i].down_until.load(Ordering::Relaxed) <= now);
        match up.or(first.filter(|_| self.fallback == Fallback::None)) {
            Some(i) if self.nodes[i].itself => Pick::Itself,
            Some(i) => Pick::Node(i, &self.nodes[i].peer),
            None => Pick::Nowhere,
        }
    }

    /// Passes a node over for the configured time: a connection to it failed.
    pub fn mark_down(&self, i: usize) {
        if let Some(n) = self.nodes.get(i) {
            let until = now_ms().saturating_add(u64::try_from(self.down_for.as_millis()).unwrap_or(u64::MAX));
            n.down_until.store(until, Ordering::Relaxed);
        }
    }

    pub fn name(&self, i: usize) -> &str {
        self.nodes.get(i).map_or("", |n| &n.peer.name)
    }
}

/// Whether a listener bound to `listener` accepts connections made to `node`: the same address,
/// or the same port on an unspecified address (0.0.0.0, ::) when `node`'s IP is one of this
/// host's (a socket can be bound to it).
fn is_listener_of(listener: SocketAddr, node: SocketAddr) -> bool {
    let local = |ip: std::net::IpAddr| ip.is_loopback() || std::net::UdpSocket::bind((ip, 0)).is_ok();
    listener.port() == node.port()
        && (listener.ip() == node.ip() || (listener.ip().is_unspecified() && local(node.ip())))
}

/// Characters of the variants sent as they are; the rest (the separators, any byte of a cohort
/// or header value) is percent-encoded, so any key crosses as a valid header value.
const VARIANT_ENCODE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b':')
    .remove(b'=');

/// The variants as the control header's value.
pub fn encode_variants(variants: &str) -> Option<HeaderValue> {
    let encoded = percent_encoding::utf8_percent_encode(variants, VARIANT_ENCODE).to_string();
    HeaderValue::from_str(&encoded).ok()
}

/// The variants an edge sent; `None` when the value is not what [`encode_variants`] makes.
pub fn decode_variants(value: &HeaderValue) -> Option<String> {
    let text = value.to_str().ok()?;
    percent_encoding::percent_decode_str(text)
        .decode_utf8()
        .ok()
        .map(|c| c.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(i: usize) -> SocketAddr {
        ([127, 0, 0, 1], 9000 + i as u16).into()
    }

    fn shield_with(n: usize, own: &[SocketAddr], fallback: Fallback) -> Shield {
        let peers = (0..n)
            .map(|i| Arc::new(Origin::test_peer(&format!("s{i}"), addr(i))))
            .collect();
        Shield::new(peers, own, Duration::from_secs(60), fallback)
    }

    fn shield(n: usize, fallback: Fallback) -> Shield {
        shield_with(n, &[], fallback)
    }

    fn node(p: Pick<'_>) -> Option<usize> {
        match p {
            Pick::Node(i, _) => Some(i),
            Pick::Itself | Pick::Nowhere => None,
        }
    }

    #[test]
    fn every_key_has_one_home_and_the_others_follow_in_ring_order() {
        let s = shield(3, Fallback::Origin);
        let mut homes = [0usize; 3];
        for k in 0..300u32 {
            let key = k.to_be_bytes();
            let order: Vec<usize> = s.order(&key).collect();
            let mut sorted = order.clone();
            sorted.sort();
            assert_eq!(sorted, vec![0, 1, 2], "each node once for key {k}");
            assert_eq!(node(s.next(&key, Tried::default())), Some(order[0]));
            homes[order[0]] += 1;
        }
        // Consistent hashing spreads keys over every node (not evenly, but none is left out).
        assert!(homes.iter().all(|h| *h > 30), "{homes:?}");
    }

    #[test]
    fn a_node_marked_down_is_passed_over_then_the_fallback_decides() {
        let s = shield(2, Fallback::Origin);
        let key = b"example.test/fw.bin";
        let order: Vec<usize> = s.order(key).collect();
        s.mark_down(order[0]);
        assert_eq!(node(s.next(key, Tried::default())), Some(order[1]));
        s.mark_down(order[1]);
        assert!(
            matches!(s.next(key, Tried::default()), Pick::Nowhere),
            "both down: the fallback"
        );
        let strict = shield(2, Fallback::None);
        strict.mark_down(order[0]);
        strict.mark_down(order[1]);
        assert_eq!(
            node(strict.next(key, Tried::default())),
            Some(order[0]),
            "no fallback: the home is tried anyway"
        );
        let mut tried = Tried::default();
        tried.add(order[0]);
        tried.add(order[1]);
        assert!(matches!(strict.next(key, tried), Pick::Nowhere), "every node tried");
    }

    #[test]
    fn a_node_that_is_this_process_keeps_its_place_on_the_ring_and_fetches_itself() {
        let others = shield(3, Fallback::Origin);
        let me = shield_with(3, &[addr(1)], Fallback::Origin);
        let wildcard = shield_with(3, &[SocketAddr::from(([0, 0, 0, 0], 9001))], Fallback::Origin);
        for k in 0..100u32 {
            let key = k.to_be_bytes();
            let home = node(others.next(&key, Tried::default()));
            for s in [&me, &wildcard] {
                match s.next(&key, Tried::default()) {
                    Pick::Itself => assert_eq!(home, Some(1), "only node 1's objects are fetched here"),
                    p => assert_eq!(node(p), home, "the same home as on every other node"),
                }
            }
        }
        assert!(
            !is_listener_of(SocketAddr::from(([0, 0, 0, 0], 9001)), addr(2)),
            "another port"
        );
        assert!(
            !is_listener_of(SocketAddr::from(([192, 0, 2, 1], 9001)), addr(1)),
            "another address"
        );
    }

    #[test]
    fn variants_cross_as_a_header_value_and_come_back_the_same() {
        for v in ["", "\ncohort=4:beta", "\nheader:x-model=9:ü\r\n\"x\"", "\norigin=2:eu"] {
            let h = encode_variants(v).expect("a valid header value");
            assert_eq!(decode_variants(&h).as_deref(), Some(v));
        }
        assert!(
            decode_variants(&HeaderValue::from_static("%ff%fe")).is_none(),
            "not UTF-8"
        );
    }
}
