//! A hand-written scanner for the few event fields normalization reads.
//!
//! It walks the event's bytes once, descending only along `content` → `m.relates_to` →
//! `m.in_reply_to` and skipping every other value without building anything (strings with a
//! word-at-a-time or SIMD search for `"` / `\`, containers by counting brackets). For valid
//! JSON the result equals a `serde_json::Value` reading (last duplicate key wins, keys compared
//! unescaped); for any other input it returns some partial result, in linear time, without
//! recursion or panics.

use std::borrow::Cow;

/// The fields of an event that normalization reads. Strings borrow from the input unless
/// they contain escapes.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct EventFields<'a> {
    /// Top-level `type`.
    pub event_type: Option<Cow<'a, str>>,
    /// `event_id`.
    pub event_id: Option<Cow<'a, str>>,
    /// `sender`.
    pub sender: Option<Cow<'a, str>>,
    /// `origin_server_ts`, when a non-negative integer that fits in `u64`.
    pub origin_server_ts: Option<u64>,
    /// `state_key`.
    pub state_key: Option<Cow<'a, str>>,
    /// Top-level `redacts`.
    pub redacts: Option<Cow<'a, str>>,
    /// `content.body`.
    pub body: Option<Cow<'a, str>>,
    /// `content.redacts`.
    pub content_redacts: Option<Cow<'a, str>>,
    /// `content.m.relates_to.rel_type`.
    pub rel_type: Option<Cow<'a, str>>,
    /// `content.m.relates_to.event_id`.
    pub rel_event_id: Option<Cow<'a, str>>,
    /// `content.m.relates_to.key`.
    pub rel_key: Option<Cow<'a, str>>,
    /// `content.m.relates_to.m.in_reply_to.event_id`.
    pub in_reply_to: Option<Cow<'a, str>>,
}

/// Reads the fields of one event from its JSON.
pub fn event_fields(json: &str) -> EventFields<'_> {
    let mut s = Scanner { src: json, i: 0 };
    let mut f = EventFields::default();
    s.ws();
    if s.peek() != Some(b'{') {
        return f;
    }
    s.i += 1;
    // The objects descended into form a single chain, so the current level is the whole stack.
    let mut level = Level::Event;
    loop {
        s.ws();
        match s.peek() {
            Some(b'"') => {}
            Some(b',') => {
                s.i += 1;
                continue;
            }
            Some(b'}') => {
                s.i += 1;
                match level.parent() {
                    Some(parent) => {
                        level = parent;
                        continue;
                    }
                    None => break,
                }
            }
            _ => break, // invalid JSON: keep what was read so far
        }
        let Some(key) = s.string() else { break };
        s.ws();
        if s.peek() != Some(b':') {
            break;
        }
        s.i += 1;
        s.ws();
        let unescaped;
        let key = if key.escaped {
            unescaped = s.text(key);
            match &unescaped {
                Some(key) => key.as_bytes(),
                None => {
                    s.skip_value();
                    continue;
                }
            }
        } else {
            s.raw(key)
        };
        match target(&mut f, level, key) {
            Target::Str(slot) => match s.string_value() {
                Some(span) => *slot = s.text(span),
                None => *slot = None,
            },
            Target::Ts => f.origin_server_ts = s.u64_value(),
            Target::Object(child) => {
                // The last duplicate wins whole: nothing of an earlier object survives.
                clear(&mut f, child);
                if s.peek() == Some(b'{') {
                    s.i += 1;
                    level = child;
                } else {
                    s.skip_value();
                }
            }
            Target::Skip => s.skip_value(),
        }
    }
    f
}

/// The objects whose members are read, outermost first.
#[derive(Clone, Copy, PartialEq, PartialOrd)]
enum Level {
    Event,
    Content,
    RelatesTo,
    InReplyTo,
}

impl Level {
    fn parent(self) -> Option<Level> {
        match self {
            Level::Event => None,
            Level::Content => Some(Level::Event),
            Level::RelatesTo => Some(Level::Content),
            Level::InReplyTo => Some(Level::RelatesTo),
        }
    }
}

enum Target<'f, 'a> {
    Str(&'f mut Option<Cow<'a, str>>),
    Ts,
    Object(Level),
    Skip,
}

fn target<'f, 'a>(f: &'f mut EventFields<'a>, level: Level, key: &[u8]) -> Target<'f, 'a> {
    use Target::*;
    match (level, key) {
        (Level::Event, b"type") => Str(&mut f.event_type),
        (Level::Event, b"event_id") => Str(&mut f.event_id),
        (Level::Event, b"sender") => Str(&mut f.sender),
        (Level::Event, b"origin_server_ts") => Ts,
        (Level::Event, b"state_key") => Str(&mut f.state_key),
        (Level::Event, b"redacts") => Str(&mut f.redacts),
        (Level::Event, b"content") => Object(Level::Content),
        (Level::Content, b"body") => Str(&mut f.body),
        (Level::Content, b"redacts") => Str(&mut f.content_redacts),
        (Level::Content, b"m.relates_to") => Object(Level::RelatesTo),
        (Level::RelatesTo, b"rel_type") => Str(&mut f.rel_type),
        (Level::RelatesTo, b"event_id") => Str(&mut f.rel_event_id),
        (Level::RelatesTo, b"key") => Str(&mut f.rel_key),
        (Level::RelatesTo, b"m.in_reply_to") => Object(Level::InReplyTo),
        (Level::InReplyTo, b"event_id") => Str(&mut f.in_reply_to),
        _ => Skip,
    }
}

/// Forgets every field read from `level` and the objects below it.
fn clear(f: &mut EventFields<'_>, level: Level) {
    if level <= Level::Content {
        f.body = None;
        f.content_redacts = None;
    }
    if level <= Level::RelatesTo {
        f.rel_type = None;
        f.rel_event_id = None;
        f.rel_key = None;
    }
    f.in_reply_to = None;
}

