//! URL percent-decoding for query parameters and path segments.

use std::borrow::Cow;

/// Decodes `%XX` escapes and `+` (a space in query strings). Invalid escapes are kept as
/// written; invalid UTF-8 becomes U+FFFD. Borrows when there is nothing to decode.
pub fn percent_decode(raw: &str) -> Cow<'_, str> {
    if !raw.contains(['%', '+']) {
        return Cow::Borrowed(raw);
    }
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            if let Some(decoded) = bytes.get(i + 1..i + 3).and_then(hex_byte) {
                out.push(decoded);
                i += 3;
                continue;
            }
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

fn hex_byte(pair: &[u8]) -> Option<u8> {
    let digit = |c: u8| (c as char).to_digit(16);
    Some((digit(pair[0])? * 16 + digit(pair[1])?) as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_and_keeps_invalid_escapes() {
        assert_eq!(percent_decode("a%2Db+c"), "a-b c");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        assert_eq!(percent_decode("%+5"), "% 5");
        assert!(matches!(percent_decode("plain"), Cow::Borrowed(_)));
    }
}
