//! CIDR sets (allow lists, block lists, trusted proxies), client-IP resolution and client
//! socket options.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener};
use std::str::FromStr;
use std::time::Duration;

use ipnet::{IpNet, Ipv4Net};
use pingora::http::RequestHeader;
use pingora::listeners::TcpSocketOptions;
use pingora::protocols::http::ServerSession;
use pingora::protocols::TcpKeepalive;

/// A list of networks; a bare address means a single host (`/32` or `/128`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CidrSet {
    nets: Vec<IpNet>,
}

/// Why a CIDR entry was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("'{entry}' is not an IP address or CIDR (expected e.g. 10.0.0.0/8 or 2001:db8::/32)")]
pub struct CidrParseError {
    pub entry: String,
}

impl CidrSet {
    /// An IPv4-mapped IPv6 entry (`::ffff:10.0.0.1`, `::ffff:10.0.0.0/104`) is kept as the
    /// IPv4 network it names: addresses are compared in their IPv4 form, so as written it
    /// would match nothing.
    pub fn new(nets: Vec<IpNet>) -> Self {
        Self {
            nets: nets.into_iter().map(canonical_net).collect(),
        }
    }

    /// Parses one entry: `10.0.0.0/8`, `192.168.1.7`, `::1`, `2001:db8::/32`.
    pub fn parse_entry(entry: &str) -> Result<IpNet, CidrParseError> {
        let trimmed = entry.trim();
        IpNet::from_str(trimmed)
            .or_else(|_| IpAddr::from_str(trimmed).map(IpNet::from))
            .map(|net| net.trunc())
            .map_err(|_| CidrParseError {
                entry: entry.to_string(),
            })
    }

    /// Parses a comma-separated list, as the older proxy's `IP_BLACKLIST` / `ADMIN_WHITELIST`.
    pub fn parse_csv(list: &str) -> Result<Self, CidrParseError> {
        list.split(',')
            .filter(|e| !e.trim().is_empty())
            .map(Self::parse_entry)
            .collect::<Result<Vec<_>, _>>()
            .map(Self::new)
    }

    pub fn is_empty(&self) -> bool {
        self.nets.is_empty()
    }

    /// Whether `ip` falls in any network. IPv4-mapped IPv6 addresses match IPv4 networks.
    #[inline]
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.nets.iter().any(|net| net.contains(&ip))
    }
}

/// `net` as an IPv4 network when it lies within `::ffff:0:0/96`.
fn canonical_net(net: IpNet) -> IpNet {
    let IpNet::V6(v6) = net else {
        return net;
    };
    match (
        v6.prefix_len().checked_sub(96),
        v6.network().to_ipv4_mapped(),
    ) {
        (Some(prefix), Some(v4)) => Ipv4Net::new(v4, prefix).map_or(net, IpNet::V4),
        _ => net,
    }
}

impl fmt::Display for CidrSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, net) in self.nets.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{net}")?;
        }
        Ok(())
    }
}

/// The client's address: the TCP peer, unless the peer is a trusted proxy, in which case the
/// `X-Forwarded-For` chain is walked from the right and the first untrusted hop wins. A client
/// can prepend anything to the header, so only hops appended by trusted proxies are believed.
pub fn resolve_client_ip<'a>(
    peer: IpAddr,
    forwarded_for: impl DoubleEndedIterator<Item = &'a [u8]>,
    trusted: &CidrSet,
) -> IpAddr {
    let peer = peer.to_canonical();
    if trusted.is_empty() || !trusted.contains(peer) {
        return peer;
    }
    // Several X-Forwarded-For headers form one list in order: walk headers and hops backwards.
    let mut client = peer;
    for hop in forwarded_for.rev().flat_map(|h| h.rsplit(|b| *b == b',')) {
        let Some(ip) = parse_hop(hop) else {
            // Garbage in a hop we were told to trust: stop at the last good address.
            break;
        };
        client = ip;
        if !trusted.contains(ip) {
            break;
        }
    }
    client
}

