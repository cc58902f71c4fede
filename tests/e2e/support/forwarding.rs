//! Client addresses as proxies report them, for the client-IP model (src/net/client_ip_model.rs)
//! and its end-to-end spot check: random `trusted_proxies` sets and `X-Forwarded-For` chains
//! (each hop generated with the address it means, or none for garbage), and the documented
//! rule as a reference: only from a trusted TCP peer is the chain read, from the right, each
//! trusted hop skipped; the first untrusted hop is the client, and garbage ends the walk at the
//! last address read. IPv4-mapped IPv6 addresses, of clients and of entries, are their IPv4
//! addresses.

use std::net::{IpAddr, Ipv6Addr};

use super::soak::Rng;

/// A `trusted_proxies` entry as written in the configuration, and the network it means.
#[derive(Clone, Debug)]
pub struct Net {
    pub text: String,
    /// The network's address (IPv4 for a mapped entry) and prefix length.
    pub addr: IpAddr,
    pub prefix: u8,
}

/// One `X-Forwarded-For` hop: its bytes, and the address they name (`None`: garbage).
#[derive(Clone, Debug)]
pub struct Hop {
    pub text: Vec<u8>,
    pub meaning: Option<IpAddr>,
}

/// A forwarded chain: its header lines in order, and the hops they hold, left to right.
#[derive(Clone, Debug, Default)]
pub struct Chain {
    pub lines: Vec<Vec<u8>>,
    pub hops: Vec<Hop>,
}

/// Picks one of `items`.
fn pick<'a, T>(rng: &mut Rng, items: &'a [T]) -> &'a T {
    &items[rng.below(items.len())]
}

/// A random entry over the addresses of `pool`: host entries, networks of every width (0 and
/// the full length included), and IPv4 networks written as IPv4-mapped IPv6.
pub fn random_net(rng: &mut Rng, pool: &[IpAddr]) -> Net {
    let addr = *pick(rng, pool);
    match addr {
        IpAddr::V4(v4) => {
            let any = rng.below(33) as u8;
            let prefix = *pick(rng, &[0u8, 8, 16, 24, 30, 31, 32, any]);
            let text = match rng.below(4) {
                0 if prefix == 32 => v4.to_string(),
                1 if prefix == 32 => format!("::ffff:{v4}"),
                2 => format!("::ffff:{v4}/{}", 96 + prefix),
                _ => format!("{v4}/{prefix}"),
            };
            Net { text, addr, prefix }
        }
        IpAddr::V6(v6) => {
            let any = rng.below(129) as u8;
            let prefix = *pick(rng, &[0u8, 32, 48, 64, 96, 127, 128, any]);
            let text = match rng.below(3) {
                0 if prefix == 128 => v6.to_string(),
                _ => format!("{v6}/{prefix}"),
            };
            Net { text, addr, prefix }
        }
    }
}

/// Whether `ip` is in one of `nets`: an IPv4-mapped address is its IPv4 address.
pub fn in_nets(nets: &[Net], ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    nets.iter().any(|net| match (net.addr.to_canonical(), ip) {
        (IpAddr::V4(n), IpAddr::V4(a)) => same_prefix(
            u32::from(n).into(),
            u32::from(a).into(),
            32,
            net.prefix.min(32),
        ),
        (IpAddr::V6(n), IpAddr::V6(a)) => same_prefix(n.into(), a.into(), 128, net.prefix),
        _ => false,
    })
}

/// Whether the first `prefix` of `bits` bits of `a` and `b` agree.
fn same_prefix(a: u128, b: u128, bits: u32, prefix: u8) -> bool {
    let shift = bits - u32::from(prefix);
    shift >= bits || (a >> shift) == (b >> shift)
}

/// The client of a request from `peer` carrying `chain`, by the documented rule.
pub fn expected_client(peer: IpAddr, chain: &Chain, trusted: &[Net]) -> IpAddr {
    let peer = peer.to_canonical();
    if !in_nets(trusted, peer) {
        return peer;
    }
    let mut client = peer;
    for hop in chain.hops.iter().rev() {
        let Some(ip) = hop.meaning else {
            return client;
        };
        client = ip.to_canonical();
        if !in_nets(trusted, client) {
            return client;
        }
    }
    client
}

