//! One HTTP/1.1 exchange as bytes: the request encoded by `ureq-proto`, the answer parsed out
//! of whatever bytes arrive, the body capped while it is read.

use std::time::Instant;

use ureq_proto::client::state::{RecvBody, RecvResponse};
use ureq_proto::client::{Call, RecvBodyResult, RecvResponseResult, SendRequestResult};
use ureq_proto::BodyMode;

use crate::{RequestId, TransportErrorKind, TransportFailure};

/// A response head larger than this is refused: a server that never ends its head must not
/// make the loop hold its bytes until the deadline.
pub(super) const MAX_HEAD_BYTES: usize = 64 * 1024;
/// More informational (1xx) answers than this before the response is a hostile server: each
/// costs a parse, and a stream of them would otherwise last until the deadline.
const MAX_INFORMATIONAL: u32 = 16;

/// One request on the wire: the encoded bytes, and ureq-proto's call reading the answer.
pub(super) struct Transfer {
    pub(super) id: RequestId,
    pub(super) deadline: Instant,
    pub(super) bytes: Vec<u8>,
    pub(super) written: usize,
    /// Bytes read and not yet consumed by the parser.
    input: Vec<u8>,
    /// Whether any byte of the answer arrived (a keep-alive race is retried only before).
    pub(super) answered: bool,
    /// Whether the request was already sent again once on a fresh connection.
    pub(super) retried: bool,
    /// Informational answers skipped so far.
    informational: u32,
    stage: Stage,
    head: Option<http::response::Parts>,
    body: Vec<u8>,
    max_body: u64,
}

enum Stage {
    Head(Call<RecvResponse>),
    Body(Call<RecvBody>),
    /// Between stages (only while a stage is being replaced).
    Moving,
}

/// A whole response, and whether its connection must be closed after it.
pub(super) type Whole = (http::Response<Vec<u8>>, bool);

impl Transfer {
    /// Encodes `request` (with `absolute_target`, the request line names the scheme and
    /// authority: the form an HTTP proxy expects for a plain `http://` target).
    pub(super) fn new(
        id: RequestId,
        request: &http::Request<Vec<u8>>,
        deadline: Instant,
        max_body: u64,
        absolute_target: bool,
    ) -> Result<Self, TransportFailure> {
        let (mut bytes, call) =
            encode(request).map_err(|e| TransportFailure::new(TransportErrorKind::Other, e))?;
        if absolute_target {
            absolute_form(&mut bytes, request.uri());
        }
        Ok(Self {
            id,
            deadline,
            bytes,
            written: 0,
            input: Vec::new(),
            answered: false,
            retried: false,
            informational: 0,
            stage: Stage::Head(call),
            head: None,
            body: Vec::new(),
            max_body,
        })
    }

    /// Starts the request over on a fresh connection (nothing of it was answered).
    pub(super) fn rewind(&mut self) {
        self.written = 0;
        self.retried = true;
    }

    /// Whether the body is being read and ends only with the connection.
    pub(super) fn close_delimited(&self) -> bool {
        matches!(&self.stage, Stage::Body(call) if call.body_mode() == BodyMode::CloseDelimited)
    }

    /// Whether the head was parsed and the body is being read.
    pub(super) fn in_body(&self) -> bool {
        matches!(self.stage, Stage::Body(_))
    }

    /// Takes `bytes` read from the connection: the response and whether the connection must
    /// be closed after it, once it is whole.
    pub(super) fn feed(&mut self, bytes: &[u8]) -> Result<Option<Whole>, TransportFailure> {
        self.answered = true;
        self.input.extend_from_slice(bytes);
        // Parsed from an offset, the bytes consumed removed once: linear in what came, however
        // many small answers (informational ones) it holds.
        let mut start = 0;
        let parsed = self.parse(&mut start);
        self.input.drain(..start.min(self.input.len()));
        parsed
    }

