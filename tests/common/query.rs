//! Decoding query components, shared by the machine tests and the simulation harness.

/// Decodes `%XX` escapes (and `+` as a space, as in form encoding); a malformed escape is kept
/// as it is.
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escape = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (escape, bytes[i]) {
            (Some(b), _) => {
                out.push(b);
                i += 3;
                continue;
            }
            (None, b'+') => out.push(b' '),
            (None, b) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn decodes_escapes_plus_and_a_trailing_escape() {
    assert_eq!(percent_decode("a%21b+c%7E"), "a!b c~");
    assert_eq!(percent_decode("%zz%4"), "%zz%4");
}
