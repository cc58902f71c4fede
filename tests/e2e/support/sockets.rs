//! Loopback TCP sockets as Linux reports them in `/proc/net/tcp`: who holds a listening port,
//! and how many bytes wait in a connection's queues. Facts, where timing would be a guess.

/// The rows of `/proc/net/tcp` for IPv4 loopback sockets and listeners: (local port, remote
/// port, state, send queue, receive queue, inode).
fn rows() -> Vec<(u16, u16, u8, u64, u64, u64)> {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // Loopback, or (the remote side of a listener) no address at all.
            let port = |field: &str| {
                let (ip, port) = field.split_once(':')?;
                matches!(ip, "0100007F" | "00000000").then_some(())?;
                u16::from_str_radix(port, 16).ok()
            };
            let (tx, rx) = fields.get(4)?.split_once(':')?;
            Some((
                port(fields.get(1)?)?,
                port(fields.get(2)?)?,
                u8::from_str_radix(fields.get(3)?, 16).ok()?,
                u64::from_str_radix(tx, 16).ok()?,
                u64::from_str_radix(rx, 16).ok()?,
                fields.get(9)?.parse().ok()?,
            ))
        })
        .collect()
}

const LISTEN: u8 = 0x0A;

/// Whether process `pid` holds the socket listening on 127.0.0.1:`port` (and not some other
/// process that took the port first).
pub fn holds_listener(pid: u32, port: u16) -> bool {
    let Some(inode) = rows()
        .into_iter()
        .find(|r| r.0 == port && r.2 == LISTEN)
        .map(|r| r.5)
    else {
        return false;
    };
    let target = format!("socket:[{inode}]");
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|fds| {
            fds.flatten().any(|fd| {
                std::fs::read_link(fd.path()).is_ok_and(|link| link.as_os_str() == target.as_str())
            })
        })
        .unwrap_or(false)
}

/// The send and receive queues (bytes not yet acknowledged / not yet read by the process) of
/// the loopback connection from `local` to `remote` port.
pub fn tcp_queues(local: u16, remote: u16) -> Option<(u64, u64)> {
    rows()
        .into_iter()
        .find(|r| r.0 == local && r.1 == remote)
        .map(|r| (r.3, r.4))
}

/// A connection to `to` from the local address `from` (any of 127.0.0.0/8 on loopback, or
/// `::1`), so that tests can be several clients. 10 s read timeout.
pub fn connect_from(from: std::net::IpAddr, to: std::net::SocketAddr) -> std::net::TcpStream {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .expect("a runtime");
    let stream = runtime
        .block_on(async {
            let socket = match from {
                std::net::IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
                std::net::IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
            };
            socket.bind((from, 0).into())?;
            socket.connect(to).await?.into_std()
        })
        .unwrap_or_else(|e| panic!("connect from {from} to {to}: {e}"));
    stream.set_nonblocking(false).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    stream
}