/// The text of a JSON string whose contents (between the quotes) are `inner`, its escapes
/// resolved; `None` for contents `serde_json` refuses (an unknown or cut escape, a lone
/// surrogate, a control character, a bare quote). Message bodies with a line break or a quote
/// take this path, so it is not left to serde_json's general one (a test holds the two equal).
pub(crate) fn unescape(inner: &str) -> Option<String> {
    let b = inner.as_bytes();
    let mut out = String::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let run_end = memchr::memchr(b'\\', b.get(i..)?).map_or(b.len(), |at| i + at);
        let run = inner.get(i..run_end)?;
        if run.bytes().any(|c| c < 0x20 || c == b'"') {
            return None;
        }
        out.push_str(run);
        i = run_end;
        if i == b.len() {
            break;
        }
        let escape = *b.get(i + 1)?;
        i += 2;
        out.push(match escape {
            b'"' => '"',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let unit = hex4(b.get(i..i + 4)?)?;
                i += 4;
                match unit {
                    0xd800..=0xdbff => {
                        if b.get(i..i + 2)? != b"\\u" {
                            return None;
                        }
                        let low = hex4(b.get(i + 2..i + 6)?)?;
                        if !(0xdc00..=0xdfff).contains(&low) {
                            return None;
                        }
                        i += 6;
                        char::from_u32(0x10000 + ((unit - 0xd800) << 10) + (low - 0xdc00))?
                    }
                    unit => char::from_u32(unit)?,
                }
            }
            _ => return None,
        });
    }
    Some(out)
}

/// Four hex digits as a number.
fn hex4(digits: &[u8]) -> Option<u32> {
    digits
        .iter()
        .try_fold(0, |n, &d| Some(n << 4 | char::from(d).to_digit(16)?))
}

/// The first `"` or `\` in `h`.
fn quote_or_backslash(h: &[u8]) -> Option<usize> {
    // Most strings (keys, ids) are short, where memchr's per-call dispatch costs more than the
    // search: check their first bytes a word at a time, and leave long ones to memchr's SIMD.
    const ONES: u64 = 0x0101_0101_0101_0101;
    const SHORT: usize = 32;
    let mut i = 0;
    while let Some(word) = h.get(i..i + 8).filter(|_| i < SHORT) {
        let w = u64::from_le_bytes(word.try_into().ok()?);
        let (q, b) = (w ^ (ONES * u64::from(b'"')), w ^ (ONES * u64::from(b'\\')));
        // High bit set in each byte that is zero (exact up to the first such byte).
        let hits = (q.wrapping_sub(ONES) & !q | b.wrapping_sub(ONES) & !b) & (ONES << 7);
        if hits != 0 {
            return Some(i + (hits.trailing_zeros() / 8) as usize);
        }
        i += 8;
    }
    memchr::memchr2(b'"', b'\\', h.get(i..)?).map(|at| i + at)
}

/// A JSON string's contents: `start..end` between the quotes, and whether it has escapes.
#[derive(Clone, Copy)]
struct Span {
    start: usize,
    end: usize,
    escaped: bool,
}

/// Invariant: `i <= src.len()`, so `&bytes[i..]` never fails (checked access all the same).
struct Scanner<'a> {
    src: &'a str,
    i: usize,
}

impl<'a> Scanner<'a> {
    fn rest(&self) -> &'a [u8] {
        self.src.as_bytes().get(self.i..).unwrap_or_default()
    }

    fn peek(&self) -> Option<u8> {
        self.src.as_bytes().get(self.i).copied()
    }

    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.i += 1;
        }
    }

    /// Skips the string opening at `i`; `None` if it is not closed.
    fn string(&mut self) -> Option<Span> {
        let start = self.i + 1;
        let len = self.src.len();
        self.i = start.min(len);
        let mut escaped = false;
        loop {
            let Some(at) = quote_or_backslash(self.rest()) else {
                self.i = len;
                return None;
            };
            let at = self.i + at;
            if self.src.as_bytes().get(at) == Some(&b'"') {
                self.i = at + 1;
                return Some(Span {
                    start,
                    end: at,
                    escaped,
                });
            }
            // The escaped byte can be neither a closing quote nor the start of another escape.
            escaped = true;
            self.i = (at + 2).min(len);
        }
    }

    /// A string's bytes as they are, escapes and all.
    fn raw(&self, span: Span) -> &'a [u8] {
        self.src
            .as_bytes()
            .get(span.start..span.end)
            .unwrap_or_default()
    }

    /// The unescaped text of a string; `None` when unescaping fails (say, a lone surrogate).
    #[inline]
    fn text(&self, span: Span) -> Option<Cow<'a, str>> {
        if span.escaped {
            self.unescape(span)
        } else {
            self.src.get(span.start..span.end).map(Cow::Borrowed)
        }
    }

    #[cold]
    fn unescape(&self, span: Span) -> Option<Cow<'a, str>> {
        unescape(self.src.get(span.start..span.end)?).map(Cow::Owned)
    }

    /// The value at `i` if it is a string, after skipping it whatever it is.
    fn string_value(&mut self) -> Option<Span> {
        if self.peek() == Some(b'"') {
            self.string()
        } else {
            self.skip_value();
            None
        }
    }

    /// The value at `i` if it is an integer literal that fits in `u64` (what
    /// `Value::as_u64` accepts), after skipping it whatever it is.
    fn u64_value(&mut self) -> Option<u64> {
        let start = self.i;
        let mut n = Some(0u64);
        while let Some(d @ b'0'..=b'9') = self.peek() {
            n = n
                .and_then(|n| n.checked_mul(10))
                .and_then(|n| n.checked_add(u64::from(d - b'0')));
            self.i += 1;
        }
        // A fraction or exponent makes it a float, even `1.0`; a minus sign makes it signed.
        if self.i == start || matches!(self.peek(), Some(b'.' | b'e' | b'E')) {
            self.skip_value();
            return None;
        }
        n
    }

    /// Skips one value of any kind, counting brackets instead of recursing.
    fn skip_value(&mut self) {
        let mut depth = 0usize;
        loop {
            match self.peek() {
                None => return,
                Some(b'"') => {
                    if self.string().is_none() || depth == 0 {
                        return;
                    }
                }
                Some(b'{' | b'[') => {
                    depth += 1;
                    self.i += 1;
                }
                Some(b'}' | b']') => {
                    if depth == 0 {
                        return; // not a value: leave it to the caller
                    }
                    depth -= 1;
                    self.i += 1;
                    if depth == 0 {
                        return;
                    }
                }
                Some(_) if depth > 0 => self.i += 1,
                // A number or literal: it ends at the first byte that cannot be part of it.
                Some(_) => {
                    while let Some(b'0'..=b'9' | b'a'..=b'z' | b'A'..=b'Z' | b'+' | b'-' | b'.') =
                        self.peek()
                    {
                        self.i += 1;
                    }
                    return;
                }
            }
        }
    }
}

// ---- the strict pass ----------------------------------------------------------------------------

/// Where a string field of an event lies, relative to the event's first byte: the text between
/// the quotes. `off == 0` (the event's `{`) means absent.
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub(crate) struct At {
    off: u16,
    len: u16,
}