/// The TCP peer of a session (`0.0.0.0` for a Unix socket, which has no IP).
#[inline]
pub fn peer_ip(session: &ServerSession) -> IpAddr {
    session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip())
        .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED))
}

/// The client of `req` arriving from `peer`: see [`resolve_client_ip`].
#[inline]
pub fn request_client_ip(peer: IpAddr, req: &RequestHeader, trusted: &CidrSet) -> IpAddr {
    let forwarded = req
        .headers
        .get_all("x-forwarded-for")
        .into_iter()
        .map(|v| v.as_bytes());
    resolve_client_ip(peer, forwarded, trusted)
}

/// Parses one `X-Forwarded-For` hop; tolerates spaces, a `:port` suffix and an IPv6 address
/// in brackets with or without a port (`[v6]`, `[v6]:port`; nginx's realip reads both).
fn parse_hop(hop: &[u8]) -> Option<IpAddr> {
    let text = std::str::from_utf8(hop).ok()?.trim();
    if let Ok(ip) = IpAddr::from_str(text) {
        return Some(ip.to_canonical());
    }
    let bracketed = text.strip_prefix('[').and_then(|t| t.strip_suffix(']'));
    if let Some(Ok(v6)) = bracketed.map(Ipv6Addr::from_str) {
        return Some(IpAddr::V6(v6).to_canonical());
    }
    if let Ok(sock) = std::net::SocketAddr::from_str(text) {
        return Some(sock.ip().to_canonical());
    }
    None
}

/// The client as per-IP limits count it: the IPv4 address, or the /64 of an IPv6 address (a
/// subscriber is usually given a whole /64 and could otherwise use a new address for every
/// request). An IPv4-mapped IPv6 address is its IPv4 address.
pub fn subscriber(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
        },
    }
}

/// Whether two listen addresses would compete for the same socket, so that Pingora's bind of
/// the second fails (and its thread panics) while the process keeps running. Same port and
/// either the same address, or a wildcard covering the other: `0.0.0.0` covers every IPv4
/// address; `[::]` covers every IPv6 address and, since Linux binds it dual-stack unless
/// `net.ipv6.bindv6only` is set, every IPv4 address too. Port 0 (any free port) never clashes.
pub fn listeners_overlap(a: SocketAddr, b: SocketAddr) -> bool {
    if a.port() != b.port() || a.port() == 0 {
        return false;
    }
    let (x, y) = (a.ip().to_canonical(), b.ip().to_canonical());
    let covers =
        |wild: IpAddr, other: IpAddr| wild.is_unspecified() && (wild.is_ipv6() || other.is_ipv4());
    x == y || covers(x, y) || covers(y, x)
}

/// A listen address that cannot be bound right now.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {source} (is another program using it?)")]
pub struct BindError {
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

/// Binds each address once and lets it go again. Pingora only logs "is in use, will try
/// again" for a busy port and keeps retrying, while /ready reports ready; checking before
/// Pingora starts turns that into a start-up failure naming the address. Not for a graceful
/// upgrade: there the old process legitimately holds the ports and hands them over.
pub fn check_bindable(addrs: &[SocketAddr]) -> Result<(), BindError> {
    for &addr in addrs {
        TcpListener::bind(addr).map_err(|source| BindError { addr, source })?;
    }
    Ok(())
}

/// Socket options of the client-facing listeners: with TCP keep-alive on, a peer that vanished
/// without closing (a NAT timeout, a crashed host) is found within about two minutes of
/// silence (60 s, then 6 probes 10 s apart) instead of holding its connection for good.
pub fn client_socket_options(clients: &crate::config::ClientsConfig) -> TcpSocketOptions {
    let mut options = TcpSocketOptions::default();
    if clients.tcp_keepalive {
        options.tcp_keepalive = Some(TcpKeepalive {
            idle: Duration::from_secs(60),
            interval: Duration::from_secs(10),
            count: 6,
            #[cfg(target_os = "linux")]
            user_timeout: Duration::ZERO,
        });
    }
    options
}

#[cfg(test)]
mod client_ip_model;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_sockets_get_tcp_keepalive_unless_turned_off() {
        let mut clients = crate::config::ClientsConfig {
            keepalive_timeout_seconds: 60,
            tcp_keepalive: true,
            header_timeout: None,
            body_timeout: None,
            send_timeout: None,
            max_connections_per_ip: 0,
            max_body_bytes: None,
        };
        let keepalive = client_socket_options(&clients).tcp_keepalive.unwrap();
        assert_eq!(
            (keepalive.idle, keepalive.count),
            (Duration::from_secs(60), 6)
        );
        clients.tcp_keepalive = false;
        assert!(client_socket_options(&clients).tcp_keepalive.is_none());
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn set(s: &str) -> CidrSet {
        CidrSet::parse_csv(s).unwrap()
    }

