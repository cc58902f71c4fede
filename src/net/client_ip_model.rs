//! A model-based test of client-IP resolution ([`request_client_ip`] over a real request
//! header, [`CidrSet`] as the configuration builds it, [`subscriber`]): random TCP peers
//! (IPv4, IPv6, IPv4-mapped, loopback), random `trusted_proxies` sets (IPv4 and IPv6, `/0` to
//! host entries, mapped entries, overlapping) and random `X-Forwarded-For` chains (several
//! header lines, spaces, ports, brackets, garbage, hundreds of hops) against the reference
//! rule of tests/e2e/support/forwarding.rs, which the end-to-end spot check shares.
//!
//! `TOLLGATE_MODEL_SEED=N` replays one run; `TOLLGATE_MODEL_RUNS` (default 300) and
//! `TOLLGATE_MODEL_STEPS` (default 50 requests per run) size the search.

use std::net::IpAddr;

use pingora::http::RequestHeader;

use super::{request_client_ip, subscriber, CidrSet};

#[path = "../../tests/e2e/support/forwarding.rs"]
mod forwarding;

/// Where forwarding.rs finds the generator, as in tests/e2e/support.
use crate::soak;
use forwarding::{
    address_pool, expected_client, in_nets, random_chain, random_length, random_net, random_peer,
    Chain, Net,
};
use soak::{env_u64, model_seeds, Rng};

/// The set as the configuration builds it from `trusted_proxies` (each entry parsed) and as
/// the environment's comma-separated lists do.
fn configured(nets: &[Net]) -> CidrSet {
    let entries = nets
        .iter()
        .map(|n| CidrSet::parse_entry(&n.text).unwrap_or_else(|e| panic!("{e}")))
        .collect();
    let set = CidrSet::new(entries);
    let csv = nets.iter().map(|n| n.text.as_str()).collect::<Vec<_>>();
    assert_eq!(CidrSet::parse_csv(&csv.join(", ")).unwrap(), set);
    set
}

fn request(chain: &Chain) -> RequestHeader {
    let mut req = RequestHeader::build("GET", b"/v1/models", None).unwrap();
    for line in &chain.lines {
        let value = http::HeaderValue::from_bytes(line).expect("a header value");
        let name = if line.len() % 2 == 0 {
            "X-Forwarded-For"
        } else {
            "x-forwarded-for"
        };
        req.append_header(name, value).unwrap();
    }
    req
}

/// The reference's per-client key: the IPv4 address, or the /64 of an IPv6 address.
fn expected_subscriber(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) >> 64 << 64).into()),
        v4 => v4,
    }
}

fn run(seed: u64, steps: u64) {
    let mut rng = Rng::new(seed);
    let pool = address_pool();
    let nets: Vec<Net> = (0..rng.below(5))
        .map(|_| random_net(&mut rng, &pool))
        .collect();
    let trusted = configured(&nets);
    let replay = |what: String| {
        let texts: Vec<&str> = nets.iter().map(|n| n.text.as_str()).collect();
        format!(
            "{what}\ntrusted_proxies: {texts:?}\nreplay: TOLLGATE_MODEL_SEED={seed} cargo test \
             --lib client_ip_model"
        )
    };
    for _ in 0..steps {
        let peer = random_peer(&mut rng, &pool);
        assert_eq!(
            trusted.contains(peer),
            in_nets(&nets, peer),
            "{}",
            replay(format!("contains({peer})"))
        );
        let length = random_length(&mut rng);
        let chain = random_chain(&mut rng, &pool, length);
        let got = request_client_ip(peer, &request(&chain), &trusted);
        let want = expected_client(peer, &chain, &nets);
        assert_eq!(
            got,
            want,
            "{}",
            replay(format!(
                "peer {peer}, X-Forwarded-For lines {:?}",
                chain
                    .lines
                    .iter()
                    .map(|l| String::from_utf8_lossy(l))
                    .collect::<Vec<_>>()
            ))
        );
        assert_eq!(
            subscriber(got),
            expected_subscriber(want),
            "{}",
            replay(format!("{got}"))
        );
    }
}

#[test]
fn client_ip_resolution_follows_the_documented_rule() {
    let steps = env_u64("TOLLGATE_MODEL_STEPS").unwrap_or(50);
    for seed in model_seeds(300) {
        run(seed, steps);
    }
}
