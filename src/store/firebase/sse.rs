//! A small server-sent-events parser: bytes in, events out. Handles chunks split anywhere
//! (inside a line, a UTF-8 sequence or a `\r\n`), `\n`, `\r\n` and `\r` line endings,
//! comments, and multi-line `data`.
//!
//! A `data` value goes straight into the event's data as it arrives, not through a line buffer
//! first: Firebase's first event on every connection is the whole users path on one line, so
//! that line is held once, not twice.

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub event: String,
    pub data: String,
}

#[derive(Debug, Default)]
pub struct SseParser {
    /// The current line, until it is known to be a `data` field.
    line: Vec<u8>,
    /// The current line is a `data` field: its value goes into `data`.
    in_data: bool,
    /// The optional space after `data:` may still come (the value's first byte is not seen).
    data_space_pending: bool,
    /// The previous byte was `\r`: a following `\n` belongs to the same line ending.
    after_cr: bool,
    event: String,
    data: Vec<u8>,
    has_data: bool,
}

impl SseParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds a chunk; returns the events it completed.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<SseEvent> {
        let mut events = Vec::new();
        let mut rest = chunk;
        while !rest.is_empty() {
            if std::mem::take(&mut self.after_cr) && rest[0] == b'\n' {
                rest = &rest[1..];
                continue;
            }
            let end = rest.iter().position(|&b| b == b'\r' || b == b'\n');
            self.take(&rest[..end.unwrap_or(rest.len())]);
            let Some(end) = end else { break };
            self.after_cr = rest[end] == b'\r';
            if let Some(event) = self.line_done() {
                events.push(event);
            }
            rest = &rest[end + 1..];
        }
        events
    }

    /// Bytes of an unfinished line or event are buffered (for tests and diagnostics).
    pub fn is_idle(&self) -> bool {
        self.line.is_empty() && !self.in_data && self.event.is_empty() && !self.has_data
    }

    /// A piece of the current line (no line ending in it).
    fn take(&mut self, piece: &[u8]) {
        if self.in_data {
            self.push_data(piece);
            return;
        }
        let colon = if self.line.contains(&b':') {
            None
        } else {
            piece.iter().position(|&b| b == b':')
        };
        match colon {
            Some(c)
                if self.line.len() + c == 4
                    && [&self.line[..], &piece[..c]].concat() == b"data" =>
            {
                self.line.clear();
                self.start_data();
                self.push_data(&piece[c + 1..]);
            }
            _ => self.line.extend_from_slice(piece),
        }
    }

    /// A new `data` line: joined to the previous ones with a newline.
    fn start_data(&mut self) {
        if self.has_data {
            self.data.push(b'\n');
        }
        self.has_data = true;
        self.in_data = true;
        self.data_space_pending = true;
    }

    fn push_data(&mut self, mut bytes: &[u8]) {
        if self.data_space_pending && !bytes.is_empty() {
            self.data_space_pending = false;
            if bytes[0] == b' ' {
                bytes = &bytes[1..];
            }
        }
        self.data.extend_from_slice(bytes);
    }

    fn line_done(&mut self) -> Option<SseEvent> {
        if std::mem::take(&mut self.in_data) {
            return None;
        }
        let line = std::mem::take(&mut self.line);
        if line.is_empty() {
            let event = std::mem::take(&mut self.event);
            let data = std::mem::take(&mut self.data);
            // An event without data is not dispatched (WHATWG's event stream parsing).
            if !std::mem::replace(&mut self.has_data, false) {
                return None;
            }
            return Some(SseEvent {
                event: if event.is_empty() {
                    "message".into()
                } else {
                    event
                },
                data: String::from_utf8(data)
                    .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
            });
        }
        if line[0] == b':' {
            return None;
        }
        let text = String::from_utf8_lossy(&line);
        let (field, value) = match text.find(':') {
            Some(i) => {
                let value = &text[i + 1..];
                (&text[..i], value.strip_prefix(' ').unwrap_or(value))
            }
            None => (&text[..], ""),
        };
        match field {
            "event" => self.event = value.to_string(),
            // `data` without a colon: an empty value (with a colon it went to `take`).
            "data" => {
                self.start_data();
                self.in_data = false;
            }
            _ => {} // id, retry, unknown fields
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(event: &str, data: &str) -> SseEvent {
        SseEvent {
            event: event.into(),
            data: data.into(),
        }
    }

    #[test]
    fn parses_firebase_events() {
        let mut p = SseParser::new();
        let got = p.feed(
            b"event: put\ndata: {\"path\":\"/\",\"data\":null}\n\nevent: keep-alive\ndata: null\n\n",
        );
        assert_eq!(
            got,
            vec![
                ev("put", "{\"path\":\"/\",\"data\":null}"),
                ev("keep-alive", "null")
            ]
        );
        assert!(p.is_idle());
    }

    #[test]
    fn any_split_gives_the_same_events() {
        let wire = "event: patch\r\ndata: {\"path\":\"/\",\"data\":{\"a/nickname\":\"Zoë ✓\"}}\r\n\r\n: comment\r\rdata: line1\rdata: line2\r\r";
        let whole = SseParser::new().feed(wire.as_bytes());
        assert_eq!(
            whole,
            vec![
                ev(
                    "patch",
                    "{\"path\":\"/\",\"data\":{\"a/nickname\":\"Zoë ✓\"}}"
                ),
                ev("message", "line1\nline2"),
            ]
        );
        let bytes = wire.as_bytes();
        for split in 1..bytes.len() {
            let mut p = SseParser::new();
            let mut got = p.feed(&bytes[..split]);
            got.extend(p.feed(&bytes[split..]));
            assert_eq!(got, whole, "split at {split}");
        }
        // One byte at a time.
        let mut p = SseParser::new();
        let got: Vec<_> = bytes.iter().flat_map(|b| p.feed(&[*b])).collect();
        assert_eq!(got, whole);
    }

    /// The field names and spaces a `data` line may come with, whole and a byte at a time.
    #[test]
    fn data_lines_in_every_form() {
        let wire = b"data\ndata:x\ndata:  two\ndatax: no\n:data: comment\ndata: \n\n";
        let expected = vec![ev("message", "\nx\n two\n")];
        assert_eq!(SseParser::new().feed(wire), expected);
        let mut p = SseParser::new();
        let got: Vec<_> = wire.iter().flat_map(|b| p.feed(&[*b])).collect();
        assert_eq!(got, expected);
        assert!(p.is_idle());
    }

    /// WHATWG: an event without a data line is not dispatched, and its type is forgotten.
    #[test]
    fn an_event_without_data_is_not_dispatched() {
        let mut p = SseParser::new();
        assert_eq!(p.feed(b"event: put\n\n"), vec![]);
        assert_eq!(p.feed(b"data: x\n\n"), vec![ev("message", "x")]);
    }

    #[test]
    fn half_an_event_is_not_dispatched() {
        let mut p = SseParser::new();
        assert!(p.feed(b"event: put\ndata: {\"path\":\"/\",\"da").is_empty());
        assert!(!p.is_idle());
    }
}
