//! A small server-sent-events parser: bytes in, events out. Handles chunks split anywhere
//! (inside a line, a UTF-8 sequence or a `\r\n`), `\n`, `\r\n` and `\r` line endings,
//! comments, and multi-line `data`.

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub event: String,
    pub data: String,
}

#[derive(Debug, Default)]
pub struct SseParser {
    line: Vec<u8>,
    /// The previous byte was `\r`: a following `\n` belongs to the same line ending.
    after_cr: bool,
    event: String,
    data: String,
    has_data: bool,
}

impl SseParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds a chunk; returns the events it completed.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<SseEvent> {
        let mut events = Vec::new();
        for &b in chunk {
            if self.after_cr {
                self.after_cr = false;
                if b == b'\n' {
                    continue;
                }
            }
            match b {
                b'\r' | b'\n' => {
                    self.after_cr = b == b'\r';
                    let line = std::mem::take(&mut self.line);
                    if let Some(event) = self.line_done(&line) {
                        events.push(event);
                    }
                }
                _ => self.line.push(b),
            }
        }
        events
    }

    /// Bytes of an unfinished line or event are buffered (for tests and diagnostics).
    pub fn is_idle(&self) -> bool {
        self.line.is_empty() && self.event.is_empty() && !self.has_data
    }

    fn line_done(&mut self, line: &[u8]) -> Option<SseEvent> {
        if line.is_empty() {
            let event = std::mem::take(&mut self.event);
            let data = std::mem::take(&mut self.data);
            let has_data = std::mem::replace(&mut self.has_data, false);
            if !has_data && event.is_empty() {
                return None;
            }
            return Some(SseEvent {
                event: if event.is_empty() {
                    "message".into()
                } else {
                    event
                },
                data,
            });
        }
        if line[0] == b':' {
            return None;
        }
        let text = String::from_utf8_lossy(line);
        let (field, value) = match text.find(':') {
            Some(i) => {
                let value = &text[i + 1..];
                (&text[..i], value.strip_prefix(' ').unwrap_or(value))
            }
            None => (&text[..], ""),
        };
        match field {
            "event" => self.event = value.to_string(),
            "data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
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

    #[test]
    fn half_an_event_is_not_dispatched() {
        let mut p = SseParser::new();
        assert!(p.feed(b"event: put\ndata: {\"path\":\"/\",\"da").is_empty());
        assert!(!p.is_idle());
    }
}