/// Indices of the fields in [`Scanned`] (0-5) and in a list's table of rarer fields (6-11).
const TYPE: usize = 0;
const EVENT_ID: usize = 1;
const SENDER: usize = 2;
const STATE_KEY: usize = 3;
const BODY: usize = 4;
const TS: usize = 5;
const REDACTS: usize = 6;
const CONTENT_REDACTS: usize = 7;
const REL_TYPE: usize = 8;
const REL_EVENT_ID: usize = 9;
const REL_KEY: usize = 10;
const IN_REPLY_TO: usize = 11;
/// Bits of `seen` for the objects descended into (a second one makes the event rescanned).
const SEEN_CONTENT: u16 = 1 << 12;
const SEEN_RELATES_TO: u16 = 1 << 13;
const SEEN_IN_REPLY_TO: u16 = 1 << 14;
/// Set in the flags of [`Strict::event_object`] when the fields cannot be kept (a duplicate or
/// escaped key where fields are read, an offset past 64 KiB): the event is read again with
/// [`event_fields`] when it is delivered.
const RESCAN: u16 = 1 << 15;

/// One event of a list as the strict pass left it: its place in the body and where its fields
/// are, in 28 bytes (a 100 MB initial sync has some 250,000 events), read into
/// [`EventFields`] when it is delivered. Whatever does not fit (an event of 64 KiB or more, a
/// type, id, sender or state key of over 127 bytes, a body of 32 KiB or more) is found again
/// then: the event's end by the strict pass, its fields by [`event_fields`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct Scanned {
    start: u32,
    /// The event's length, or [`LONG`].
    len: u16,
    /// 0: no rarer fields; [`NOT_KEPT`]: no fields kept; else 1 + the index of its rarer fields
    /// in its list's table.
    rare: u16,
    /// Where `type`, `event_id`, `sender`, `state_key`, `content.body`, `origin_server_ts` are.
    off: [u16; 6],
    /// The lengths of `type`, `event_id`, `sender`, `state_key` and `origin_server_ts`; the
    /// high bit is set for a string with escapes.
    short: [u8; 5],
    /// The length of `content.body`; the high bit is set for a string with escapes.
    body_len: u16,
}

/// [`Scanned::len`] of an event of 64 KiB or more.
const LONG: u16 = u16::MAX;
/// [`Scanned::rare`] of an event whose fields are read again when it is delivered.
const NOT_KEPT: u16 = u16::MAX;

/// The rarer fields of one event (redactions and relations, indices 6-11) and which of them
/// have escapes (bit `i - 6`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Rare {
    at: [At; 6],
    escaped: u8,
}

