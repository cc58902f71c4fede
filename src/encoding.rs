//! URL percent-decoding for query parameters and path segments.

use std::borrow::Cow;

/// Decodes `%XX` escapes and `+` (a space in query strings). Invalid escapes are kept as
/// written; invalid UTF-8 becomes U+FFFD. Borrows when there is nothing to decode.
pub fn percent_decode(raw: &str) -> Cow<'_, str> {
    if !raw.contains(['%', '+']) {
        return Cow::Borrowed(raw);
    }
    Cow::Owned(String::from_utf8_lossy(&decode_bytes(raw, true)).into_owned())
}

/// Decodes `%XX` escapes in a path segment. `+` stays a plus (the space rule is for query
/// strings only), and a result that is not UTF-8 is an error rather than U+FFFD, so that a
/// token is never silently rewritten into another one. Invalid escapes are kept as written.
pub fn percent_decode_segment(raw: &str) -> Result<Cow<'_, str>, std::string::FromUtf8Error> {
    if !raw.contains('%') {
        return Ok(Cow::Borrowed(raw));
    }
    String::from_utf8(decode_bytes(raw, false)).map(Cow::Owned)
}

fn decode_bytes(raw: &str, plus_is_space: bool) -> Vec<u8> {
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
        out.push(if plus_is_space && bytes[i] == b'+' {
            b' '
        } else {
            bytes[i]
        });
        i += 1;
    }
    out
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

    #[test]
    fn path_segments_keep_plus_and_refuse_invalid_utf8() {
        assert_eq!(percent_decode_segment("a+b").unwrap(), "a+b");
        assert_eq!(percent_decode_segment("a%2Bb%20c").unwrap(), "a+b c");
        assert_eq!(percent_decode_segment("%zz%4").unwrap(), "%zz%4");
        assert_eq!(percent_decode_segment("%C3%A9").unwrap(), "\u{e9}");
        assert!(percent_decode_segment("a%FFb").is_err());
        assert!(matches!(
            percent_decode_segment("a+b"),
            Ok(Cow::Borrowed(_))
        ));
    }
}
