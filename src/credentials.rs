//! The credentials a machine syncs with: the access token, the refresh token and how it is
//! exchanged (`RefreshMethod`), and the set of them a refresh hands out (`Credentials`). Plain
//! values whose `Debug` never shows a token; what the machine does with them is in `auth`.

use std::fmt;
use std::time::Duration;

use crate::token;

/// An access token. Its `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct AccessToken(String);

impl AccessToken {
    /// Wraps a token.
    pub fn new(token: impl Into<String>) -> Self {
        Self(token.into())
    }

    /// The secret itself; only for putting it in an `Authorization` header.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AccessToken(<redacted>)")
    }
}

/// A refresh token. Its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct RefreshToken(String);

impl RefreshToken {
    /// Wraps a token.
    pub fn new(token: impl Into<String>) -> Self {
        Self(token.into())
    }

    /// The secret itself; only for sending it to the refresh endpoint or storing it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for RefreshToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RefreshToken(<redacted>)")
    }
}

/// An access token with what it takes to renew it: what
/// [`SyncMachine::poll_credentials`](crate::SyncMachine::poll_credentials) hands out after a
/// refresh, and what [`SyncMachine::set_credentials`](crate::SyncMachine::set_credentials)
/// takes. `Debug` shows neither token.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Credentials {
    /// The access token.
    pub access_token: AccessToken,
    /// The refresh token, if the server issued one.
    pub refresh_token: Option<RefreshToken>,
    /// How long the access token lives from when it was issued, if the server said.
    pub expires_in: Option<Duration>,
}

impl Credentials {
    /// An access token alone: no refresh, expiry unknown.
    pub fn new(access_token: impl Into<String>) -> Self {
        Self {
            access_token: AccessToken::new(access_token),
            refresh_token: None,
            expires_in: None,
        }
    }

    /// Sets the refresh token.
    #[must_use]
    pub fn with_refresh_token(mut self, refresh_token: impl Into<String>) -> Self {
        self.refresh_token = Some(RefreshToken::new(refresh_token));
        self
    }

    /// Sets the lifetime of the access token, counted from now.
    #[must_use]
    pub fn with_expires_in(mut self, expires_in: Duration) -> Self {
        self.expires_in = Some(expires_in);
        self
    }

    /// Whether both tokens pass the rule of every credential ([`token::check_credential`]):
    /// non-empty visible ASCII of at most [`MAX_TOKEN_BYTES`](crate::MAX_TOKEN_BYTES).
    pub(crate) fn is_usable(&self) -> bool {
        self.check().is_ok()
    }

    /// The first token that breaks the rule, named as a refresh answer names it.
    pub(crate) fn check(&self) -> Result<(), String> {
        token::check_credential(self.access_token.expose())
            .map_err(|p| p.describe("access_token"))?;
        if let Some(refresh_token) = &self.refresh_token {
            token::check_credential(refresh_token.expose())
                .map_err(|p| p.describe("refresh_token"))?;
        }
        Ok(())
    }
}

/// Where the refresh token is exchanged for a new access token.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum RefreshMethod {
    /// `POST /_matrix/client/v3/refresh` on the homeserver (Matrix 1.3).
    #[default]
    Matrix,
    /// The token endpoint of an OAuth 2.0 authorization server (Matrix 1.15, RFC 6749 §6):
    /// a form-encoded `grant_type=refresh_token` with the client id.
    OAuth {
        /// The token endpoint's URL (from the server metadata's `token_endpoint`).
        token_endpoint: String,
        /// The client id the session was registered with.
        client_id: String,
    },
}