impl Scanned {
    /// The event's JSON in `body`.
    #[inline]
    pub(crate) fn json<'a>(&self, body: &'a str) -> &'a str {
        let start = self.start as usize;
        let end = if self.len == LONG {
            // Checked before, so the strict pass takes it again.
            let mut s = Strict {
                src: body,
                i: start,
            };
            s.skip_value().map_or(start, |()| s.i)
        } else {
            start + self.len as usize
        };
        body.get(start..end).unwrap_or_default()
    }

    /// Keeps the fields found (`at`, with escapes where `flags` says) if they fit.
    fn keep(&mut self, at: &[At; 12], flags: u16, rare: &mut Vec<Rare>) {
        let escaped = |field: usize| flags >> field & 1 == 1;
        for (n, field) in [TYPE, EVENT_ID, SENDER, STATE_KEY, TS]
            .into_iter()
            .enumerate()
        {
            let Some(len) = u8::try_from(at[field].len).ok().filter(|&len| len < 0x80) else {
                return;
            };
            self.short[n] = len | u8::from(escaped(field)) << 7;
        }
        if at[BODY].len >= 0x8000 {
            return;
        }
        self.body_len = at[BODY].len | u16::from(escaped(BODY)) << 15;
        for field in [TYPE, EVENT_ID, SENDER, STATE_KEY, BODY, TS] {
            self.off[field] = at[field].off;
        }
        self.rare = 0;
        if at[6..].iter().any(|a| a.off != 0) {
            let mut r = Rare {
                at: [At::default(); 6],
                escaped: (flags >> 6 & 0x3f) as u8,
            };
            r.at.copy_from_slice(&at[6..]);
            rare.push(r);
            self.rare = u16::try_from(rare.len())
                .ok()
                .filter(|&n| n != NOT_KEPT)
                .unwrap_or(NOT_KEPT);
        }
    }

    /// The fields of the event whose JSON is `json` (from [`Scanned::json`]).
    pub(crate) fn fields<'a>(&self, json: &'a str, rare: &[Rare]) -> EventFields<'a> {
        if self.rare == NOT_KEPT {
            return event_fields(json);
        }
        let text = |off: u16, len: usize, escaped: bool| -> Option<Cow<'a, str>> {
            if off == 0 {
                return None;
            }
            let (start, end) = (off as usize, off as usize + len);
            if escaped {
                unescape(json.get(start..end)?).map(Cow::Owned)
            } else {
                json.get(start..end).map(Cow::Borrowed)
            }
        };
        let short = |field: usize, n: usize| {
            let len = self.short[n];
            text(self.off[field], usize::from(len & 0x7f), len & 0x80 != 0)
        };
        let mut f = EventFields {
            event_type: short(TYPE, 0),
            event_id: short(EVENT_ID, 1),
            sender: short(SENDER, 2),
            state_key: short(STATE_KEY, 3),
            origin_server_ts: short(TS, 4).and_then(|digits| {
                digits.bytes().try_fold(0u64, |n, d| {
                    n.checked_mul(10)?
                        .checked_add(u64::from(d.wrapping_sub(b'0')))
                })
            }),
            body: text(
                self.off[BODY],
                usize::from(self.body_len & 0x7fff),
                self.body_len & 0x8000 != 0,
            ),
            ..EventFields::default()
        };
        if let Some(r) = (self.rare as usize)
            .checked_sub(1)
            .and_then(|i| rare.get(i))
        {
            let at = |field: usize| {
                let n = field - 6;
                let at = r.at[n];
                text(at.off, usize::from(at.len), r.escaped >> n & 1 == 1)
            };
            f.redacts = at(REDACTS);
            f.content_redacts = at(CONTENT_REDACTS);
            f.rel_type = at(REL_TYPE);
            f.rel_event_id = at(REL_EVENT_ID);
            f.rel_key = at(REL_KEY);
            f.in_reply_to = at(IN_REPLY_TO);
        }
        f
    }
}

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGH: u64 = ONES << 7;
/// The index of the first quote, backslash or control character in `b` from `i` on
/// (`b.len()` if none): sixteen bytes at a time with SSE2 on x86-64 (part of its baseline, so
/// every build has it; `safe_arch` keeps it free of `unsafe`), eight at a time elsewhere and
/// for the last bytes. (memchr's search for the quote with a check for control characters
/// behind it, and an auto-vectorized 32-byte check, were measured slower: most strings are
/// under 100 bytes, where a search that finds the byte at once is what pays.)
#[inline]
fn next_special(b: &[u8], mut i: usize) -> usize {
    #[cfg(target_arch = "x86_64")]
    while let Some(chunk) = b.get(i..i + 16).and_then(|c| <[u8; 16]>::try_from(c).ok()) {
        let hits = special_bytes(chunk);
        if hits != 0 {
            return i + hits.trailing_zeros() as usize;
        }
        i += 16;
    }
    while let Some(chunk) = b.get(i..i + 8).and_then(|c| <[u8; 8]>::try_from(c).ok()) {
        let w = u64::from_le_bytes(chunk);
        // High bit set in each byte below 0x20, or equal to `"` or `\` (exact up to the
        // first such byte, which is all that is used).
        let ctrl = w.wrapping_sub(ONES * 0x20) & !w;
        let q = w ^ (ONES * u64::from(b'"'));
        let q = q.wrapping_sub(ONES) & !q;
        let e = w ^ (ONES * u64::from(b'\\'));
        let e = e.wrapping_sub(ONES) & !e;
        let hits = (ctrl | q | e) & HIGH;
        if hits != 0 {
            return i + (hits.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while let Some(&byte) = b.get(i) {
        if byte == b'"' || byte == b'\\' || byte < 0x20 {
            return i;
        }
        i += 1;
    }
    i
}

/// Bit `k` set when byte `k` of `chunk` is a quote, a backslash or below 0x20.
#[cfg(target_arch = "x86_64")]
#[inline]
fn special_bytes(chunk: [u8; 16]) -> u32 {
    use safe_arch::{
        cmp_eq_mask_i8_m128i as eq, m128i, min_u8_m128i, move_mask_i8_m128i,
        set_splat_i8_m128i as splat,
    };
    let v = m128i::from(chunk);
    let quote = eq(v, splat(b'"' as i8));
    let backslash = eq(v, splat(b'\\' as i8));
    // Below 0x20 (unsigned) exactly when the minimum with 0x1f is the byte itself.
    let control = eq(min_u8_m128i(v, splat(0x1f)), v);
    move_mask_i8_m128i(quote | backslash | control) as u32
}

/// A strict reader of JSON: every value it accepts, `serde_json` accepts too (RFC 8259: no
/// control characters in strings, only the defined escapes, the number grammar, no trailing
/// commas). It gives up (`None`) on anything it does not accept, and also on nesting deeper
/// than 64 levels, which `serde_json` would accept: callers then take `serde_json`'s path,
/// which has the last word. The input is a `&str`, so UTF-8 is already checked.
pub(crate) struct Strict<'a> {
    pub(crate) src: &'a str,
    pub(crate) i: usize,
}

impl<'a> Strict<'a> {
    #[inline]
    pub(crate) fn peek(&self) -> Option<u8> {
        self.src.as_bytes().get(self.i).copied()
    }

    #[inline]
    pub(crate) fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.i += 1;
        }
    }

    /// Consumes `byte` (after whitespace), or gives up.
    #[inline]
    pub(crate) fn expect(&mut self, byte: u8) -> Option<()> {
        self.ws();
        if self.peek() != Some(byte) {
            return None;
        }
        self.i += 1;
        Some(())
    }

    /// The string opening at `i` (which must be `"`): its contents (between the quotes, escapes
    /// as they are), and whether it has escapes.
    #[inline]
    pub(crate) fn string(&mut self) -> Option<(&'a [u8], bool)> {
        let b = self.src.as_bytes();
        if b.get(self.i) != Some(&b'"') {
            return None;
        }
        let start = self.i + 1;
        let mut i = start;
        let mut escaped = false;
        loop {
            i = next_special(b, i);
            match *b.get(i)? {
                b'"' => {
                    self.i = i + 1;
                    return Some((b.get(start..i)?, escaped));
                }
                b'\\' => {
                    escaped = true;
                    match *b.get(i + 1)? {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => i += 2,
                        b'u' => {
                            let hex = b.get(i + 2..i + 6)?;
                            if !hex.iter().all(u8::is_ascii_hexdigit) {
                                return None;
                            }
                            i += 6;
                        }
                        _ => return None,
                    }
                }
                0..=0x1f => return None,
                _ => i += 1,
            }
        }
    }

    /// The number at `i`; true when it is an integer with neither sign, fraction nor exponent.
    pub(crate) fn number(&mut self) -> Option<bool> {
        let b = self.src.as_bytes();
        let mut i = self.i;
        let negative = b.get(i) == Some(&b'-');
        i += usize::from(negative);
        let digits = |mut i: usize| {
            while let Some(b'0'..=b'9') = b.get(i) {
                i += 1;
            }
            i
        };
        match b.get(i)? {
            b'0' => i += 1,
            b'1'..=b'9' => i = digits(i + 1),
            _ => return None,
        }
        let mut plain = !negative;
        if b.get(i) == Some(&b'.') {
            let end = digits(i + 1);
            if end == i + 1 {
                return None;
            }
            (i, plain) = (end, false);
        }
        if let Some(b'e' | b'E') = b.get(i) {
            i += 1;
            if let Some(b'+' | b'-') = b.get(i) {
                i += 1;
            }
            let end = digits(i);
            if end == i {
                return None;
            }
            (i, plain) = (end, false);
        }
        // A digit right after is a second leading zero ("01"): the caller would refuse it as
        // no separator, as serde_json does.
        self.i = i;
        Some(plain)
    }

    pub(crate) fn literal(&mut self, word: &[u8]) -> Option<()> {
        if self.src.as_bytes().get(self.i..self.i + word.len())? != word {
            return None;
        }
        self.i += word.len();
        Some(())
    }

    /// A scalar value, or the opening of a container (returned, `i` past it).
    #[inline]
    fn scalar_or_open(&mut self) -> Option<Option<u8>> {
        match self.peek()? {
            b'"' => self.string().map(|_| None),
            open @ (b'{' | b'[') => {
                self.i += 1;
                Some(Some(open))
            }
            b't' => self.literal(b"true").map(|_| None),
            b'f' => self.literal(b"false").map(|_| None),
            b'n' => self.literal(b"null").map(|_| None),
            b'-' | b'0'..=b'9' => self.number().map(|_| None),
            _ => None,
        }
    }

    /// After `{` (and whitespace): the next key and its colon, `i` at the value.
    #[inline]
    pub(crate) fn key(&mut self) -> Option<(&'a [u8], bool)> {
        let key = self.string()?;
        self.expect(b':')?;
        self.ws();
        Some(key)
    }

    /// Skips one value (at `i`, whitespace before it skipped), checking it strictly.
    pub(crate) fn skip_value(&mut self) -> Option<()> {
        // One bit per open container, 1 for an object.
        let mut stack = 0u64;
        let mut depth = 0u32;
        loop {
            // A value.
            if let Some(open) = self.scalar_or_open()? {
                self.ws();
                let close = if open == b'{' { b'}' } else { b']' };
                if self.peek() == Some(close) {
                    self.i += 1;
                } else {
                    if depth == 64 {
                        return None;
                    }
                    stack = stack << 1 | u64::from(open == b'{');
                    depth += 1;
                    if open == b'{' {
                        self.key()?;
                    }
                    continue;
                }
            }
            // After a value: close what ends here.
            loop {
                if depth == 0 {
                    return Some(());
                }
                self.ws();
                let object = stack & 1 == 1;
                match self.peek()? {
                    b',' => {
                        self.i += 1;
                        self.ws();
                        if object {
                            self.key()?;
                        }
                        break;
                    }
                    b'}' if object => {}
                    b']' if !object => {}
                    _ => return None,
                }
                self.i += 1;
                stack >>= 1;
                depth -= 1;
            }
        }
    }

    /// One event of a list (at `i`, whitespace skipped), checked strictly and its fields noted.
    pub(crate) fn event(&mut self, rare: &mut Vec<Rare>) -> Option<Scanned> {
        let start = self.i;
        let mut scanned = Scanned {
            start: u32::try_from(start).ok()?,
            len: 0,
            rare: NOT_KEPT,
            off: [0; 6],
            short: [0; 5],
            body_len: 0,
        };
        if self.peek() == Some(b'{') {
            let mut at = [At::default(); 12];
            let mut flags = 0;
            self.event_object(start, &mut at, &mut flags)?;
            if flags & RESCAN == 0 {
                scanned.keep(&at, flags, rare);
            }
        } else {
            self.skip_value()?;
        }
        scanned.len = u16::try_from(self.i - start)
            .ok()
            .filter(|&len| len != LONG)
            .unwrap_or(LONG);
        Some(scanned)
    }

    fn event_object(&mut self, start: usize, at: &mut [At; 12], flags: &mut u16) -> Option<()> {
        self.i += 1;
        self.ws();
        let mut level = Level::Event;
        let mut seen = 0u16;
        let mut empty = self.peek() == Some(b'}');
        loop {
            if !empty {
                let (key, escaped) = self.key()?;
                let target = if escaped {
                    *flags |= RESCAN;
                    Field::Skip
                } else {
                    field(level, key)
                };
                match target {
                    Field::Str(n) | Field::Ts(n) => {
                        if seen & (1 << n) != 0 {
                            *flags |= RESCAN;
                        }
                        seen |= 1 << n;
                        let value_start = self.i;
                        let kept = match (target, self.peek()) {
                            (Field::Str(_), Some(b'"')) => {
                                let (text, escaped) = self.string()?;
                                *flags |= u16::from(escaped) << n;
                                Some((value_start + 1, text.len()))
                            }
                            (Field::Ts(_), Some(b'0'..=b'9')) => {
                                let plain = self.number()?;
                                plain.then_some((value_start, self.i - value_start))
                            }
                            _ => {
                                self.skip_value()?;
                                None
                            }
                        };
                        at[n] = At::default();
                        if let Some((off, len)) = kept {
                            match (u16::try_from(off - start), u16::try_from(len)) {
                                (Ok(off), Ok(len)) => at[n] = At { off, len },
                                _ => *flags |= RESCAN,
                            }
                        }
                    }
                    Field::Object(child, bit) => {
                        if seen & bit != 0 {
                            *flags |= RESCAN;
                        }
                        seen |= bit;
                        if self.peek() == Some(b'{') {
                            self.i += 1;
                            self.ws();
                            if self.peek() != Some(b'}') {
                                level = child;
                                continue;
                            }
                            self.i += 1;
                        } else {
                            self.skip_value()?;
                        }
                    }
                    Field::Skip => self.skip_value()?,
                }
            }
            empty = false;
            // After a member: the next one, or the end of this object and of those it ends.
            loop {
                self.ws();
                match self.peek()? {
                    b',' => {
                        self.i += 1;
                        self.ws();
                        break;
                    }
                    b'}' => {
                        self.i += 1;
                        match level.parent() {
                            Some(parent) => level = parent,
                            None => return Some(()),
                        }
                    }
                    _ => return None,
                }
            }
        }
    }
}

