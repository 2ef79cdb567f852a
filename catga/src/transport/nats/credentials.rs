//! Credentials written in NATS URLs: async-nats 0.51 parses
//! `user:password@` and `token@` but never sends them, so catga takes them
//! out and logs in with them itself.

use crate::error::{Error, ErrorKind, Result};

/// Credentials written in a URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum UrlAuth {
    UserPassword(String, String),
    Token(String),
}

pub(super) fn percent_decode(s: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let pair = (bytes[i] == b'%' && i + 2 < bytes.len())
            .then(|| hex(bytes[i + 1]).zip(hex(bytes[i + 2])))
            .flatten();
        match pair {
            Some((hi, lo)) => {
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Splits the credentials off one URL: the URL without them, and them.
pub(super) fn split_credentials(url: &str) -> (String, Option<UrlAuth>) {
    let (scheme, rest) = match url.find("://") {
        Some(i) => (&url[..i + 3], &url[i + 3..]),
        None => ("", url),
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return (url.to_owned(), None);
    };
    let userinfo = &rest[..at];
    let auth = match userinfo.split_once(':') {
        Some((user, pass)) => UrlAuth::UserPassword(percent_decode(user), percent_decode(pass)),
        None => UrlAuth::Token(percent_decode(userinfo)),
    };
    (format!("{scheme}{}", &rest[at + 1..]), Some(auth))
}

/// Parses the comma-separated server list of `NATS_URL`, and the
/// credentials written in it.
///
/// async-nats 0.51 parses `user:password@` and `token@` in a URL but never
/// sends them (its CONNECT only uses the options' auth), so a URL that
/// works with other clients is refused. catga takes them out of the URLs
/// and sets them as options; all URLs must agree, since a connection has
/// one set of credentials.
pub(super) fn server_addrs(url: &str) -> Result<(Vec<async_nats::ServerAddr>, Option<UrlAuth>)> {
    let mut auth: Option<UrlAuth> = None;
    let mut addrs = Vec::new();
    for one in url.split(',').map(str::trim).filter(|u| !u.is_empty()) {
        let (bare, creds) = split_credentials(one);
        if let Some(c) = creds {
            match &auth {
                Some(seen) if *seen != c => {
                    return Err(Error::new(
                        ErrorKind::Config,
                        "the URLs in NATS_URL carry different credentials; a connection has one set: \
                         give them all the same, or only the first",
                    ));
                }
                _ => auth = Some(c),
            }
        }
        addrs.push(bare.parse::<async_nats::ServerAddr>().map_err(|e| {
            Error::new(
                ErrorKind::Config,
                format!("invalid NATS url {}: {e}", crate::config::redact_url(one)),
            )
        })?);
    }
    if addrs.is_empty() {
        return Err(Error::new(ErrorKind::Config, "NATS_URL names no server"));
    }
    Ok((addrs, auth))
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn every_comma_separated_url_is_a_server() {
        let (addrs, auth) = server_addrs("nats://127.0.0.1:1, nats://127.0.0.1:2").expect("two urls");
        assert_eq!(addrs.len(), 2);
        assert_eq!(auth, None);
        let err = server_addrs("nats://a:s3cret@127.0.0.1:x").expect_err("bad port");
        assert!(!err.message().contains("s3cret"), "{err}");
        assert!(server_addrs(" , ").is_err());
    }

    #[test]
    fn credentials_come_out_of_the_urls() {
        let (addrs, auth) =
            server_addrs("nats://svc:p%40ss@127.0.0.1:1,tls://svc:p%40ss@127.0.0.1:2").expect("urls");
        assert_eq!(auth, Some(UrlAuth::UserPassword("svc".into(), "p@ss".into())));
        assert!(
            addrs.iter().all(|a| !format!("{a:?}").contains("svc")),
            "{addrs:?}"
        );
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("%é%41"), "%éA");
        let (_, auth) = server_addrs("nats://s3cr3t-token@127.0.0.1:1").expect("token");
        assert_eq!(auth, Some(UrlAuth::Token("s3cr3t-token".into())));
        let err = server_addrs("nats://a:b@127.0.0.1:1,nats://c:d@127.0.0.1:2").expect_err("two sets");
        assert!(
            !err.message().contains(":b") && !err.message().contains(":d"),
            "{err}"
        );
    }
}
