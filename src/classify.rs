//! Sorting an HTTP response into success or one of the failure classes of the contract.

use std::time::Duration;

use http::header::{LOCATION, RETRY_AFTER};
use http::{HeaderMap, StatusCode};

use crate::error::Failure;
use crate::text::capped;

const EXCERPT_BYTES: usize = 256;

/// Classifies a response by status; a 2xx passes its body on for parsing.
pub(crate) fn classify<'b>(
    status: StatusCode,
    headers: &HeaderMap,
    body: &'b [u8],
) -> Result<&'b [u8], Failure> {
    let code = status.as_u16();
    if status.is_success() {
        return Ok(body);
    }
    let matrix = MatrixErrorBody::parse(body);
    let failure = match code {
        429 => Failure::RateLimited {
            retry_after: server_wait(headers, matrix.retry_after_ms),
            errcode: matrix.errcode,
            message: matrix.error,
        },
        401 if matrix.errcode.as_deref() == Some("M_UNKNOWN_TOKEN") => Failure::UnknownToken {
            soft_logout: matrix.soft_logout,
            message: matrix.error,
        },
        400..=499 => Failure::Refused {
            status: code,
            errcode: matrix.errcode,
            message: matrix.error,
        },
        500..=599 => Failure::Server {
            status: code,
            errcode: matrix.errcode,
            message: matrix.error,
        },
        300..=399 => Failure::Redirected {
            status: code,
            // Lossily, not `to_str`: a header may carry any byte above 0x7F, and the user
            // needs to see where the server points even when that is mangled.
            location: headers
                .get(LOCATION)
                .map(|v| capped(&String::from_utf8_lossy(v.as_bytes()))),
        },
        _ => bad_response(code, "unexpected status", body),
    };
    Err(failure)
}

/// A `BadResponse` failure carrying an excerpt of the body.
pub(crate) fn bad_response(status: u16, reason: impl Into<String>, body: &[u8]) -> Failure {
    Failure::BadResponse {
        status,
        // Parse errors quote the body ("invalid type: string \"…\""), as long as it is.
        reason: capped(&reason.into()),
        excerpt: excerpt(body),
    }
}

pub(crate) fn excerpt(body: &[u8]) -> String {
    let mut end = body.len().min(EXCERPT_BYTES);
    // Cut at a char boundary when the body is UTF-8, so the excerpt has no stray U+FFFD.
    while end > 0 && end < body.len() && (body[end] & 0xC0) == 0x80 {
        end -= 1;
    }
    String::from_utf8_lossy(&body[..end]).into_owned()
}

/// The larger of the `Retry-After` header (delta-seconds) and the body's `retry_after_ms`.
fn server_wait(headers: &HeaderMap, retry_after_ms: Option<u64>) -> Option<Duration> {
    let header = headers
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|secs| Duration::from_secs(secs.min(u32::MAX as u64)));
    let body = retry_after_ms.map(Duration::from_millis);
    header.max(body)
}

/// The standard Matrix error body. Every field is optional: proxies answer errors with HTML.
#[derive(Default)]
struct MatrixErrorBody {
    errcode: Option<String>,
    error: Option<String>,
    retry_after_ms: Option<u64>,
    soft_logout: bool,
}