/// What the strict pass does with a member of an event (or of the objects read inside it).
#[derive(Clone, Copy)]
enum Field {
    Str(usize),
    Ts(usize),
    Object(Level, u16),
    Skip,
}

fn field(level: Level, key: &[u8]) -> Field {
    use Field::*;
    match (level, key) {
        (Level::Event, b"type") => Str(TYPE),
        (Level::Event, b"event_id") => Str(EVENT_ID),
        (Level::Event, b"sender") => Str(SENDER),
        (Level::Event, b"origin_server_ts") => Ts(TS),
        (Level::Event, b"state_key") => Str(STATE_KEY),
        (Level::Event, b"redacts") => Str(REDACTS),
        (Level::Event, b"content") => Object(Level::Content, SEEN_CONTENT),
        (Level::Content, b"body") => Str(BODY),
        (Level::Content, b"redacts") => Str(CONTENT_REDACTS),
        (Level::Content, b"m.relates_to") => Object(Level::RelatesTo, SEEN_RELATES_TO),
        (Level::RelatesTo, b"rel_type") => Str(REL_TYPE),
        (Level::RelatesTo, b"event_id") => Str(REL_EVENT_ID),
        (Level::RelatesTo, b"key") => Str(REL_KEY),
        (Level::RelatesTo, b"m.in_reply_to") => Object(Level::InReplyTo, SEEN_IN_REPLY_TO),
        (Level::InReplyTo, b"event_id") => Str(IN_REPLY_TO),
        _ => Skip,
    }
}

/// The strict pass over one event alone: its fields when it is accepted (and nothing follows
/// it), `None` when it gives up. For the tests and the `scan_fields` fuzz target, which check
/// that an accepted event is one `serde_json` accepts, with the fields [`event_fields`] reads.
#[cfg(any(test, fuzzing))]
pub fn strict_event_fields(json: &str) -> Option<EventFields<'_>> {
    let mut s = Strict { src: json, i: 0 };
    let mut rare = Vec::new();
    s.ws();
    let scanned = s.event(&mut rare)?;
    s.ws();
    if s.i != json.len() {
        return None;
    }
    Some(scanned.fields(scanned.json(json), &rare))
}