/// Hops that name no address: unknown and obfuscated entries, bad addresses and ports,
/// quotes, brackets half closed, `Forwarded` syntax, bytes that are not UTF-8.
const GARBAGE: &[&[u8]] = &[
    b"",
    b"unknown",
    b"_hidden",
    b"1.2.3",
    b"1.2.3.4.5",
    b"256.1.1.1",
    b"01.2.3.4",
    b"1.2.3.4:",
    b"1.2.3.4:99999",
    b"[1.2.3.4]:80",
    b"\"1.2.3.4\"",
    b"1.2.3.4 5.6.7.8",
    b"for=1.2.3.4",
    b"::ffff:1.2.3.4:80",
    b"2001:db8::1]",
    b"[2001:db8::1",
    b"\xff\xfe1.2.3.4",
    b"1.2.3.4;x",
];

/// A random hop: an address of `pool` in one of its spellings, or garbage.
pub fn random_hop(rng: &mut Rng, pool: &[IpAddr]) -> Hop {
    if rng.chance(12) {
        let text = *pick(rng, GARBAGE);
        return Hop {
            text: text.to_vec(),
            meaning: None,
        };
    }
    let ip = *pick(rng, pool);
    let port = 1 + rng.below(65535);
    let core = match ip {
        IpAddr::V4(v4) => match rng.below(6) {
            0 => format!("::ffff:{v4}"),
            1 => format!("{v4}:{port}"),
            2 => {
                let mapped = v4.to_ipv6_mapped();
                format!("[{mapped}]:{port}")
            }
            _ => v4.to_string(),
        },
        IpAddr::V6(v6) => match rng.below(5) {
            0 => format!("[{v6}]:{port}"),
            1 => format!("[{v6}]"),
            2 => v6.to_string().to_uppercase(),
            3 => full_form(v6),
            _ => v6.to_string(),
        },
    };
    let pad = |rng: &mut Rng| *pick(rng, &["", "", " ", "  ", "\t"]);
    Hop {
        text: format!("{}{core}{}", pad(rng), pad(rng)).into_bytes(),
        meaning: Some(ip),
    }
}

fn full_form(v6: Ipv6Addr) -> String {
    v6.segments()
        .iter()
        .map(|s| format!("{s:04x}"))
        .collect::<Vec<_>>()
        .join(":")
}

const SEPARATORS: &[&[u8]] = &[b",", b", ", b" , ", b",  "];

/// A random chain of `hops` hops from `pool`, spread over one to three header lines (each
/// holding at least one hop, so that every line is a hop of its own or more).
pub fn random_chain(rng: &mut Rng, pool: &[IpAddr], hops: usize) -> Chain {
    let hops: Vec<Hop> = (0..hops).map(|_| random_hop(rng, pool)).collect();
    let mut lines = Vec::new();
    let mut line: Vec<u8> = Vec::new();
    for (i, hop) in hops.iter().enumerate() {
        if i > 0 {
            if rng.chance(20) && !line.is_empty() {
                lines.push(std::mem::take(&mut line));
            } else {
                let separator: &&[u8] = pick(rng, SEPARATORS);
                line.extend_from_slice(separator);
            }
        }
        line.extend_from_slice(&hop.text);
    }
    if !hops.is_empty() {
        lines.push(line);
    }
    Chain { lines, hops }
}

/// A chain length: mostly short, sometimes long (hundreds of hops).
pub fn random_length(rng: &mut Rng) -> usize {
    match rng.below(10) {
        0 => 0,
        1 => 50 + rng.below(300),
        _ => 1 + rng.below(5),
    }
}

/// Test addresses around loopback, documentation ranges and a private network, close enough
/// that random networks over them overlap.
pub fn address_pool() -> Vec<IpAddr> {
    let v4 = [
        "127.0.0.1",
        "127.0.0.2",
        "127.0.0.3",
        "10.0.0.1",
        "10.0.0.2",
        "10.0.1.1",
        "192.0.2.7",
        "203.0.113.9",
    ];
    let v6 = [
        "::1",
        "2001:db8::1",
        "2001:db8::2",
        "2001:db8:0:1::1",
        "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff",
        "fd00::7",
    ];
    v4.iter()
        .chain(v6.iter())
        .map(|a| a.parse().expect("a pool address"))
        .collect()
}

/// A random TCP peer: from `pool`, or the IPv4-mapped form of one of its IPv4 addresses.
pub fn random_peer(rng: &mut Rng, pool: &[IpAddr]) -> IpAddr {
    match *pick(rng, pool) {
        IpAddr::V4(v4) if rng.chance(30) => IpAddr::V6(v4.to_ipv6_mapped()),
        ip => ip,
    }
}
