//! What a token a server hands us must look like before the machine stores it or sends it
//! back: a position (`next_batch`, `prev_batch`, `end`) or a credential (the access and
//! refresh tokens of a refresh answer).
//!
//! Tokens are opaque, but the machine hands them back: in a query string or a header, to a
//! checkpoint or token file, to the application. A token that cannot make that round trip
//! byte for byte is refused where it arrives, as a bad response, so it is never stored and
//! never sent.
//!
//! One rule for both kinds ([`check`]): not empty, at most [`MAX_TOKEN_BYTES`], no control
//! character. A credential must also be visible ASCII ([`check_credential`]): it goes in an
//! `Authorization: Bearer` header, where a space or a non-ASCII byte would not arrive as sent.
//! Access tokens share the bound of `next_batch`: Synapse's and MAS's are under 100 bytes and
//! even a JWT carrying claims is one or two KiB, while a header line past 8 KiB is refused by
//! common proxies (nginx, Apache), so 4 KiB keeps every request they are in well within it.

/// The longest token accepted, in bytes, positions and credentials alike. Synapse's tokens are
/// under 100 bytes; a few KiB leaves room for any real server while keeping every URL and
/// header far below common limits (8 KiB).
pub const MAX_TOKEN_BYTES: usize = 4096;

/// Why a token was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TokenProblem {
    Empty,
    TooLong,
    ControlCharacter,
    /// A credential with a byte that is not visible ASCII (a space, or non-ASCII).
    NotVisibleAscii,
}

impl TokenProblem {
    /// The problem of `field`, for a report: names the field and the rule, never the token.
    pub(crate) fn describe(self, field: &str) -> String {
        match self {
            TokenProblem::Empty => format!("{field} is empty"),
            TokenProblem::TooLong => {
                format!("{field} is longer than {MAX_TOKEN_BYTES} bytes")
            }
            TokenProblem::ControlCharacter => format!("{field} contains a control character"),
            TokenProblem::NotVisibleAscii => {
                format!("{field} has a byte that is not visible ASCII")
            }
        }
    }

    /// The problem alone, for a configuration error naming the field apart.
    pub(crate) fn reason(self) -> &'static str {
        match self {
            TokenProblem::Empty => "empty",
            TokenProblem::TooLong => "longer than MAX_TOKEN_BYTES",
            TokenProblem::ControlCharacter => "contains a control character",
            TokenProblem::NotVisibleAscii => "not visible ASCII",
        }
    }
}

/// Checks that `token` can be stored and sent back exactly as received.
pub(crate) fn check(token: &str) -> Result<(), TokenProblem> {
    if token.is_empty() {
        Err(TokenProblem::Empty)
    } else if token.len() > MAX_TOKEN_BYTES {
        Err(TokenProblem::TooLong)
    } else if token.chars().any(char::is_control) {
        // A newline would end the checkpoint file's one line; other controls would be
        // interpreted by whatever prints or stores the token.
        Err(TokenProblem::ControlCharacter)
    } else {
        Ok(())
    }
}

/// Checks that credential `token` (an access or refresh token) can be stored and sent back
/// exactly as received: the rules of [`check`], and visible ASCII only.
pub(crate) fn check_credential(token: &str) -> Result<(), TokenProblem> {
    check(token)?;
    if token.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(())
    } else {
        Err(TokenProblem::NotVisibleAscii)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_that_cannot_round_trip_are_refused() {
        assert_eq!(check("s72594_4483_1934"), Ok(()));
        assert_eq!(check("  pad  "), Ok(()), "spaces round-trip");
        assert_eq!(check(&"x".repeat(MAX_TOKEN_BYTES)), Ok(()));
        assert_eq!(
            check(&"x".repeat(MAX_TOKEN_BYTES + 1)),
            Err(TokenProblem::TooLong)
        );
        assert_eq!(check(""), Err(TokenProblem::Empty));
        for bad in ["a\nb", "a\rb", "\u{0}", "a\u{1b}[2J", "\u{85}", "\u{7f}"] {
            assert_eq!(check(bad), Err(TokenProblem::ControlCharacter), "{bad:?}");
        }
        assert!(TokenProblem::TooLong
            .describe("next_batch")
            .contains("4096"));
    }

    #[test]
    fn credentials_follow_the_same_rule_and_are_visible_ascii_too() {
        assert_eq!(check_credential("syt_YWxpY2U_abcDEF_0a1B2c"), Ok(()));
        assert_eq!(check_credential(&"x".repeat(MAX_TOKEN_BYTES)), Ok(()));
        assert_eq!(
            check_credential(&"x".repeat(MAX_TOKEN_BYTES + 1)),
            Err(TokenProblem::TooLong)
        );
        assert_eq!(check_credential(""), Err(TokenProblem::Empty));
        assert_eq!(
            check_credential("a\nb"),
            Err(TokenProblem::ControlCharacter)
        );
        for bad in ["has space", "caf\u{e9}", "\u{a0}"] {
            assert_eq!(
                check_credential(bad),
                Err(TokenProblem::NotVisibleAscii),
                "{bad:?}"
            );
        }
        assert!(TokenProblem::NotVisibleAscii
            .describe("access_token")
            .starts_with("access_token "));
    }
}
