//! Who a request comes from: the connection's peer, or, when the peer is a trusted
//! reverse proxy, the client it names in `Forwarded` or `X-Forwarded-For`. A header
//! from anyone else is ignored: it is the client's own say.
//!
//! Behind a proxy every request arrives on the proxy's connections, so the limit per
//! address cannot be one of connections; for requests forwarded by a trusted proxy it
//! is a limit of requests in flight per client address instead (`Gate`).

use crate::config::ForwardedHeader;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use axum::http::HeaderMap;
use ipnet::IpNet;

/// The reverse proxies whose forwarding header is believed, and which header that is.
/// Only that one: a proxy that appends to one passes the other through as the client
/// sent it, and a client must not choose its own address.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies {
    nets: Vec<IpNet>,
    header: ForwardedHeader,
}

impl TrustedProxies {
    /// Proxies at the addresses or in the networks of `nets`, naming clients in
    /// `header`.
    pub fn new(nets: Vec<IpNet>, header: ForwardedHeader) -> Self {
        Self { nets, header }
    }

    /// Whether `addr` is a trusted proxy.
    pub fn contains(&self, addr: IpAddr) -> bool {
        let addr = canonical(addr);
        self.nets.iter().any(|n| n.contains(&addr))
    }

    /// The client of a request that arrived from `peer` with `headers`: for a trusted
    /// peer, the nearest address in the forwarding chain that is not a trusted proxy;
    /// else the peer. A node that cannot be read (`unknown`, an obfuscated name)
    /// ends the chain: the client is then the trusted proxy that named it.
    pub fn client(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        if !self.contains(peer) {
            return peer;
        }
        let chain = match self.header {
            ForwardedHeader::XForwardedFor => x_forwarded_for(headers),
            ForwardedHeader::Forwarded => forwarded_for(headers),
        };
        // From the nearest hop back: each trusted proxy speaks for the one before it;
        // the first that is not trusted is the client.
        let mut client = peer;
        for node in chain.iter().rev() {
            let Some(addr) = node else { break };
            client = *addr;
            if !self.contains(*addr) {
                break;
            }
        }
        client
    }
}

/// An IPv4 address mapped into IPv6 is the IPv4 address.
fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// An address as forwarding headers write it: `192.0.2.1`, `192.0.2.1:4711`,
/// `[2001:db8::1]`, `[2001:db8::1]:4711`, `2001:db8::1`, optionally quoted.
fn parse_node(text: &str) -> Option<IpAddr> {
    let text = text.trim().trim_matches('"');
    if let Some(rest) = text.strip_prefix('[') {
        return rest.split(']').next()?.parse().ok().map(canonical);
    }
    if let Ok(addr) = text.parse::<IpAddr>() {
        return Some(canonical(addr));
    }
    let (host, _port) = text.rsplit_once(':')?;
    host.parse().ok().map(canonical)
}

/// The `for=` nodes of every `Forwarded` header, nearest last (RFC 7239); `None` for
/// one that is not an address.
fn forwarded_for(headers: &HeaderMap) -> Vec<Option<IpAddr>> {
    let mut chain = Vec::new();
    for value in headers.get_all("forwarded") {
        let Ok(value) = value.to_str() else {
            chain.push(None);
            continue;
        };
        for element in value.split(',') {
            for pair in element.split(';') {
                if let Some((key, node)) = pair.split_once('=') {
                    if key.trim().eq_ignore_ascii_case("for") {
                        chain.push(parse_node(node));
                    }
                }
            }
        }
    }
    chain
}

/// The nodes of every `X-Forwarded-For` header, nearest last; `None` for one that is
/// not an address.
fn x_forwarded_for(headers: &HeaderMap) -> Vec<Option<IpAddr>> {
    let mut chain = Vec::new();
    for value in headers.get_all("x-forwarded-for") {
        match value.to_str() {
            Ok(value) => chain.extend(value.split(',').map(parse_node)),
            Err(_) => chain.push(None),
        }
    }
    chain
}

/// Requests in flight per client address, for requests a trusted proxy forwards.
pub struct Gate {
    limit: usize,
    in_flight: Mutex<HashMap<IpAddr, usize>>,
}

/// A request counted against its address until dropped.
pub struct Pass {
    gate: Arc<Gate>,
    addr: IpAddr,
}