impl MatrixErrorBody {
    fn parse(body: &[u8]) -> Self {
        let Ok(serde_json::Value::Object(map)) = serde_json::from_slice(body) else {
            return Self::default();
        };
        // Capped here, so no failure ever holds more of the server's text than the cap.
        let string = |key: &str| map.get(key).and_then(|v| v.as_str()).map(capped);
        Self {
            errcode: string("errcode"),
            error: string("error"),
            retry_after_ms: map.get("retry_after_ms").and_then(|v| {
                v.as_u64()
                    .or_else(|| v.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
            }),
            soft_logout: map
                .get("soft_logout")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorClass;

    fn run(code: u16, headers: &[(&str, &str)], body: &str) -> Result<Vec<u8>, Failure> {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        classify(StatusCode::from_u16(code).unwrap(), &map, body.as_bytes()).map(<[u8]>::to_vec)
    }

    #[test]
    fn retry_after_takes_the_larger_of_header_and_body() {
        let body = r#"{"errcode":"M_LIMIT_EXCEEDED","retry_after_ms":1500}"#;
        let Err(Failure::RateLimited { retry_after, .. }) = run(429, &[("retry-after", "3")], body)
        else {
            panic!()
        };
        assert_eq!(retry_after, Some(Duration::from_secs(3)));
        let Err(Failure::RateLimited { retry_after, .. }) = run(429, &[], body) else {
            panic!()
        };
        assert_eq!(retry_after, Some(Duration::from_millis(1500)));
        let Err(f) = run(
            429,
            &[("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT")],
            "nope",
        ) else {
            panic!()
        };
        assert_eq!(
            f,
            Failure::RateLimited {
                retry_after: None,
                errcode: None,
                message: None
            }
        );
    }

    #[test]
    fn statuses_map_to_classes() {
        let class = |code, body| run(code, &[], body).unwrap_err().class();
        assert_eq!(class(500, ""), ErrorClass::Transient);
        assert_eq!(
            class(502, "<html>bad gateway</html>"),
            ErrorClass::Transient
        );
        assert_eq!(class(503, "{}"), ErrorClass::Transient);
        assert_eq!(class(504, "x"), ErrorClass::Transient);
        assert_eq!(class(429, "{}"), ErrorClass::RateLimited);
        assert_eq!(
            class(401, r#"{"errcode":"M_UNKNOWN_TOKEN"}"#),
            ErrorClass::NeedsUser
        );
        assert_eq!(class(401, "{}"), ErrorClass::NeedsUser);
        assert_eq!(
            class(403, r#"{"errcode":"M_FORBIDDEN"}"#),
            ErrorClass::NeedsUser
        );
        assert_eq!(class(404, ""), ErrorClass::NeedsUser);
        assert_eq!(class(302, ""), ErrorClass::NeedsUser);
        assert_eq!(class(101, ""), ErrorClass::Transient);
        assert!(run(200, &[], "{}").is_ok());
    }

    fn matrix_error(errcode: &str, message: &str) -> String {
        let json = |s: &str| serde_json::to_string(s).unwrap();
        format!(
            r#"{{"errcode":{},"error":{}}}"#,
            json(errcode),
            json(message)
        )
    }

    #[test]
    fn a_huge_server_message_is_capped_in_display_and_debug() {
        let bounded = |failure: Failure, limit: usize| {
            let (display, debug) = (failure.to_string(), format!("{failure:?}"));
            assert!(display.len() <= limit, "{}", display.len());
            assert!(debug.len() <= limit, "{}", debug.len());
            assert!(display.contains("… [+"), "the cut is marked: {display}");
        };
        let huge = "x".repeat(20 << 20);
        bounded(
            run(500, &[], &matrix_error("M_UNKNOWN", &huge)).unwrap_err(),
            2048,
        );
        // Every variant built from the body, and the errcode too (shorter: parsing is slow).
        let long = &huge[..100_000];
        for code in [400, 403, 429, 503] {
            let two_cut_fields = 2 * 1024 + 128;
            bounded(
                run(code, &[], &matrix_error(long, long)).unwrap_err(),
                two_cut_fields,
            );
        }
        let Err(Failure::UnknownToken {
            message: Some(message),
            ..
        }) = run(401, &[], &matrix_error("M_UNKNOWN_TOKEN", long))
        else {
            panic!()
        };
        assert!(message.len() <= 1100 && message.ends_with(" bytes]"));
    }

    #[test]
    fn a_cut_server_message_keeps_whole_chars() {
        // The cap falls inside a two-byte char: the kept part is a true prefix of whole chars.
        let message = format!("a{}", "é".repeat(2000));
        let Err(Failure::Server {
            message: Some(kept),
            ..
        }) = run(500, &[], &matrix_error("M_UNKNOWN", &message))
        else {
            panic!()
        };
        let prefix = kept
            .strip_suffix(&format!("… [+{} bytes]", 4001 - 1023))
            .unwrap();
        assert_eq!(prefix.len(), 1023);
        assert!(message.starts_with(prefix));
        // Ordinary text is kept as it came.
        let Err(f) = run(
            403,
            &[],
            &matrix_error("M_FORBIDDEN", "Café 日本: can't \"join\""),
        ) else {
            panic!()
        };
        assert_eq!(
            f.to_string(),
            "request refused with 403 M_FORBIDDEN: Café 日本: can't \"join\""
        );
    }

    #[test]
    fn forged_lines_and_terminal_escapes_in_server_text_are_escaped() {
        let evil = "x\nstate: Live\x1b[2J\x1b]0;title\x07";
        let clean = |failure: &Failure| {
            let shown = failure.to_string();
            assert!(
                !shown
                    .bytes()
                    .any(|b| matches!(b, b'\n' | b'\r' | 0x1b | 0x07)),
                "{shown:?}"
            );
            assert!(
                shown.contains(r"x\nstate: Live\u{1b}[2J\u{1b}]0;title\u{7}"),
                "{shown}"
            );
            shown
        };
        for code in [400, 429, 500] {
            clean(&run(code, &[], &matrix_error(evil, evil)).unwrap_err());
        }
        let shown = clean(&run(502, &[], &matrix_error("M_UNKNOWN", evil)).unwrap_err());
        assert_eq!(
            shown,
            r"server error 502 M_UNKNOWN: x\nstate: Live\u{1b}[2J\u{1b}]0;title\u{7}"
        );
        // C1 and bidi controls, which a terminal or an editor would act on, are shown too.
        let sneaky = "a\u{85}b\u{9b}2Jc\u{202e}d\u{2066}e\u{2028}f";
        let shown = run(500, &[], &matrix_error("M_UNKNOWN", sneaky))
            .unwrap_err()
            .to_string();
        assert!(
            shown.ends_with(r": a\u{85}b\u{9b}2Jc\u{202e}d\u{2066}e\u{2028}f"),
            "{shown}"
        );
    }

    #[test]
    fn redirects_are_fatal_and_name_the_location() {
        for code in [300, 301, 302, 303, 304, 307, 308, 399] {
            let failure =
                run(code, &[("location", "https://matrix.example.org/")], "").unwrap_err();
            assert_eq!(
                failure,
                Failure::Redirected {
                    status: code,
                    location: Some("https://matrix.example.org/".to_owned())
                }
            );
            assert_eq!(failure.class(), ErrorClass::NeedsUser);
            assert_eq!(failure.status(), Some(code));
            assert_eq!(
                failure.to_string(),
                format!(
                    "the homeserver redirected ({code}) to \"https://matrix.example.org/\": \
                     set the homeserver URL to the final address"
                )
            );
        }
        let failure = run(301, &[], "<html>Moved</html>").unwrap_err();
        assert_eq!(
            failure,
            Failure::Redirected {
                status: 301,
                location: None
            }
        );
        assert!(failure
            .to_string()
            .contains("(301) without a Location header"));
    }

    #[test]
    fn a_location_header_is_capped_and_escaped() {
        let header = |bytes: &[u8]| {
            let mut map = HeaderMap::new();
            map.insert(LOCATION, http::HeaderValue::from_bytes(bytes).unwrap());
            classify(StatusCode::FOUND, &map, b"").unwrap_err()
        };
        // A header value may hold any byte above 0x7F: the UTF-8 of C1 and bidi controls.
        let shown = header("https://a.example/\u{85}\u{202e}\t\"x".as_bytes()).to_string();
        assert!(
            shown.contains(r#"to "https://a.example/\u{85}\u{202e}\t\"x":"#),
            "{shown}"
        );
        assert!(!shown.contains(['\u{85}', '\u{202e}', '\t']));
        // Bytes that are not UTF-8 are replaced, not dropped.
        let Failure::Redirected { location, .. } = header(b"/\xff") else {
            panic!()
        };
        assert_eq!(location.as_deref(), Some("/\u{FFFD}"));
        let long = format!("https://a.example/{}", "p".repeat(1 << 20));
        let failure = header(long.as_bytes());
        assert!(failure.to_string().len() <= 1200);
        assert!(format!("{failure:?}").len() <= 1200);
    }

    #[test]
    fn a_bad_response_reason_quoting_the_body_is_capped() {
        let body = "y\n".repeat(1 << 20);
        let failure = bad_response(200, format!("invalid type: string {body:?}"), b"");
        let shown = failure.to_string();
        assert!(shown.len() <= 2 * 1024 + 200, "{}", shown.len());
        assert!(!shown.contains('\n'));
        assert!(format!("{failure:?}").len() <= 2 * 1024 + 200);
    }

    #[test]
    fn excerpt_is_bounded_and_cut_on_a_char_boundary() {
        // The 256th byte falls inside a two-byte character: the cut moves back one byte.
        let body = format!("a{}", "é".repeat(300));
        let e = excerpt(body.as_bytes());
        assert_eq!(e.len(), EXCERPT_BYTES - 1);
        assert!(body.starts_with(&e));
        // On a boundary already, and shorter bodies, nothing is cut away.
        let body = "é".repeat(300);
        assert_eq!(excerpt(body.as_bytes()).len(), EXCERPT_BYTES);
        assert_eq!(excerpt("short é".as_bytes()), "short é");
        assert_eq!(excerpt(b""), "");
        // A body of nothing but continuation bytes gives an empty excerpt, not an underflow.
        assert_eq!(excerpt(&[0x80; 300]), "");
        // Bytes that are not UTF-8 are replaced, not dropped.
        assert_eq!(excerpt(b"\xff\xfe{"), "\u{FFFD}\u{FFFD}{");
    }
}
