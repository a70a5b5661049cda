//! What a server token (`next_batch`, `prev_batch`, `end`) must look like before the machine
//! stores it or puts it in a URL.
//!
//! Tokens are opaque, but the machine hands them back: in a query string, to a checkpoint file,
//! to the application. A token that cannot make that round trip byte for byte is refused where
//! it arrives, as a bad response, so it is never stored and never sent.

/// The longest token accepted, in bytes. Synapse's tokens are under 100 bytes; a few KiB
/// leaves room for any real server while keeping every URL far below common limits (8 KiB).
pub const MAX_TOKEN_BYTES: usize = 4096;

/// Why a token was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TokenProblem {
    Empty,
    TooLong,
    ControlCharacter,
}

impl TokenProblem {
    pub(crate) fn describe(self, field: &str) -> String {
        match self {
            TokenProblem::Empty => format!("{field} is empty"),
            TokenProblem::TooLong => {
                format!("{field} is longer than {MAX_TOKEN_BYTES} bytes")
            }
            TokenProblem::ControlCharacter => format!("{field} contains a control character"),
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
}
