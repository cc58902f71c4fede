//! Upstream peers: addresses resolved at load, rotated per worker thread (no shared counter
//! on the hot path), with the configured TLS, SNI and timeouts.

use std::cell::Cell;

use pingora::upstreams::peer::HttpPeer;

use crate::config::UpstreamConfig;

pub struct Upstreams {
    peers: Box<[HttpPeer]>,
}

thread_local! {
    static NEXT: Cell<usize> = const { Cell::new(0) };
}

impl Upstreams {
    pub fn new(config: &UpstreamConfig) -> Self {
        let peers = config
            .addrs
            .iter()
            .map(|addr| {
                let mut peer = HttpPeer::new(*addr, config.tls, config.sni.clone());
                peer.options.connection_timeout = Some(config.connect_timeout);
                peer.options.read_timeout = Some(config.read_timeout);
                peer.options.idle_timeout = Some(config.idle_timeout);
                peer.options.verify_cert = config.verify_cert;
                peer.options.verify_hostname = config.verify_cert;
                peer
            })
            .collect();
        Self { peers }
    }

    pub fn len(&self) -> usize {
        self.peers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// The next peer in this thread's rotation.
    #[inline]
    pub fn next(&self) -> Box<HttpPeer> {
        let index = if self.peers.len() == 1 {
            0
        } else {
            NEXT.with(|next| {
                let i = next.get();
                next.set(i.wrapping_add(1));
                i % self.peers.len()
            })
        };
        Box::new(self.peers[index].clone())
    }
}