    fn sock(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn listeners_overlap_on_same_address_or_wildcard() {
        let overlapping = [
            ("127.0.0.1:80", "127.0.0.1:80"),
            ("0.0.0.0:80", "127.0.0.1:80"),
            ("10.0.0.1:80", "0.0.0.0:80"),
            ("[::]:80", "[::1]:80"),
            // [::] may be dual-stack: it takes the IPv4 port too.
            ("[::]:80", "0.0.0.0:80"),
            ("[::]:80", "127.0.0.1:80"),
            ("[::ffff:127.0.0.1]:80", "127.0.0.1:80"),
        ];
        for (a, b) in overlapping {
            assert!(listeners_overlap(sock(a), sock(b)), "{a} vs {b}");
            assert!(listeners_overlap(sock(b), sock(a)), "{b} vs {a}");
        }
        let apart = [
            ("127.0.0.1:80", "127.0.0.1:81"),
            ("127.0.0.1:80", "127.0.0.2:80"),
            ("0.0.0.0:80", "[::1]:80"),
            ("[::1]:80", "[::2]:80"),
            ("127.0.0.1:0", "127.0.0.1:0"),
        ];
        for (a, b) in apart {
            assert!(!listeners_overlap(sock(a), sock(b)), "{a} vs {b}");
        }
    }

    #[test]
    fn check_bindable_names_a_busy_address() {
        let held = TcpListener::bind("127.0.0.1:0").unwrap();
        let busy = held.local_addr().unwrap();
        let err = check_bindable(&[busy]).unwrap_err();
        assert_eq!(err.addr, busy);
        assert!(err.to_string().contains(&busy.to_string()), "{err}");
        drop(held);
        check_bindable(&[busy]).unwrap();
    }

    #[test]
    fn parses_cidrs_and_bare_addresses() {
        let s = set("10.0.0.0/8, 192.168.1.7,::1,2001:db8::/32");
        assert!(s.contains(ip("10.1.2.3")));
        assert!(s.contains(ip("192.168.1.7")));
        assert!(!s.contains(ip("192.168.1.8")));
        assert!(s.contains(ip("::1")));
        assert!(s.contains(ip("2001:db8::5")));
    }

    #[test]
    fn rejects_garbage_naming_the_entry() {
        let err = CidrSet::parse_csv("10.0.0.0/8,nope").unwrap_err();
        assert_eq!(err.entry, "nope");
        assert!(CidrSet::parse_entry("10.0.0.0/33").is_err());
    }

    #[test]
    fn mapped_ipv4_matches_ipv4_networks() {
        assert!(set("10.0.0.0/8").contains(ip("::ffff:10.0.0.1")));
    }

    #[test]
    fn mapped_entries_are_their_ipv4_networks() {
        let s = set("::ffff:10.0.0.1, ::ffff:192.168.0.0/112");
        for hit in [
            "10.0.0.1",
            "::ffff:10.0.0.1",
            "192.168.7.7",
            "::ffff:192.168.0.1",
        ] {
            assert!(s.contains(ip(hit)), "{hit}");
        }
        for miss in ["10.0.0.2", "192.169.0.1", "::1"] {
            assert!(!s.contains(ip(miss)), "{miss}");
        }
        assert!(
            set("::ffff:0:0/96").contains(ip("203.0.113.1")),
            "all of IPv4"
        );
        assert!(
            !set("::/0").contains(ip("203.0.113.1")),
            "::/0 is IPv6 only"
        );
        assert_eq!(set("::ffff:10.0.0.0/104").to_string(), "10.0.0.0/8");
    }

    #[test]
    fn untrusted_peer_ignores_forwarded_for() {
        let trusted = set("10.0.0.0/8");
        let xff: [&[u8]; 1] = [b"6.6.6.6"];
        assert_eq!(
            resolve_client_ip(ip("1.2.3.4"), xff.into_iter(), &trusted),
            ip("1.2.3.4")
        );
    }

    #[test]
    fn no_trusted_proxies_means_peer() {
        let xff: [&[u8]; 1] = [b"6.6.6.6"];
        assert_eq!(
            resolve_client_ip(ip("10.0.0.1"), xff.into_iter(), &CidrSet::default()),
            ip("10.0.0.1")
        );
    }

    #[test]
    fn takes_rightmost_untrusted_hop() {
        let trusted = set("10.0.0.0/8");
        // client forged 6.6.6.6; real client 1.2.3.4 reached trusted proxies 10.0.0.2 then 10.0.0.1
        let xff: [&[u8]; 1] = [b"6.6.6.6, 1.2.3.4, 10.0.0.2"];
        assert_eq!(
            resolve_client_ip(ip("10.0.0.1"), xff.into_iter(), &trusted),
            ip("1.2.3.4")
        );
    }

    #[test]
    fn several_headers_form_one_list() {
        let trusted = set("10.0.0.0/8");
        let xff: [&[u8]; 2] = [b"6.6.6.6", b"5.5.5.5"];
        assert_eq!(
            resolve_client_ip(ip("10.0.0.1"), xff.into_iter(), &trusted),
            ip("5.5.5.5")
        );
    }

    #[test]
    fn all_trusted_chain_yields_leftmost() {
        let trusted = set("10.0.0.0/8");
        let xff: [&[u8]; 1] = [b"10.0.0.9, 10.0.0.8"];
        assert_eq!(
            resolve_client_ip(ip("10.0.0.1"), xff.into_iter(), &trusted),
            ip("10.0.0.9")
        );
    }

    #[test]
    fn garbage_hop_stops_the_walk() {
        let trusted = set("10.0.0.0/8");
        let xff: [&[u8]; 1] = [b"1.2.3.4, garbage, 10.0.0.2"];
        assert_eq!(
            resolve_client_ip(ip("10.0.0.1"), xff.into_iter(), &trusted),
            ip("10.0.0.2")
        );
    }

    #[test]
    fn hops_with_ports_parse() {
        let trusted = set("10.0.0.0/8");
        let xff: [&[u8]; 1] = [b"[2001:db8::1]:4711"];
        assert_eq!(
            resolve_client_ip(ip("10.0.0.1"), xff.into_iter(), &trusted),
            ip("2001:db8::1")
        );
    }

    #[test]
    fn bracketed_ipv6_hops_parse_with_or_without_a_port() {
        let trusted = set("10.0.0.0/8");
        for hop in [
            "[2001:db8::1]",
            " [2001:db8::1]:80 ",
            "[::ffff:203.0.113.1]",
        ] {
            let xff: [&[u8]; 1] = [hop.as_bytes()];
            let want = if hop.contains("ffff") {
                "203.0.113.1"
            } else {
                "2001:db8::1"
            };
            assert_eq!(
                resolve_client_ip(ip("10.0.0.1"), xff.into_iter(), &trusted),
                ip(want),
                "{hop}"
            );
        }
        // Brackets are for IPv6 only.
        let xff: [&[u8]; 1] = [b"[1.2.3.4]"];
        assert_eq!(
            resolve_client_ip(ip("10.0.0.1"), xff.into_iter(), &trusted),
            ip("10.0.0.1")
        );
    }

    #[test]
    fn missing_header_with_trusted_peer_is_peer() {
        let trusted = set("10.0.0.0/8");
        assert_eq!(
            resolve_client_ip(ip("10.0.0.1"), std::iter::empty(), &trusted),
            ip("10.0.0.1")
        );
    }
}