impl Gate {
    /// At most `limit` requests in flight per address.
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit,
            in_flight: Mutex::new(HashMap::new()),
        })
    }

    /// Counts a request from `addr`, unless it has `limit` in flight already.
    pub fn enter(self: &Arc<Self>, addr: IpAddr) -> Option<Pass> {
        let mut in_flight = self.in_flight.lock().expect("never poisoned");
        let n = in_flight.entry(addr).or_default();
        if *n >= self.limit {
            return None;
        }
        *n += 1;
        Some(Pass {
            gate: self.clone(),
            addr,
        })
    }
}

impl Drop for Pass {
    fn drop(&mut self) {
        let mut in_flight = self.gate.in_flight.lock().expect("never poisoned");
        if let Some(n) = in_flight.get_mut(&self.addr) {
            *n -= 1;
            if *n == 0 {
                in_flight.remove(&self.addr);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_net;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn trusted(header: ForwardedHeader) -> TrustedProxies {
        TrustedProxies::new(
            vec![
                parse_net("10.0.0.0/8").unwrap(),
                parse_net("2001:db8::/32").unwrap(),
                parse_net("192.168.1.1").unwrap(),
            ],
            header,
        )
    }

    #[test]
    fn headers_count_only_from_trusted_proxies() {
        let trusted = trusted(ForwardedHeader::XForwardedFor);
        let h = headers(&[("x-forwarded-for", "203.0.113.9")]);
        // From anyone else, the header is the client's own claim.
        assert_eq!(trusted.client(ip("198.51.100.1"), &h), ip("198.51.100.1"));
        assert_eq!(trusted.client(ip("10.1.2.3"), &h), ip("203.0.113.9"));
        // A bare address is that address.
        assert_eq!(trusted.client(ip("192.168.1.1"), &h), ip("203.0.113.9"));
        assert_eq!(trusted.client(ip("192.168.1.2"), &h), ip("192.168.1.2"));
        assert!(parse_net("proxy.example").is_err());
        // Without a header, the proxy itself.
        assert_eq!(
            trusted.client(ip("10.1.2.3"), &HeaderMap::new()),
            ip("10.1.2.3")
        );
    }

    #[test]
    fn the_nearest_untrusted_hop_is_the_client() {
        let xff = trusted(ForwardedHeader::XForwardedFor);
        // A client may put anything first; the proxies append what they saw.
        let h = headers(&[("x-forwarded-for", "1.2.3.4, 203.0.113.9, 10.0.0.7")]);
        assert_eq!(xff.client(ip("10.0.0.1"), &h), ip("203.0.113.9"));
        let forwarded = trusted(ForwardedHeader::Forwarded);
        let h = headers(&[(
            "forwarded",
            "for=1.2.3.4;proto=https, for=\"[2001:db8:cafe::17]:4711\", for=192.0.2.60:80",
        )]);
        assert_eq!(forwarded.client(ip("10.0.0.1"), &h), ip("192.0.2.60"));
        // Only the configured header counts: the other is the client's to forge.
        let h = headers(&[
            ("forwarded", "for=198.51.100.7"),
            ("x-forwarded-for", "203.0.113.9"),
        ]);
        assert_eq!(xff.client(ip("10.0.0.1"), &h), ip("203.0.113.9"));
        assert_eq!(forwarded.client(ip("10.0.0.1"), &h), ip("198.51.100.7"));
        // An unreadable node ends the chain: the proxy that named it is the client.
        let h = headers(&[("forwarded", "for=198.51.100.7, for=unknown, for=10.0.0.9")]);
        assert_eq!(forwarded.client(ip("10.0.0.1"), &h), ip("10.0.0.9"));
        let h = headers(&[("x-forwarded-for", "198.51.100.7, , 10.0.0.9")]);
        assert_eq!(xff.client(ip("10.0.0.1"), &h), ip("10.0.0.9"));
        // IPv4 mapped into IPv6 is IPv4.
        assert!(xff.contains(ip("::ffff:10.9.9.9")));
    }

    #[test]
    fn the_gate_counts_requests_in_flight_per_address() {
        let gate = Gate::new(2);
        let a = gate.enter(ip("192.0.2.1")).unwrap();
        let _b = gate.enter(ip("192.0.2.1")).unwrap();
        assert!(gate.enter(ip("192.0.2.1")).is_none());
        let _other = gate.enter(ip("192.0.2.2")).unwrap();
        drop(a);
        assert!(gate.enter(ip("192.0.2.1")).is_some());
    }
}
