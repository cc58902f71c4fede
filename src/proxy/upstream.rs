//! Upstream peers: addresses resolved at load, rotated per worker thread (no shared counter
//! on the hot path), with the configured TLS, SNI and timeouts.

use std::cell::Cell;

use http::HeaderValue;
use pingora::upstreams::peer::HttpPeer;

use crate::config::UpstreamConfig;

pub struct Upstreams {
    upstreams: Box<[Upstream]>,
    /// Forward the client's `Host` rather than each upstream's own.
    preserve_host: bool,
}

struct Upstream {
    peer: HttpPeer,
    /// Its own `Host`.
    host: HeaderValue,
}

thread_local! {
    static NEXT: Cell<usize> = const { Cell::new(0) };
}

impl Upstreams {
    pub fn new(config: &UpstreamConfig) -> Self {
        let upstreams = config
            .addrs
            .iter()
            .map(|upstream| {
                let mut peer = HttpPeer::new(upstream.addr, config.tls, upstream.sni.clone());
                peer.options.connection_timeout = Some(config.connect_timeout);
                peer.options.read_timeout = Some(config.read_timeout);
                // Without it an upstream that never takes the request body held the request
                // (both connections, its slot) for good: reads are timed only once it is sent.
                peer.options.write_timeout = Some(config.read_timeout);
                peer.options.idle_timeout = Some(config.idle_timeout);
                peer.options.verify_cert = config.verify_cert;
                peer.options.verify_hostname = config.verify_cert;
                Upstream {
                    peer,
                    host: upstream.host.clone(),
                }
            })
            .collect();
        Self {
            upstreams,
            preserve_host: config.preserve_host,
        }
    }

    pub fn len(&self) -> usize {
        self.upstreams.len()
    }

    pub fn is_empty(&self) -> bool {
        self.upstreams.is_empty()
    }

    /// Where a request starts in the rotation: this thread's next index (no shared counter).
    #[inline]
    pub fn first(&self) -> usize {
        if self.upstreams.len() == 1 {
            return 0;
        }
        NEXT.with(|next| {
            let i = next.get();
            next.set(i.wrapping_add(1));
            i
        })
    }

    /// The upstream of a request's `attempt` (0, 1, …) that started at `first`: successive
    /// attempts of one request go to successive upstreams, whatever other requests took
    /// meanwhile.
    #[inline]
    pub fn index(&self, first: usize, attempt: usize) -> usize {
        first.wrapping_add(attempt) % self.upstreams.len()
    }

    #[inline]
    pub fn peer(&self, index: usize) -> Box<HttpPeer> {
        Box::new(self.upstreams[index].peer.clone())
    }

    /// The `Host` for that upstream; `None`: keep the client's. A request without one (HTTP/1.0
    /// allows it) gets the upstream's own even with `preserve_host`: it goes upstream as
    /// HTTP/1.1, where a request without `Host` is refused (RFC 9112, 3.2).
    #[inline]
    pub fn host(&self, index: usize, client_sent_host: bool) -> Option<&HeaderValue> {
        (!self.preserve_host || !client_sent_host).then(|| &self.upstreams[index].host)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstreams(n: usize) -> Upstreams {
        let config = UpstreamConfig {
            addrs: (0..n)
                .map(|i| crate::config::UpstreamAddr {
                    addr: format!("127.0.0.1:{}", 9000 + i).parse().unwrap(),
                    sni: String::new(),
                    host: HeaderValue::from_str(&format!("127.0.0.1:{}", 9000 + i)).unwrap(),
                })
                .collect(),
            tls: false,
            verify_cert: false,
            set_headers: Vec::new(),
            preserve_host: false,
            connect_timeout: std::time::Duration::from_secs(1),
            read_timeout: std::time::Duration::from_secs(1),
            idle_timeout: std::time::Duration::from_secs(1),
        };
        Upstreams::new(&config)
    }

    #[test]
    fn the_attempts_of_a_request_visit_every_upstream_once() {
        let upstreams = upstreams(3);
        let first = upstreams.first();
        // Other requests taking their turns meanwhile change nothing for this one.
        let _ = (upstreams.first(), upstreams.first());
        let ports: Vec<u16> = (0..3)
            .map(|attempt| {
                let peer = upstreams.peer(upstreams.index(first, attempt));
                peer._address.as_inet().unwrap().port()
            })
            .collect();
        let mut sorted = ports.clone();
        sorted.sort();
        assert_eq!(sorted, vec![9000, 9001, 9002], "{ports:?}");
        for (attempt, port) in ports.iter().enumerate() {
            let index = upstreams.index(first, attempt);
            let host = upstreams.host(index, true).unwrap().to_str().unwrap();
            assert_eq!(host, format!("127.0.0.1:{port}"), "its own Host");
        }
    }
}
