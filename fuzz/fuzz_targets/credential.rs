#![no_main]
//! Credential extraction and client-IP resolution with arbitrary header bytes.
//! Properties: after strip_all no credential is left; resolve_client_ip gives the peer or a hop.
//! Input: lines; the first is the request target, the others `name: value` headers.
use libfuzzer_sys::fuzz_target;
use pingora::http::RequestHeader;
use tollgate::net::{request_client_ip, CidrSet};
use tollgate::proxy::credential::{bearer, extract, strip, strip_all};

fuzz_target!(|data: &[u8]| {
    let mut lines = data.split(|b| *b == b'\n');
    let target = lines.next().unwrap_or(b"/");
    let Ok(mut req) = RequestHeader::build("GET", target, None) else {
        return;
    };
    for line in lines {
        let _ = bearer(line);
        let Some(pos) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (name, value) = (&line[..pos], &line[pos + 1..]);
        let Ok(name) = http::HeaderName::from_bytes(name) else {
            continue;
        };
        let Ok(value) = http::HeaderValue::from_bytes(value) else {
            continue;
        };
        let _ = req.append_header(name, value);
    }
    let trusted = CidrSet::parse_csv("10.0.0.0/8,::1,127.0.0.0/8").unwrap();
    for peer in ["10.1.2.3", "127.0.0.1", "::1", "::ffff:10.0.0.1", "1.2.3.4"] {
        let peer: std::net::IpAddr = peer.parse().unwrap();
        let ip = request_client_ip(peer, &req, &trusted);
        if !trusted.contains(peer) {
            assert_eq!(ip, peer.to_canonical());
        }
        let _ = tollgate::net::subscriber(ip);
    }
    let found = extract(&req).map(|(s, t)| (s, t.into_owned()));
    let mut one = req.clone();
    if let Some((source, _)) = &found {
        strip(&mut one, *source);
        let _ = extract(&one);
    }
    let mut all = req.clone();
    strip_all(&mut all);
    if let Some(left) = extract(&all) {
        panic!(
            "credential left after strip_all: {:?} (uri {})",
            left, all.uri
        );
    }
    // The query must not keep a `key` parameter.
    if let Some(q) = all.uri.query() {
        assert!(
            !q.split('&').any(|p| p == "key" || p.starts_with("key=")),
            "key left in {q}"
        );
    }
});
