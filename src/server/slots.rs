//! The connection slots of a listener: at most `cap` connections, at most
//! `per_address` of them from one address (trusted proxies exempt). A newcomer is
//! refused only when no open connection can make room: at the cap, the connections
//! that cost others most and serve least are closed instead, in this order:
//!
//! 1. kept alive between requests, the longest idle first (a client that wants it
//!    again reconnects, as HTTP clients do when a kept-alive connection closes);
//! 2. not having sent a whole request, the longest waiting first: silent sockets and
//!    request heads trickling in.
//!
//! A connection handling a request is never chosen. At the per-address limit, only
//! that address's own connections are candidates, so one address flooding the server
//! churns its own connections and nobody else's. A new connection is always the
//! youngest candidate, so a real client's request arrives before its connection could
//! be chosen, whatever the flood.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::time::Instant;

use super::conn::{Activity, ConnState};

/// The limits of one listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections open at once.
    pub cap: usize,
    /// Connections from one address (not a trusted proxy) at once.
    pub per_address: usize,
    /// Connections asked to close and not closed yet beyond which newcomers are
    /// refused: each still holds its descriptors until its task drops it.
    pub max_closing: usize,
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Every slot is taken by a connection that is handling a request.
    Cap,
    /// Every slot of its address is taken by a connection handling a request.
    Address,
}

impl Refusal {
    /// The label of the refusal in the metrics.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Cap => "cap",
            Self::Address => "address",
        }
    }
}

/// What kind of connection was closed to make room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Evicted {
    /// Kept alive between requests.
    Idle,
    /// Had not sent a whole request.
    Incomplete,
}

impl Evicted {
    /// The label in the metrics.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Incomplete => "incomplete",
        }
    }
}

/// The slots of one listener.
pub struct Slots {
    limits: Limits,
    inner: Mutex<Inner>,
    emptied: tokio::sync::Notify,
    /// Woken when a connection asked to close has closed.
    closed: tokio::sync::Notify,
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    conns: HashMap<u64, Held>,
    /// Open connections per limited address, not counting those asked to close.
    per_address: HashMap<IpAddr, usize>,
    /// Connections asked to close that are still open.
    closing: usize,
}

struct Held {
    address: IpAddr,
    /// Whether the per-address limit applies (not a trusted proxy).
    limited: bool,
    state: Arc<ConnState>,
    evicted: bool,
}

/// A connection's slot, given back when dropped.
pub struct Slot {
    slots: Arc<Slots>,
    id: u64,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut inner = self.slots.inner.lock().expect("never poisoned");
        if let Some(held) = inner.conns.remove(&self.id) {
            if held.evicted {
                inner.closing -= 1;
                self.slots.closed.notify_waiters();
            } else if held.limited {
                inner.release_address(held.address);
            }
        }
        if inner.conns.is_empty() {
            self.slots.emptied.notify_waiters();
        }
    }
}

impl Inner {
    fn release_address(&mut self, address: IpAddr) {
        if let Some(n) = self.per_address.get_mut(&address) {
            *n -= 1;
            if *n == 0 {
                self.per_address.remove(&address);
            }
        }
    }

    /// The connection to close to make room (of `address` only, if given): the one
    /// kept alive longest, else the one that has waited longest for a whole request.
    fn victim(&self, address: Option<IpAddr>) -> Option<(u64, Evicted)> {
        let mut best: Option<(u8, Instant, u64)> = None;
        for (id, held) in &self.conns {
            if held.evicted || address.is_some_and(|a| a != held.address) {
                continue;
            }
            // The oldest connection first among equals, so that the choice is
            // deterministic.
            let rank = match held.state.activity() {
                Activity::Busy => continue,
                Activity::KeptAlive(since) => (0, since, *id),
                Activity::Incomplete(since) => (1, since, *id),
            };
            if best.is_none_or(|b| rank < b) {
                best = Some(rank);
            }
        }
        best.map(|(class, _, id)| {
            let kind = if class == 0 {
                Evicted::Idle
            } else {
                Evicted::Incomplete
            };
            (id, kind)
        })
    }