    fn parse(&mut self, start: &mut usize) -> Result<Option<Whole>, TransportFailure> {
        let bad =
            |e: ureq_proto::Error| TransportFailure::new(TransportErrorKind::Other, e.to_string());
        loop {
            match &mut self.stage {
                Stage::Head(call) => {
                    let input = &self.input[*start..];
                    let (used, response) = call.try_response(input, false).map_err(bad)?;
                    *start += used;
                    let Some(response) = response else {
                        if used == 0 {
                            if self.input.len() - *start > MAX_HEAD_BYTES {
                                return Err(TransportFailure::new(
                                    TransportErrorKind::Other,
                                    "the response head is larger than 64 KiB",
                                ));
                            }
                            return Ok(None);
                        }
                        // An informational answer was skipped.
                        self.informational += 1;
                        if self.informational > MAX_INFORMATIONAL {
                            return Err(TransportFailure::new(
                                TransportErrorKind::Other,
                                "more than 16 informational (1xx) answers",
                            ));
                        }
                        continue;
                    };
                    self.head = Some(response.into_parts().0);
                    let Stage::Head(call) = std::mem::replace(&mut self.stage, Stage::Moving)
                    else {
                        unreachable!("matched above")
                    };
                    match call.proceed() {
                        Some(RecvResponseResult::RecvBody(call)) => self.stage = Stage::Body(call),
                        Some(RecvResponseResult::Redirect(call)) => {
                            let close = call.must_close_connection();
                            return self.finish().map(|r| Some((r, close)));
                        }
                        Some(RecvResponseResult::Cleanup(call)) => {
                            let close = call.must_close_connection();
                            return self.finish().map(|r| Some((r, close)));
                        }
                        None => {
                            return Err(TransportFailure::new(
                                TransportErrorKind::Other,
                                "response head not complete",
                            ))
                        }
                    }
                }
                Stage::Body(call) => {
                    let mut chunk = [0u8; 16 * 1024];
                    while *start < self.input.len() {
                        let input = &self.input[*start..];
                        let (used, n) = call.read(input, &mut chunk).map_err(bad)?;
                        self.body.extend_from_slice(&chunk[..n]);
                        *start += used;
                        if self.body.len() as u64 > self.max_body {
                            return Err(TransportFailure::new(
                                TransportErrorKind::BodyTooLarge,
                                format!("the body is larger than {} bytes", self.max_body),
                            ));
                        }
                        if used == 0 && n == 0 {
                            break;
                        }
                    }
                    let ended = match call.body_mode() {
                        BodyMode::CloseDelimited => false,
                        _ => call.can_proceed(),
                    };
                    if !ended {
                        return Ok(None);
                    }
                    let Stage::Body(call) = std::mem::replace(&mut self.stage, Stage::Moving)
                    else {
                        unreachable!("matched above")
                    };
                    let close = match call.proceed() {
                        Some(RecvBodyResult::Cleanup(call)) => call.must_close_connection(),
                        Some(RecvBodyResult::Redirect(call)) => call.must_close_connection(),
                        None => true,
                    };
                    // Bytes after the answer were never asked for: do not reuse the socket.
                    let close = close || *start < self.input.len();
                    return self.finish().map(|r| Some((r, close)));
                }
                Stage::Moving => return Ok(None),
            }
        }
    }

    /// The whole response: the head parsed, the body read (for a body that ends with the
    /// connection, call it at the end of the stream).
    pub(super) fn finish(&mut self) -> Result<http::Response<Vec<u8>>, TransportFailure> {
        let head = self
            .head
            .take()
            .ok_or_else(|| TransportFailure::new(TransportErrorKind::Other, "no response head"))?;
        Ok(http::Response::from_parts(
            head,
            std::mem::take(&mut self.body),
        ))
    }
}

/// The request as bytes on the wire, and the ureq-proto call ready to read its answer.
pub(super) fn encode(
    request: &http::Request<Vec<u8>>,
) -> Result<(Vec<u8>, Call<RecvResponse>), String> {
    let body = request.body();
    let mut head = http::Request::builder()
        .method(request.method().clone())
        .uri(request.uri().clone());
    for (name, value) in request.headers() {
        head = head.header(name, value);
    }
    if !body.is_empty() && !request.headers().contains_key(http::header::CONTENT_LENGTH) {
        head = head.header(http::header::CONTENT_LENGTH, body.len());
    }
    let head = head.body(()).map_err(|e| e.to_string())?;
    let mut call = Call::new(head).map_err(|e| e.to_string())?.proceed();
    let mut buffer = vec![0u8; 16 * 1024];
    let mut bytes = Vec::new();
    while !call.can_proceed() {
        let n = call.write(&mut buffer).map_err(|e| e.to_string())?;
        bytes.extend_from_slice(&buffer[..n]);
    }
    let call = match call.proceed().map_err(|e| e.to_string())? {
        Some(SendRequestResult::RecvResponse(call)) => call,
        Some(SendRequestResult::SendBody(mut call)) => {
            let mut input = &body[..];
            while !call.can_proceed() {
                let (used, n) = call.write(input, &mut buffer).map_err(|e| e.to_string())?;
                bytes.extend_from_slice(&buffer[..n]);
                input = &input[used..];
                if used == 0 && n == 0 {
                    return Err("the request body could not be written".to_owned());
                }
            }
            call.proceed()
                .ok_or_else(|| "the request body was not complete".to_owned())?
        }
        Some(SendRequestResult::Await100(_)) => {
            return Err("Expect: 100-continue is not supported".to_owned())
        }
        None => return Err("the request head was not complete".to_owned()),
    };
    Ok((bytes, call))
}

