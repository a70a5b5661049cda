//! Sorting an HTTP response into success or one of the failure classes of the contract.

use std::time::Duration;

use http::header::RETRY_AFTER;
use http::{HeaderMap, StatusCode};

use crate::error::Failure;

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
        _ => bad_response(code, "unexpected status", body),
    };
    Err(failure)
}

/// A `BadResponse` failure carrying an excerpt of the body.
pub(crate) fn bad_response(status: u16, reason: impl Into<String>, body: &[u8]) -> Failure {
    Failure::BadResponse {
        status,
        reason: reason.into(),
        excerpt: excerpt(body),
    }
}

fn excerpt(body: &[u8]) -> String {
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
        let string = |key: &str| map.get(key).and_then(|v| v.as_str()).map(str::to_owned);
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
            ErrorClass::Fatal
        );
        assert_eq!(class(401, "{}"), ErrorClass::Fatal);
        assert_eq!(
            class(403, r#"{"errcode":"M_FORBIDDEN"}"#),
            ErrorClass::Fatal
        );
        assert_eq!(class(404, ""), ErrorClass::Fatal);
        assert_eq!(class(302, ""), ErrorClass::Transient);
        assert!(run(200, &[], "{}").is_ok());
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