/// The semantics, read off a `serde_json::Value` independently of the scanner: what the tests
/// and the `scan_fields` fuzz target compare it with.
#[cfg(any(test, fuzzing))]
pub fn reference_fields(v: &serde_json::Value) -> EventFields<'static> {
    let at = |path: &[&str]| -> Option<Cow<'static, str>> {
        let mut v = v;
        for key in path {
            v = v.as_object()?.get(*key)?;
        }
        v.as_str().map(|s| Cow::Owned(s.to_owned()))
    };
    EventFields {
        event_type: at(&["type"]),
        event_id: at(&["event_id"]),
        sender: at(&["sender"]),
        origin_server_ts: v
            .get("origin_server_ts")
            .and_then(serde_json::Value::as_u64),
        state_key: at(&["state_key"]),
        redacts: at(&["redacts"]),
        body: at(&["content", "body"]),
        content_redacts: at(&["content", "redacts"]),
        rel_type: at(&["content", "m.relates_to", "rel_type"]),
        rel_event_id: at(&["content", "m.relates_to", "event_id"]),
        rel_key: at(&["content", "m.relates_to", "key"]),
        in_reply_to: at(&["content", "m.relates_to", "m.in_reply_to", "event_id"]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::Value;

    fn check(json: &str) -> EventFields<'_> {
        let v: Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("{json}: {e}"));
        let got = event_fields(json);
        assert_eq!(got, reference_fields(&v), "{json}");
        got
    }

    #[test]
    fn tricky_cases() {
        let cases = [
            "{}",
            " { } ",
            "[]",
            r#"[{"type":"a"}]"#,
            r#""type""#,
            "42",
            "null",
            r#"{"type":null,"event_id":5,"sender":true,"state_key":{},"redacts":[]}"#,
            r#"{"type":"m.room.message","event_id":"$e","sender":"@a:b","state_key":"","redacts":"$r"}"#,
            // escapes in keys and values
            r#"{"ty\u0070e":"x","\u0073ender":"\u0040a:b","event_id":"\"$e\\"}"#,
            r#"{"type":"a\\","body":"\\\""}"#,
            r#"{"type":"\\\\\"\\"}"#,
            r#"{"type":"\ud83d\ude00 \u00e9 \n\t\/","event_id":"é😀"}"#,
            r#"{"type\\":"no","typ":"no","Type":"no","type ":"no"}"#,
            r#"{"content":{"b\u006fdy":"x","m.relates\u005fto":{"k\u0065y":"\ud83d\udc4d"}}}"#,
            // duplicates
            r#"{"type":"a","type":"b"}"#,
            r#"{"type":"a","type":5}"#,
            r#"{"origin_server_ts":5,"origin_server_ts":"5"}"#,
            r#"{"content":{"body":"a","redacts":"$r"},"content":5}"#,
            r#"{"content":{"body":"a","m.relates_to":{"rel_type":"x"}},"content":{"redacts":"$r"}}"#,
            r#"{"content":{"m.relates_to":{"m.in_reply_to":{"event_id":"$a"},"key":"k"},"m.relates_to":{"rel_type":"r"}}}"#,
            r#"{"content":{"m.relates_to":{"m.in_reply_to":{"event_id":"$a"},"m.in_reply_to":[]}}}"#,
            r#"{"content":{"body":"a"},"content":{"body":"b"}}"#,
            // non-object containers
            r#"{"content":"body","m.relates_to":{"rel_type":"x"}}"#,
            r#"{"content":{"m.relates_to":null,"body":"b"}}"#,
            r#"{"content":{"m.relates_to":{"m.in_reply_to":"$x","event_id":"$y"}}}"#,
            r#"{"content":[{"body":"no"}],"type":"t"}"#,
            // keys at the wrong depth
            r#"{"unsigned":{"type":"no","event_id":"no","content":{"body":"no"}},"type":"yes"}"#,
            r#"{"content":{"x":{"body":"no"},"list":[{"body":"no"},["body"]],"body":"yes"}}"#,
            r#"{"content":{"event_id":"no","rel_type":"no"},"body":"no","rel_type":"no"}"#,
            r#"{"content":{"m.relates_to":{"x":{"event_id":"no"},"rel_type":"r","event_id":"$e","key":"k"}}}"#,
            r#"{"content":{"m.relates_to":{"m.in_reply_to":{"event_id":"$a","x":[{"event_id":"no"}]}}},"event_id":"$top"}"#,
            r#"{"a":[[[{"type":"no"}]],{"}":"]"}],"b":"}]{[","type":"yes","c":{"d":"\"}"}}"#,
            // numbers
            r#"{"origin_server_ts":0}"#,
            r#"{"origin_server_ts":1700000000000}"#,
            r#"{"origin_server_ts":18446744073709551615}"#,
            r#"{"origin_server_ts":18446744073709551616}"#,
            r#"{"origin_server_ts":99999999999999999999999}"#,
            r#"{"origin_server_ts":-0}"#,
            r#"{"origin_server_ts":-1}"#,
            r#"{"origin_server_ts":1.0}"#,
            r#"{"origin_server_ts":1e3}"#,
            r#"{"origin_server_ts":1E+3,"type":"t"}"#,
            r#"{"origin_server_ts":0.5e-3}"#,
            r#"{"origin_server_ts":"1"}"#,
            r#"{"origin_server_ts":[1]}"#,
            r#"{"origin_server_ts":null}"#,
            r#"{"x":-1.5e+10,"y":true,"z":false,"w":null,"origin_server_ts":7}"#,
            // whitespace everywhere
            concat!(
                " \r\n\t{ \"type\" \n:\t\"a\" ,\r\n \"content\" : { \"body\" : \"b\" ,",
                " \"m.relates_to\" : { \"rel_type\" : \"r\" , \"event_id\" : \"$e\" ,",
                " \"m.in_reply_to\" : { \"event_id\" : \"$i\" } } } , \"origin_server_ts\" : 12 } \n",
            ),
            "{\"origin_server_ts\":12\n,\"content\":{}\t}",
        ];
        for json in cases {
            check(json);
        }
    }

    #[test]
    fn borrows_unescaped_strings() {
        let json = r#"{"type":"m.room.message","sender":"@a\u003ab","content":{"body":"hi",
            "m.relates_to":{"rel_type":"m.annotation","event_id":"$e","key":"👍",
            "m.in_reply_to":{"event_id":"$r"}}}}"#;
        let f = check(json);
        for s in [
            &f.event_type,
            &f.body,
            &f.rel_type,
            &f.rel_event_id,
            &f.rel_key,
        ] {
            assert!(matches!(s, Some(Cow::Borrowed(_))), "{s:?}");
        }
        assert!(matches!(f.in_reply_to, Some(Cow::Borrowed("$r"))));
        assert_eq!(f.sender, Some(Cow::Owned::<str>("@a:b".into())));
    }

    #[test]
    fn fixtures() {
        for (name, text) in [
            (
                "initial",
                include_str!("../tests/fixtures/synapse-initial.json"),
            ),
            (
                "incremental",
                include_str!("../tests/fixtures/synapse-incremental.json"),
            ),
            (
                "leave",
                include_str!("../tests/fixtures/synapse-leave.json"),
            ),
        ] {
            let v: Value = serde_json::from_str(text).expect("json");
            let mut seen = 0;
            each_object(&v, &mut |o| {
                let json = serde_json::to_string_pretty(o).expect("json");
                check(&json);
                check(&serde_json::to_string(o).expect("json"));
                seen += 1;
            });
            assert!(seen > 10, "{name}");
        }
    }

    fn each_object(v: &Value, f: &mut impl FnMut(&Value)) {
        match v {
            Value::Object(o) => {
                f(v);
                o.values().for_each(|v| each_object(v, f));
            }
            Value::Array(a) => a.iter().for_each(|v| each_object(v, f)),
            _ => {}
        }
    }

    #[test]
    fn quote_search_at_every_offset() {
        for len in 0..100 {
            for at in 0..=len {
                for hit in [b'"', b'\\'] {
                    let mut h = vec![b'a'; len];
                    if let Some(b) = h.get_mut(at) {
                        *b = hit;
                    }
                    // High bytes and 0x01 around the hit must not fool the word-at-a-time test.
                    h.extend_from_slice(b"\x01\x80\"");
                    if let Some(b) = at.checked_sub(1).and_then(|i| h.get_mut(i)) {
                        *b = 0x01;
                    }
                    let want = h.iter().position(|&b| b == b'"' || b == b'\\');
                    assert_eq!(quote_or_backslash(&h), want, "{len} {at}");
                }
            }
        }
    }

    #[test]
    fn unescapable_string_is_none() {
        let f = event_fields(r#"{"type":"\ud800","body":"x","event_id":"$e","\udc00":1}"#);
        assert_eq!(f.event_type, None);
        assert_eq!(f.event_id.as_deref(), Some("$e"));
    }

    #[test]
    fn truncated_inputs() {
        let events = [
            concat!(
                r#"{"type":"m.room.message","event_id":"$e\"x","origin_server_ts":123,"#,
                r#""content":{"body":"a\\","m.relates_to":{"rel_type":"r","#,
                r#""m.in_reply_to":{"event_id":"$i"}}},"unsigned":{"a":[1,{"b":"}"}]}}"#,
            ),
            "{ \"type\" : \"é😀\\u00e9\" , \"content\" : [ { } ] , \"origin_server_ts\" : -1.5e3 }",
        ];
        for event in events {
            for end in 0..=event.len() {
                if let Some(prefix) = event.get(..end) {
                    event_fields(prefix);
                }
                if let Some(suffix) = event.get(end..) {
                    event_fields(suffix);
                }
            }
        }
    }

    #[test]
    fn garbage() {
        let inputs = [
            "",
            "{",
            "}",
            "{\"",
            "{\"\\",
            "{\"a\\\"",
            "{\"type\"",
            "{\"type\":",
            "{\"type\":}",
            "{:}",
            "{\"a\":1 \"type\":\"x\"}",
            "{\"content\":{}}}}}}",
            "{\"a\":]]]]]}",
            "{\"origin_server_ts\":-}",
            "{\"origin_server_ts\":99999999999999999999999999999999",
            "{\"type\":\"\\u12\"}",
            "{,,,,\"type\":\"x\",,}",
            "{\"a\":tru",
            "\u{0}{\u{ffff}",
        ];
        for input in inputs {
            event_fields(input);
        }
    }

    #[test]
    fn deep_nesting() {
        for unit in [
            "[",
            "{",
            "{\"a\":",
            "{\"content\":",
            "[\"",
            "{\"content\":{\"m.relates_to\":",
        ] {
            let deep = unit.repeat(100_000);
            event_fields(&deep);
            event_fields(&format!("{{\"x\":{deep}"));
            let closed = format!(
                "{{\"x\":{}{}, \"type\":\"t\"}}",
                "[".repeat(100_000),
                "]".repeat(100_000)
            );
            assert_eq!(event_fields(&closed).event_type.as_deref(), Some("t"));
        }
    }

    // ---- generated JSON ----------------------------------------------------------------------

    const NAMES: &[&str] = &[
        "type",
        "event_id",
        "sender",
        "origin_server_ts",
        "state_key",
        "redacts",
        "content",
        "body",
        "m.relates_to",
        "rel_type",
        "key",
        "m.in_reply_to",
        "unsigned",
    ];

    /// `s` as a JSON string literal, each char escaped as `\uXXXX` when its bit in `mask` is set.
    fn quote(s: &str, mask: u32) -> String {
        let mut out = String::from("\"");
        for (n, c) in s.chars().enumerate() {
            if mask >> (n % 32) & 1 == 1 {
                for unit in c.encode_utf16(&mut [0; 2]) {
                    out += format!("\\u{unit:04x}").as_str();
                }
            } else {
                match c {
                    '"' => out += "\\\"",
                    '\\' => out += "\\\\",
                    '\n' => out += "\\n",
                    '/' if n % 2 == 0 => out += "\\/",
                    c => out.push(c),
                }
            }
        }
        out + "\""
    }

    fn literal(text: impl Strategy<Value = String>) -> impl Strategy<Value = String> {
        // Mostly unescaped, as real events are.
        let mask = prop_oneof![3 => Just(0u32), 1 => any::<u32>()];
        (text, mask).prop_map(|(s, mask)| quote(&s, mask))
    }

    fn key() -> impl Strategy<Value = String> {
        let name = prop::sample::select(NAMES).prop_map(str::to_owned);
        literal(prop_oneof![4 => name, 1 => "[a-z_.\"\\\\]{0,5}"])
    }

    fn ws() -> impl Strategy<Value = String> {
        prop_oneof![3 => Just(String::new()), 1 => "[ \t\r\n]{1,3}"]
    }

    fn number() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<u64>().prop_map(|n| n.to_string()),
            (0u64..2_000_000_000_000).prop_map(|n| n.to_string()),
            any::<i64>().prop_map(|n| n.to_string()),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|f| f.to_string()),
            prop::sample::select(
                &[
                    "0",
                    "-0",
                    "1.0",
                    "1e3",
                    "1E+3",
                    "2e-1",
                    "-0.0",
                    "18446744073709551616",
                    "18446744073709551615",
                    "99999999999999999999999",
                    "0.5",
                    "-1",
                ][..]
            )
            .prop_map(str::to_owned),
        ]
    }

    const TEXT: &str = "[a-z$@:\"\\\\/é😀{}\\[\\],]{0,8}";

    fn value() -> impl Strategy<Value = String> {
        let leaf = prop_oneof![
            prop::sample::select(&["null", "true", "false"][..]).prop_map(str::to_owned),
            number(),
            literal(TEXT),
        ];
        leaf.prop_recursive(5, 64, 6, |inner| {
            prop_oneof![
                prop::collection::vec((ws(), inner.clone(), ws()), 0..5).prop_map(|items| {
                    let items: Vec<_> = items
                        .into_iter()
                        .map(|(a, v, b)| a + v.as_str() + b.as_str())
                        .collect();
                    format!("[{}]", items.join(","))
                }),
                object((key(), inner)),
            ]
        })
    }

    fn object(member: impl Strategy<Value = (String, String)>) -> impl Strategy<Value = String> {
        prop::collection::vec((ws(), member, ws(), ws(), ws()), 0..7).prop_map(|members| {
            let members: Vec<_> = members
                .into_iter()
                .map(|(a, (k, v), b, c, d)| format!("{a}{k}{b}:{c}{v}{d}"))
                .collect();
            format!("{{{}}}", members.join(","))
        })
    }

    /// The keys read at each level, and the key of the object below it.
    const LEVELS: [(&[&str], Option<&str>); 4] = [
        (
            &[
                "type",
                "event_id",
                "sender",
                "state_key",
                "redacts",
                "origin_server_ts",
            ],
            Some("content"),
        ),
        (&["body", "redacts"], Some("m.relates_to")),
        (&["rel_type", "event_id", "key"], Some("m.in_reply_to")),
        (&["event_id"], None),
    ];

    /// An object shaped like an event at `level` (or its content, relation...): its own keys,
    /// mostly with strings, the object of the next level, and arbitrary members, so that the
    /// deep fields and duplicates come up often.
    fn event(level: usize) -> BoxedStrategy<String> {
        let (names, child) = LEVELS[level];
        let scalar = prop_oneof![3 => literal(TEXT), 1 => number(), 1 => value()];
        let own = (
            literal(prop::sample::select(names).prop_map(str::to_owned)),
            scalar,
        );
        let other = (key(), value());
        match child {
            Some(name) => {
                let sub = prop_oneof![4 => event(level + 1), 1 => value()];
                let sub = (literal(Just(name.to_owned())), sub);
                object(prop_oneof![3 => own, 2 => sub, 2 => other]).boxed()
            }
            None => object(prop_oneof![3 => own, 2 => other]).boxed(),
        }
    }

    #[test]
    fn unescapes_as_serde_json_does() {
        for inner in [
            r"a\nb",
            r"\ud83d\ude00",
            r"\ud83d",
            r"\ude00",
            r"\ud83dx",
            r"\ud83d\u0041",
            r"\u00e9\/",
            r"\x",
            r"\",
            r"\u12",
            r"\u12g4",
            "tab\there",
            r#"q\"q"#,
            r"\b\f\r\t\\",
            r"\u0000",
        ] {
            let quoted = format!("\"{inner}\"");
            assert_eq!(
                unescape(inner),
                serde_json::from_str::<String>(&quoted).ok(),
                "{inner}"
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn unescape_matches_serde_json(s in any::<String>(), mask in any::<u32>(),
                                       junk in "(\\\\(u[0-9a-fA-F]{0,4}|[a-z\"/\\\\])|\"|[\x00-\x1f]){0,3}",
                                       at in any::<prop::sample::Index>()) {
            let quoted = quote(&s, mask);
            let mut inner = quoted[1..quoted.len() - 1].to_owned();
            let cut = (0..=inner.len()).filter(|&k| inner.is_char_boundary(k)).collect::<Vec<_>>();
            inner.insert_str(*at.get(&cut), &junk);
            let expected = serde_json::from_str::<String>(&format!("\"{inner}\"")).ok();
            prop_assert_eq!(unescape(&inner), expected);
        }

        #[test]
        fn matches_reference(json in prop_oneof![1 => value(), 6 => event(0)]) {
            let v: Value = serde_json::from_str(&json).expect("generated JSON is valid");
            prop_assert_eq!(event_fields(&json), reference_fields(&v), "{}", json);
            // The strict pass takes every generated event (none nests 64 deep) and notes the
            // same fields.
            prop_assert_eq!(strict_event_fields(&json), Some(reference_fields(&v)), "{}", json);
        }

        #[test]
        fn strict_pass_takes_only_what_serde_json_takes(json in event(0),
                cut in any::<prop::sample::Index>(), junk in "[\"\\\\{}\\[\\]:, a0-]{0,3}") {
            let at = cut.index(json.len() + 1);
            let at = (0..=at).rev().find(|&i| json.is_char_boundary(i)).unwrap_or(0);
            let (a, b) = json.split_at(at);
            for text in [a.to_owned(), format!("{a}{junk}{b}")] {
                // What serde_json takes as an event of a body: a `&RawValue` (which, unlike a
                // `Value`, lets lone surrogates through).
                if let Some(fields) = strict_event_fields(&text) {
                    if let Err(e) = serde_json::from_str::<&serde_json::value::RawValue>(&text) {
                        panic!("strict took what serde_json refuses ({e}): {text}");
                    }
                    prop_assert_eq!(fields, event_fields(&text), "{}", text);
                }
            }
        }

        #[test]
        fn never_panics(json in event(0), cut in any::<prop::sample::Index>(),
                        junk in "[\"\\\\{}\\[\\]:, a0-]{0,3}") {
            let at = cut.index(json.len() + 1);
            let at = (0..=at).rev().find(|&i| json.is_char_boundary(i)).unwrap_or(0);
            let (a, b) = json.split_at(at);
            event_fields(a);
            event_fields(&format!("{a}{junk}{b}"));
        }

        #[test]
        fn never_panics_on_strings(s in any::<String>()) {
            event_fields(&s);
        }
    }
}
