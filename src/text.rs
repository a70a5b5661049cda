//! Text from the server, made safe to keep and to print.
//!
//! A homeserver (or anything pretending to be one) chooses the `errcode`, `error` and
//! `Location` of an error answer. Printed raw, that text can forge log lines ("\nstate: Live"),
//! drive the terminal (ESC and OSC sequences), reorder what the reader sees (bidi controls) or
//! run to megabytes. So it is cut with [`capped`] when a failure is built, which bounds `Debug`
//! too, and shown through [`Escaped`] by every `Display`.

use std::fmt::{self, Write as _};

/// The most bytes of one server string a failure keeps, before the cut marker.
///
/// Long enough for any real Matrix `error` message or redirect target, short enough that one
/// error stays one readable log line.
pub(crate) const MAX_TEXT_BYTES: usize = 1024;

/// `text`, or its first [`MAX_TEXT_BYTES`] (cut back to a char boundary) followed by
/// `… [+N bytes]` saying how much was dropped.
///
/// Borrows so that only the kept prefix is copied, never the whole of a huge string.
pub(crate) fn capped(text: &str) -> String {
    if text.len() <= MAX_TEXT_BYTES {
        return text.to_owned();
    }
    // `str::floor_char_boundary` is newer than the crate's minimum Rust; a char is at most
    // four bytes, so this steps back at most three times.
    let mut end = MAX_TEXT_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… [+{} bytes]", &text[..end], text.len() - end)
}

/// Displays a string with every character a terminal or log reader would interpret escaped as
/// Rust writes it (`\n`, `\u{1b}`, `\u{202e}`), and a backslash as `\\` so that an escape seen
/// always stands for a character that was there.
///
/// The escaping is std's [`str::escape_debug`]: besides C0, DEL and C1 it covers every
/// character that is not printable, the bidi controls (U+202A–U+202E, U+2066–U+2069) and line
/// and paragraph separators (U+2028, U+2029) among them, so no table is kept here. Quotes are
/// left alone (messages say "can't"). A combining mark is escaped only where it has no letter
/// of its own to join (at the start, or after a quote) and would fuse with what precedes it.
/// Each input byte becomes at most six output bytes (`\u{1b}`), so a capped string stays
/// bounded.
#[derive(Clone, Copy)]
pub(crate) struct Escaped<'a>(pub(crate) &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0;
        while let Some(at) = rest.find(['\'', '"']) {
            write!(f, "{}", rest[..at].escape_debug())?;
            // Both quotes are one byte.
            f.write_char(char::from(rest.as_bytes()[at]))?;
            rest = &rest[at + 1..];
        }
        write!(f, "{}", rest.escape_debug())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn show(text: &str) -> String {
        Escaped(text).to_string()
    }

    #[test]
    fn short_text_is_kept_and_long_text_cut_with_a_marker() {
        assert_eq!(capped(""), "");
        let exact = "x".repeat(MAX_TEXT_BYTES);
        assert_eq!(capped(&exact), exact);
        let long = "x".repeat(MAX_TEXT_BYTES + 5);
        assert_eq!(capped(&long), format!("{exact}… [+5 bytes]"));
    }

    #[test]
    fn a_cut_never_splits_a_char() {
        // Two-, three- and four-byte chars, placed so that the limit falls on each of their
        // inner bytes in turn.
        for ch in ['é', '日', '😀'] {
            for pad in 0..ch.len_utf8() {
                let text = format!(
                    "{}{}",
                    "a".repeat(pad),
                    ch.to_string().repeat(MAX_TEXT_BYTES)
                );
                let cut = capped(&text);
                let kept = cut.split("… [+").next().unwrap();
                assert!(text.starts_with(kept), "{ch} {pad}");
                assert!(kept.len() <= MAX_TEXT_BYTES && kept.len() > MAX_TEXT_BYTES - 4);
                assert!(kept.ends_with(ch), "{ch} {pad}: ends in a whole char");
                let dropped = text.len() - kept.len();
                assert!(cut.ends_with(&format!("… [+{dropped} bytes]")));
            }
        }
    }

    #[test]
    fn forged_lines_and_terminal_sequences_are_shown_not_interpreted() {
        let shown = show("x\nstate: Live\x1b[2J\x1b]0;title\x07\r\t\0");
        assert_eq!(shown, r"x\nstate: Live\u{1b}[2J\u{1b}]0;title\u{7}\r\t\0");
        assert!(shown.bytes().all(|b| (0x20..0x7f).contains(&b)));
    }

    #[test]
    fn c0_del_c1_bidi_and_separators_are_escaped() {
        let mut controls: Vec<char> = (0u32..0x20)
            .chain(0x7f..=0x9f)
            .filter_map(char::from_u32)
            .collect();
        controls.extend(('\u{202a}'..='\u{202e}').chain('\u{2066}'..='\u{2069}'));
        controls.extend(['\u{2028}', '\u{2029}', '\u{200e}', '\u{200f}', '\u{061c}']);
        for c in controls {
            let shown = show(&format!("a{c}b"));
            let expected = match c {
                '\0' => r"\0".to_owned(),
                '\t' => r"\t".to_owned(),
                '\n' => r"\n".to_owned(),
                '\r' => r"\r".to_owned(),
                _ => format!("\\u{{{:x}}}", c as u32),
            };
            assert_eq!(shown, format!("a{expected}b"), "U+{:04X}", c as u32);
        }
        assert_eq!(
            show(r"a\nb"),
            r"a\\nb",
            "a literal backslash cannot pose as an escape"
        );
    }

    #[test]
    fn ordinary_unicode_and_quotes_pass_unchanged() {
        let text = "Café 日本語 😀 e\u{301} can't \"since\" ok";
        assert_eq!(show(text), text);
        // Next to a control, the rest is still left alone.
        assert_eq!(show("é\u{1b}日本"), r"é\u{1b}日本");
        // A combining mark with nothing to combine with is escaped.
        assert_eq!(show("\u{301}x"), r"\u{301}x");
    }

    #[test]
    fn a_huge_string_stays_bounded_even_when_every_byte_is_escaped() {
        for fill in ["x", "\u{1b}", "\u{85}", "\u{202e}"] {
            let huge = fill.repeat((20 << 20) / fill.len());
            let shown = show(&capped(&huge));
            assert!(
                shown.len() <= 6 * MAX_TEXT_BYTES + 64,
                "{fill:?}: {}",
                shown.len()
            );
            assert!(shown.contains(" bytes]"));
        }
    }
}