/// Rewrites the request line `GET /path HTTP/1.1` to `GET http://host:port/path HTTP/1.1`.
fn absolute_form(bytes: &mut Vec<u8>, uri: &http::Uri) {
    let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
        return;
    };
    let Some(space) = bytes.iter().position(|&b| b == b' ') else {
        return;
    };
    let prefix = format!("{scheme}://{authority}");
    bytes.splice(space + 1..space + 1, prefix.into_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Config, SyncMachine};

    fn a_request() -> (RequestId, http::Request<Vec<u8>>, Instant) {
        let now = Instant::now();
        let mut machine =
            SyncMachine::new(Config::new("http://127.0.0.1:8008", "token"), now).unwrap();
        let request = machine.poll_request().unwrap();
        (request.id, request.http, request.deadline)
    }

    fn text(bytes: &[u8]) -> String {
        String::from_utf8_lossy(bytes).into_owned()
    }

    #[test]
    fn the_request_line_is_in_origin_form_or_absolute_form_for_a_proxy() {
        let (id, request, deadline) = a_request();
        let direct = Transfer::new(id, &request, deadline, 1024, false).unwrap();
        assert!(text(&direct.bytes).starts_with("GET /_matrix/client/v3/sync?"));
        let proxied = Transfer::new(id, &request, deadline, 1024, true).unwrap();
        let line = text(&proxied.bytes);
        assert!(
            line.starts_with("GET http://127.0.0.1:8008/_matrix/client/v3/sync?"),
            "{line}"
        );
        assert!(line.contains("\r\nhost: 127.0.0.1:8008\r\n"), "{line}");
    }

    #[test]
    fn a_response_in_pieces_is_whole_once_its_body_is() {
        let (id, request, deadline) = a_request();
        let mut transfer = Transfer::new(id, &request, deadline, 1024, false).unwrap();
        let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
        for byte in &answer[..answer.len() - 1] {
            assert!(transfer.feed(&[*byte]).unwrap().is_none());
        }
        let (response, close) = transfer.feed(&answer[answer.len() - 1..]).unwrap().unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.body(), b"hello");
        assert!(!close);
    }

    #[test]
    fn a_body_over_the_cap_fails_while_it_is_read() {
        let (id, request, deadline) = a_request();
        let mut transfer = Transfer::new(id, &request, deadline, 10, false).unwrap();
        let head = b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n";
        assert!(transfer.feed(head).unwrap().is_none());
        assert!(transfer.feed(&[b'x'; 10]).unwrap().is_none());
        let failure = transfer.feed(b"x").unwrap_err();
        assert_eq!(failure.kind, TransportErrorKind::BodyTooLarge);
    }

    #[test]
    fn a_head_that_never_ends_is_refused_past_its_cap() {
        let (id, request, deadline) = a_request();
        let mut transfer = Transfer::new(id, &request, deadline, 10, false).unwrap();
        assert!(transfer.feed(b"HTTP/1.1 200 OK\r\n").unwrap().is_none());
        let endless = format!("X-Long: {}\r\n", "a".repeat(1000));
        let mut failed = None;
        for _ in 0..100 {
            match transfer.feed(endless.as_bytes()) {
                Ok(None) => {}
                Ok(Some(_)) => panic!("no response can come of it"),
                Err(failure) => {
                    failed = Some(failure);
                    break;
                }
            }
        }
        assert_eq!(failed.expect("refused").kind, TransportErrorKind::Other);
    }

    #[test]
    fn an_endless_stream_of_informational_answers_is_refused() {
        let (id, request, deadline) = a_request();
        let mut transfer = Transfer::new(id, &request, deadline, 1024, false).unwrap();
        let one = b"HTTP/1.1 102 Processing\r\n\r\n";
        for _ in 0..16 {
            assert!(transfer.feed(one).unwrap().is_none());
        }
        assert_eq!(
            transfer.feed(one).unwrap_err().kind,
            TransportErrorKind::Other
        );
        // A few, then the answer, are fine.
        let mut transfer = Transfer::new(id, &request, deadline, 1024, false).unwrap();
        let answer =
            b"HTTP/1.1 102 Processing\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}";
        let (response, _) = transfer.feed(answer).unwrap().unwrap();
        assert_eq!(response.body(), b"{}");
    }

    #[test]
    fn a_close_delimited_body_ends_with_the_connection() {
        let (id, request, deadline) = a_request();
        let mut transfer = Transfer::new(id, &request, deadline, 1024, false).unwrap();
        assert!(transfer
            .feed(b"HTTP/1.1 200 OK\r\n\r\n{}")
            .unwrap()
            .is_none());
        assert!(transfer.close_delimited());
        assert_eq!(transfer.finish().unwrap().body(), b"{}");
    }
}