    /// Asks connection `id` to close, and stops counting it.
    fn evict(&mut self, id: u64) {
        let Some(held) = self.conns.get_mut(&id) else {
            return;
        };
        held.evicted = true;
        held.state.evict();
        let (address, limited) = (held.address, held.limited);
        self.closing += 1;
        if limited {
            self.release_address(address);
        }
    }
}

impl Slots {
    /// The slots of a listener with `limits`.
    pub fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            inner: Mutex::new(Inner::default()),
            emptied: tokio::sync::Notify::new(),
            closed: tokio::sync::Notify::new(),
        })
    }

    /// Connections open now, those asked to close included.
    pub fn open(&self) -> usize {
        self.inner.lock().expect("never poisoned").conns.len()
    }

    /// Admits a connection from `address` whose state is `state`, closing another to
    /// make room if it must (and saying which kind); `limited` is false for a trusted
    /// proxy, which the per-address limit does not apply to.
    pub fn admit(
        self: &Arc<Self>,
        address: IpAddr,
        limited: bool,
        state: Arc<ConnState>,
    ) -> Result<(Slot, Option<Evicted>), Refusal> {
        let mut inner = self.inner.lock().expect("never poisoned");
        let mut evicted = None;
        let from_address = inner.per_address.get(&address).copied().unwrap_or(0);
        if limited && from_address >= self.limits.per_address {
            let (id, kind) = self.room(&inner, Some(address), Refusal::Address)?;
            inner.evict(id);
            evicted = Some(kind);
        }
        if inner.conns.len() - inner.closing >= self.limits.cap {
            let (id, kind) = self.room(&inner, None, Refusal::Cap)?;
            inner.evict(id);
            evicted = Some(kind);
        }
        let id = inner.next_id;
        inner.next_id += 1;
        inner.conns.insert(
            id,
            Held {
                address,
                limited,
                state,
                evicted: false,
            },
        );
        if limited {
            *inner.per_address.entry(address).or_default() += 1;
        }
        Ok((
            Slot {
                slots: self.clone(),
                id,
            },
            evicted,
        ))
    }

    /// A connection to close for room, unless too many are closing already.
    fn room(
        &self,
        inner: &Inner,
        address: Option<IpAddr>,
        refusal: Refusal,
    ) -> Result<(u64, Evicted), Refusal> {
        if inner.closing >= self.limits.max_closing {
            return Err(refusal);
        }
        inner.victim(address).ok_or(refusal)
    }

    /// Waits, at most `limit`, until fewer connections than the limit are closing:
    /// under a flood, the accept loop lets the connections it asked to close let go of
    /// their descriptors rather than refuse newcomers meanwhile.
    pub async fn closing_settled(&self, limit: std::time::Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let closed = self.closed.notified();
            if self.inner.lock().expect("never poisoned").closing < self.limits.max_closing {
                return;
            }
            if tokio::time::timeout_at(deadline, closed).await.is_err() {
                return;
            }
        }
    }

    /// Waits until every connection has closed.
    pub async fn drained(&self) {
        loop {
            let emptied = self.emptied.notified();
            if self.open() == 0 {
                return;
            }
            emptied.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    fn slots(cap: usize, per_address: usize) -> Arc<Slots> {
        Slots::new(Limits {
            cap,
            per_address,
            max_closing: 2,
        })
    }

    /// A request served on `state`: the connection is kept alive after it.
    fn served(state: &Arc<ConnState>) {
        drop(state.begin());
    }

    #[tokio::test(start_paused = true)]
    async fn at_the_cap_the_longest_kept_alive_goes_first_then_the_longest_waiting() {
        let s = slots(3, 10);
        let (a, b, c) = (ConnState::new(), ConnState::new(), ConnState::new());
        let _held: Vec<_> = [&a, &b, &c]
            .iter()
            .map(|st| s.admit(ip(1), true, (*st).clone()).unwrap())
            .collect();
        tokio::time::advance(Duration::from_secs(1)).await;
        served(&b);
        tokio::time::advance(Duration::from_secs(1)).await;
        served(&c);
        // b has been kept alive longer than c; a never sent a request.
        let (_d, evicted) = s.admit(ip(2), true, ConnState::new()).unwrap();
        assert_eq!(evicted, Some(Evicted::Idle));
        assert!(b.is_evicted());
        let (_e, evicted) = s.admit(ip(2), true, ConnState::new()).unwrap();
        assert_eq!(evicted, Some(Evicted::Idle));
        assert!(c.is_evicted());
        // Too many closing: refused, although a could go.
        assert_eq!(
            s.admit(ip(2), true, ConnState::new()).err(),
            Some(Refusal::Cap)
        );
        assert!(!a.is_evicted());
    }

    #[tokio::test(start_paused = true)]
    async fn busy_connections_are_never_closed_and_the_oldest_waiting_goes() {
        let s = slots(2, 10);
        let (a, b) = (ConnState::new(), ConnState::new());
        let _a = s.admit(ip(1), true, a.clone()).unwrap();
        tokio::time::advance(Duration::from_secs(1)).await;
        let _b = s.admit(ip(1), true, b.clone()).unwrap();
        let _busy = a.begin();
        let busy_b = b.begin();
        assert_eq!(
            s.admit(ip(2), true, ConnState::new()).err(),
            Some(Refusal::Cap)
        );
        drop(busy_b);
        // b is kept alive now: it goes.
        let (_c, evicted) = s.admit(ip(2), true, ConnState::new()).unwrap();
        assert_eq!(evicted, Some(Evicted::Idle));
        assert!(b.is_evicted());
    }

    #[tokio::test(start_paused = true)]
    async fn an_address_at_its_limit_makes_room_among_its_own_connections_only() {
        let s = slots(10, 2);
        let other = ConnState::new();
        let _o = s.admit(ip(9), true, other.clone()).unwrap();
        tokio::time::advance(Duration::from_secs(5)).await;
        let (x, y) = (ConnState::new(), ConnState::new());
        let _x = s.admit(ip(1), true, x.clone()).unwrap();
        tokio::time::advance(Duration::from_secs(1)).await;
        let _y = s.admit(ip(1), true, y.clone()).unwrap();
        let (_z, evicted) = s.admit(ip(1), true, ConnState::new()).unwrap();
        assert_eq!(evicted, Some(Evicted::Incomplete));
        assert!(x.is_evicted());
        assert!(
            !other.is_evicted(),
            "another address's older connection stays"
        );
        // Busy ones of the address: refused for the address.
        let _busy = y.begin();
        let s2 = slots(10, 1);
        let w = ConnState::new();
        let _w = s2.admit(ip(1), true, w.clone()).unwrap();
        let _wb = w.begin();
        assert_eq!(
            s2.admit(ip(1), true, ConnState::new()).err(),
            Some(Refusal::Address)
        );
        // A trusted proxy is not held to it.
        let _p = s2.admit(ip(1), false, ConnState::new()).unwrap();
    }

    #[tokio::test]
    async fn slots_come_back_when_connections_close() {
        let s = slots(1, 1);
        let first = s.admit(ip(1), true, ConnState::new()).unwrap();
        let (second, evicted) = s.admit(ip(1), true, ConnState::new()).unwrap();
        assert_eq!(evicted, Some(Evicted::Incomplete));
        assert_eq!(s.open(), 2);
        drop(first);
        drop(second);
        assert_eq!(s.open(), 0);
        s.drained().await;
        let _third = s.admit(ip(1), true, ConnState::new()).unwrap();
    }
}
