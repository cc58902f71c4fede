#![no_main]
//! SSE parser: the same bytes split anywhere give the same events; then every event goes
//! through the Firebase mirror and the stored-user reader, as the stream does.
use libfuzzer_sys::fuzz_target;
use tollgate::store::firebase::mirror::{Mirror, Touched};
use tollgate::store::firebase::sse::SseParser;
use tollgate::store::firebase::stream::{read_node, Report};

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let cuts = (data[0] as usize) % 8;
    let seed = data[1] as usize;
    let wire = &data[2..];
    let whole = SseParser::new().feed(wire);
    // Split into chunks at pseudo-random points.
    let mut points: Vec<usize> = (0..cuts)
        .map(|i| {
            if wire.is_empty() {
                0
            } else {
                (seed * 31 + i * 97 + i * i * seed) % (wire.len() + 1)
            }
        })
        .collect();
    points.sort();
    let mut p = SseParser::new();
    let mut got = Vec::new();
    let mut start = 0;
    for &cut in &points {
        got.extend(p.feed(&wire[start..cut]));
        start = cut;
    }
    got.extend(p.feed(&wire[start..]));
    assert_eq!(got, whole, "chunking changed the events (cuts {points:?})");
    // One byte at a time.
    let mut p = SseParser::new();
    let bytewise: Vec<_> = wire.iter().flat_map(|b| p.feed(&[*b])).collect();
    assert_eq!(bytewise, whole);

    let mut mirror = Mirror::new();
    for ev in whole {
        let touched = match ev.event.as_str() {
            "put" => mirror.put(&ev.data),
            "patch" => mirror.patch(&ev.data),
            _ => continue,
        };
        match touched {
            Ok(Touched::All) => {
                for t in mirror.tokens() {
                    if let Some(v) = mirror.user(t) {
                        let _ = read_node(t, v, Report::Nothing);
                    }
                }
            }
            Ok(Touched::Users(tokens)) => {
                for t in tokens {
                    if let Some(v) = mirror.user(&t) {
                        let _ = read_node(&t, v, Report::Nothing);
                    }
                }
            }
            Err(e) => {
                let _ = e.to_string();
            }
        }
    }
});
