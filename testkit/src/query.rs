//! Reading requests back: percent-decoded paths and query parameters, by the `url` crate's
//! `percent-encoding` and `form_urlencoded` (a query's `+` is a space; a malformed escape is
//! kept as it is).

use std::borrow::Cow;
use std::collections::BTreeMap;

use percent_encoding::percent_decode_str;

/// A percent-decoded path (a `+` stays a `+`); invalid UTF-8 becomes U+FFFD.
pub fn decode_path(path: &str) -> String {
    percent_decode_str(path).decode_utf8_lossy().into_owned()
}

/// The decoded `key=value` pairs of a query string, in order.
pub fn pairs(query: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(query.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// The decoded value of query parameter `key` in `query` (the first, if repeated).
pub fn param(query: &str, key: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == key)
        .map(|(_, v): (Cow<str>, Cow<str>)| v.into_owned())
}

/// The decoded value of query parameter `key` of `uri`.
pub fn uri_param(uri: &http::Uri, key: &str) -> Option<String> {
    param(uri.query()?, key)
}

/// The decoded query parameters of `uri`; panics if a key is repeated.
pub fn uri_params(uri: &http::Uri) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    for (k, v) in pairs(uri.query().unwrap_or("")) {
        let old = map.insert(k.clone(), v);
        assert!(old.is_none(), "query key {k} repeated in {uri}");
    }
    map
}

/// The decoded path of `uri`.
pub fn uri_path(uri: &http::Uri) -> String {
    decode_path(uri.path())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_escapes_plus_and_keeps_malformed_escapes() {
        assert_eq!(param("x=a%21b+c%7E", "x").as_deref(), Some("a!b c~"));
        assert_eq!(param("x=%zz%4", "x").as_deref(), Some("%zz%4"));
        // A sign is no hex digit: `%+4` is kept, not read as 0x04.
        assert_eq!(param("x=%+4", "x").as_deref(), Some("% 4"));
        assert_eq!(param("y=1&x=2&x=3", "x").as_deref(), Some("2"));
        assert_eq!(param("y=1", "x"), None);
    }

    #[test]
    fn paths_keep_plus_and_decode_escapes() {
        let uri: http::Uri = "/rooms/%21a%3Ab+c/messages?dir=b&from=t%2B1"
            .parse()
            .unwrap();
        assert_eq!(uri_path(&uri), "/rooms/!a:b+c/messages");
        let params = uri_params(&uri);
        assert_eq!(params["from"], "t+1");
        assert_eq!(params["dir"], "b");
    }

    #[test]
    #[should_panic(expected = "repeated")]
    fn a_repeated_key_is_refused() {
        uri_params(&"/sync?since=a&since=b".parse().unwrap());
    }
}
