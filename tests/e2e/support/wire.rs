//! HTTP/1.1 messages read byte for byte from a raw socket, for tests that must see exactly what
//! went over the wire: the header lines in their order and case, and the body's framing.

use std::io::{self, BufRead, Read};

/// Header (or trailer) lines: each name and value, in order.
pub type Lines = Vec<(Vec<u8>, Vec<u8>)>;

/// A request or status line and its header lines, as they arrived.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Head {
    /// The first line without its CRLF.
    pub line: Vec<u8>,
    /// Each header line's name and value (surrounding whitespace trimmed), in order.
    pub headers: Lines,
}

impl Head {
    /// The values of `name` (case-insensitive), in order.
    pub fn all(&self, name: &str) -> Vec<&[u8]> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| v.as_slice())
            .collect()
    }

    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.all(name).into_iter().next()
    }

    /// The status code of a status line.
    pub fn status(&self) -> u16 {
        self.line
            .split(|&b| b == b' ')
            .nth(1)
            .and_then(|s| std::str::from_utf8(s).ok()?.parse().ok())
            .unwrap_or(0)
    }

    /// Whether the last transfer coding is `chunked`.
    pub fn chunked(&self) -> bool {
        self.all("transfer-encoding").last().is_some_and(|v| {
            v.rsplit(|&b| b == b',')
                .next()
                .is_some_and(|c| c.trim_ascii().eq_ignore_ascii_case(b"chunked"))
        })
    }

    /// The single `Content-Length`, if there is one and it parses.
    pub fn content_length(&self) -> Option<usize> {
        std::str::from_utf8(self.get("content-length")?)
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

/// Reads one head. `Ok(None)`: the connection ended before its first byte.
pub fn read_head(reader: &mut impl BufRead) -> io::Result<Option<Head>> {
    let mut line = Vec::new();
    if reader.read_until(b'\n', &mut line)? == 0 {
        return Ok(None);
    }
    let mut head = Head {
        line: trim_eol(&line).to_vec(),
        headers: Vec::new(),
    };
    read_fields(reader, &mut head.headers)?;
    Ok(Some(head))
}

/// Reads field lines (a head's headers, or a chunked body's trailers) up to the empty line.
fn read_fields(reader: &mut impl BufRead, fields: &mut Lines) -> io::Result<()> {
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let text = trim_eol(&line);
        if text.is_empty() {
            return Ok(());
        }
        let colon = text
            .iter()
            .position(|&b| b == b':')
            .ok_or(io::ErrorKind::InvalidData)?;
        fields.push((
            text[..colon].to_vec(),
            text[colon + 1..].trim_ascii().to_vec(),
        ));
    }
}

fn trim_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// A body as it was framed, or how far it got before the connection ended.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Body {
    pub bytes: Vec<u8>,
    /// Trailer lines after the last chunk.
    pub trailers: Lines,
    /// The connection ended (or failed) before the body's framing said it was complete.
    pub truncated: bool,
}

/// Reads `length` bytes.
pub fn read_length(reader: &mut impl BufRead, length: usize) -> Body {
    let mut bytes = Vec::with_capacity(length.min(1 << 20));
    let truncated =
        reader.take(length as u64).read_to_end(&mut bytes).is_err() || bytes.len() < length;
    Body {
        bytes,
        trailers: Vec::new(),
        truncated,
    }
}

/// Reads until the peer closes (a body without a length).
pub fn read_to_close(reader: &mut impl BufRead) -> Body {
    let mut bytes = Vec::new();
    let truncated = reader.read_to_end(&mut bytes).is_err();
    Body {
        bytes,
        trailers: Vec::new(),
        truncated,
    }
}

/// Reads a chunked body (chunk extensions are skipped, trailers kept).
pub fn read_chunked(reader: &mut impl BufRead) -> Body {
    let mut body = Body::default();
    if read_chunks(reader, &mut body).is_err() {
        body.truncated = true;
    }
    body
}

fn read_chunks(reader: &mut impl BufRead, body: &mut Body) -> io::Result<()> {
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let size = trim_eol(&line)
            .split(|&b| b == b';')
            .next()
            .and_then(|s| std::str::from_utf8(s.trim_ascii()).ok())
            .and_then(|s| usize::from_str_radix(s, 16).ok())
            .ok_or(io::ErrorKind::InvalidData)?;
        if size == 0 {
            break;
        }
        let start = body.bytes.len();
        body.bytes.resize(start + size, 0);
        reader.read_exact(&mut body.bytes[start..])?;
        let mut crlf = [0u8; 2];
        reader.read_exact(&mut crlf)?;
        if &crlf != b"\r\n" {
            return Err(io::ErrorKind::InvalidData.into());
        }
    }
    read_fields(reader, &mut body.trailers)
}

/// Reads a request's body as its head frames it (no length and not chunked: none).
pub fn read_request_body(reader: &mut impl BufRead, head: &Head) -> Body {
    if head.get("transfer-encoding").is_some() {
        read_chunked(reader)
    } else {
        read_length(reader, head.content_length().unwrap_or(0))
    }
}

/// Reads a response's body as its head frames it, for a request of `method`.
pub fn read_response_body(reader: &mut impl BufRead, head: &Head, method: &str) -> Body {
    let status = head.status();
    if method == "HEAD" || status == 204 || status == 304 || (100..200).contains(&status) {
        Body::default()
    } else if head.get("transfer-encoding").is_some() {
        if head.chunked() {
            read_chunked(reader)
        } else {
            read_to_close(reader)
        }
    } else if let Some(length) = head.content_length() {
        read_length(reader, length)
    } else {
        read_to_close(reader)
    }
}

/// `bytes` in chunked framing, cut into pieces of at most `piece` bytes (each chunk line gets
/// `extension` after its size, e.g. `;a=b`), then `trailers`.
pub fn chunked(bytes: &[u8], piece: usize, extension: &str, trailers: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for chunk in bytes.chunks(piece.max(1)) {
        out.extend_from_slice(format!("{:x}{extension}\r\n", chunk.len()).as_bytes());
        out.extend_from_slice(chunk);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("0{extension}\r\n").as_bytes());
    for (name, value) in trailers {
        out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Bytes for display in a failure message.
pub fn show(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(300)]).into_owned();
    if bytes.len() > 300 {
        format!("{text}…({} bytes)", bytes.len())
    } else {
        text
    }
}
