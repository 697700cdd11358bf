//! The front door: how many connections may be waiting to prove their key.
//!
//! Anyone who can reach the listen address can open a TCP connection; only
//! a peer with an allowed certificate and the stream's key gets further
//! than the key confirmation. Until then a connection holds a [`Ticket`]:
//! there are at most `max_unauthenticated` of them, and at most
//! `max_unauthenticated_per_address` from one address, so a flood of
//! silent or slow connections is refused at the door (closed at once)
//! instead of growing threads and memory, and one noisy address cannot
//! take every place. A ticket is given back when its connection proves its
//! key or ends, whichever comes first; the handshake deadline bounds how
//! long it can be held.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Why a connection was turned away at the door.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(super) enum Full {
    /// Every place is taken.
    #[error("{0} connections are waiting to authenticate already (network.max_unauthenticated)")]
    Total(usize),
    /// The address has every place it may have.
    #[error("{0} connections from this address are waiting to authenticate already (network.max_unauthenticated_per_address)")]
    Address(usize),
}

#[derive(Debug, Default)]
struct Waiting {
    total: usize,
    by_addr: HashMap<IpAddr, usize>,
}

/// The count of unauthenticated connections.
#[derive(Debug)]
pub(super) struct Door {
    waiting: Mutex<Waiting>,
    max_total: usize,
    max_per_addr: usize,
}

impl Door {
    /// A door with these limits.
    pub(super) fn new(max_total: usize, max_per_addr: usize) -> Arc<Self> {
        Arc::new(Self {
            waiting: Mutex::new(Waiting::default()),
            max_total,
            max_per_addr,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A place for a connection from `addr`, if there is one.
    pub(super) fn enter(self: &Arc<Self>, addr: IpAddr) -> Result<Ticket, Full> {
        let addr = peer_key(addr);
        let mut w = self.lock();
        if w.total >= self.max_total {
            return Err(Full::Total(w.total));
        }
        let n = w.by_addr.get(&addr).copied().unwrap_or(0);
        if n >= self.max_per_addr {
            return Err(Full::Address(n));
        }
        w.total += 1;
        w.by_addr.insert(addr, n + 1);
        Ok(Ticket {
            door: Some(self.clone()),
            addr,
        })
    }

    /// Connections waiting now.
    #[cfg(test)]
    pub(super) fn waiting(&self) -> usize {
        self.lock().total
    }

    fn leave(&self, addr: IpAddr) {
        let mut w = self.lock();
        w.total = w.total.saturating_sub(1);
        if let Some(n) = w.by_addr.get_mut(&addr) {
            *n -= 1;
            if *n == 0 {
                w.by_addr.remove(&addr);
            }
        }
    }
}

/// What counts as one address: an IPv4 address (also written IPv4-mapped),
/// or an IPv6 /64 (one host may hold a whole /64).
fn peer_key(addr: IpAddr) -> IpAddr {
    match addr.to_canonical() {
        IpAddr::V6(v6) => {
            let mut o = v6.octets();
            o[8..].fill(0);
            IpAddr::V6(o.into())
        }
        v4 => v4,
    }
}

/// A connection's place at the door; given back on [`Ticket::authenticated`]
/// or drop.
#[derive(Debug)]
pub(super) struct Ticket {
    door: Option<Arc<Door>>,
    addr: IpAddr,
}

impl Ticket {
    /// The connection proved its key: its place is free for the next one.
    pub(super) fn authenticated(&mut self) {
        if let Some(d) = self.door.take() {
            d.leave(self.addr);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.authenticated();
    }
}

/// Connections turned away, logged at most every few seconds (a flood
/// must not flood the log too).
#[derive(Debug, Default)]
pub(super) struct TurnedAway {
    count: u64,
    last: Option<(std::net::SocketAddr, Full)>,
    logged: Option<std::time::Instant>,
}

impl TurnedAway {
    const EVERY: std::time::Duration = std::time::Duration::from_secs(10);

    /// One more.
    pub(super) fn note(&mut self, peer: &std::net::SocketAddr, why: Full) {
        self.count += 1;
        self.last = Some((*peer, why));
        if self.logged.is_none() {
            self.report();
        }
    }

    /// Logs what was turned away since the last report, if it is time.
    pub(super) fn report(&mut self) {
        let due = self.logged.is_none_or(|t| t.elapsed() >= Self::EVERY);
        if self.count == 0 || !due {
            return;
        }
        if let Some((peer, why)) = &self.last {
            tracing::warn!(connections = self.count, last_peer = %peer, "connections closed unauthenticated: {why}");
        }
        self.count = 0;
        self.logged = Some(std::time::Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv6_slash_64_and_an_ipv4_mapped_address_count_as_one_address() {
        let door = Door::new(10, 2);
        let _a = door.enter("2001:db8::1".parse().expect("ip")).expect("a");
        let _b = door
            .enter("2001:db8::ffff:2".parse().expect("ip"))
            .expect("b");
        assert_eq!(
            door.enter("2001:db8::1:0:0:3".parse().expect("ip"))
                .expect_err("same /64"),
            Full::Address(2)
        );
        door.enter("2001:db8:0:1::1".parse().expect("ip"))
            .expect("another /64");
        let _c = door.enter("192.0.2.7".parse().expect("ip")).expect("v4");
        let _d = door
            .enter("::ffff:192.0.2.7".parse().expect("ip"))
            .expect("mapped");
        assert_eq!(
            door.enter("192.0.2.7".parse().expect("ip"))
                .expect_err("the same host"),
            Full::Address(2)
        );
    }

    #[test]
    fn places_are_bounded_in_total_and_per_address_and_given_back() {
        let door = Door::new(3, 2);
        let a: IpAddr = "192.0.2.1".parse().expect("ip");
        let b: IpAddr = "192.0.2.2".parse().expect("ip");
        let a1 = door.enter(a).expect("a1");
        let _a2 = door.enter(a).expect("a2");
        assert_eq!(door.enter(a).expect_err("a3"), Full::Address(2));
        let mut b1 = door.enter(b).expect("b1");
        assert_eq!(door.enter(b).expect_err("b2"), Full::Total(3));
        assert_eq!(door.waiting(), 3);
        // Authenticating gives the place back, once.
        b1.authenticated();
        b1.authenticated();
        assert_eq!(door.waiting(), 2);
        let _b2 = door.enter(b).expect("b2 after b1 authenticated");
        drop(a1);
        drop(b1);
        assert_eq!(door.waiting(), 2);
        let _a3 = door.enter(a).expect("a3 after a1 ended");
    }
}
