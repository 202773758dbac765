//! One host name, parsed once: lowercase, no trailing dot, an IPv6 literal without its brackets,
//! the port kept apart. Every place that compares or looks up hosts (CONNECT, the pipeline,
//! routes, `resolve:` pins, the leaf cache, the dialer) takes a [`Host`], so they cannot disagree.

use std::fmt;
use std::net::IpAddr;

/// A host as keystamp compares it. Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Host(std::sync::Arc<str>);

/// Why text is not a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    #[error("the host is empty")]
    Empty,
    #[error("the host has characters a host name cannot have")]
    Invalid,
    #[error("the port is not a number from 1 to 65535")]
    BadPort,
}

impl Host {
    /// Parses a host as it appears in an authority, a `Host` header, SNI or a config key:
    /// `API.Example.TEST.`, `[::1]` and `::1` become `api.example.test` and `::1`.
    pub fn parse(text: &str) -> Result<Self, HostError> {
        let bare = match text.strip_prefix('[') {
            Some(rest) => rest.strip_suffix(']').ok_or(HostError::Invalid)?,
            None => text,
        };
        let bare = bare.strip_suffix('.').unwrap_or(bare);
        if bare.is_empty() {
            return Err(HostError::Empty);
        }
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return Ok(Self(ip.to_string().into()));
        }
        let valid = bare
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
        // Every label has at least one character: `..`, `.a` and `a..b` are not hosts.
        if !valid || bare.split('.').any(str::is_empty) {
            return Err(HostError::Invalid);
        }
        Ok(Self(bare.to_ascii_lowercase().into()))
    }

    /// Splits `host:port` (an authority, a `Host` header value, a CONNECT target). `None` for the
    /// port when there is none; a port that is present must be 1–65535.
    pub fn parse_authority(text: &str) -> Result<(Self, Option<u16>), HostError> {
        let (host, port) = if text.starts_with('[') {
            let end = text.find(']').ok_or(HostError::Invalid)?;
            let (host, rest) = text.split_at(end + 1);
            match rest {
                "" => (host, None),
                _ => (
                    host,
                    Some(rest.strip_prefix(':').ok_or(HostError::Invalid)?),
                ),
            }
        } else {
            match text.rsplit_once(':') {
                // A bare IPv6 literal has more than one colon and no brackets: not an authority.
                Some((host, _)) if host.contains(':') => return Err(HostError::Invalid),
                Some((host, port)) => (host, Some(port)),
                None => (text, None),
            }
        };
        let port = match port {
            None => None,
            Some(digits) => Some(parse_port(digits)?),
        };
        Ok((Self::parse(host)?, port))
    }

    /// The host as compared: no brackets, lowercase.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_ipv6(&self) -> bool {
        self.0.contains(':')
    }

    /// `host` or `host:port` as it goes into a URI (brackets around IPv6), the port left out
    /// when it is `default_port`.
    pub fn authority(&self, port: u16, default_port: u16) -> String {
        let host = if self.is_ipv6() {
            format!("[{}]", self.0)
        } else {
            self.0.to_string()
        };
        if port == default_port {
            host
        } else {
            format!("{host}:{port}")
        }
    }
}

/// The port a URL or Host without one means: 443 for https (TLS), 80 for http.
pub fn default_port(tls: bool) -> u16 {
    if tls {
        443
    } else {
        80
    }
}

fn parse_port(digits: &str) -> Result<u16, HostError> {
    if digits.is_empty() || digits.len() > 5 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(HostError::BadPort);
    }
    match digits.parse::<u16>() {
        Ok(0) | Err(_) => Err(HostError::BadPort),
        Ok(port) => Ok(port),
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Host({})", self.0)
    }
}

impl std::borrow::Borrow<str> for Host {
    fn borrow(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_compare_after_one_normalisation() {
        assert_eq!(
            Host::parse("API.Example.TEST.").unwrap().as_str(),
            "api.example.test"
        );
        assert_eq!(Host::parse("[::1]").unwrap().as_str(), "::1");
        assert_eq!(Host::parse("::1").unwrap(), Host::parse("[0::1]").unwrap());
        assert_eq!(Host::parse("").unwrap_err(), HostError::Empty);
        assert_eq!(Host::parse(".").unwrap_err(), HostError::Empty);
        assert_eq!(Host::parse("..").unwrap_err(), HostError::Invalid);
        assert_eq!(Host::parse("a..b").unwrap_err(), HostError::Invalid);
        assert_eq!(Host::parse("a b").unwrap_err(), HostError::Invalid);
        assert_eq!(Host::parse("a/b").unwrap_err(), HostError::Invalid);
        assert_eq!(Host::parse("[::1").unwrap_err(), HostError::Invalid);
    }

    #[test]
    fn authorities_keep_the_port_apart() {
        let (host, port) = Host::parse_authority("Api.X.test:8443").unwrap();
        assert_eq!((host.as_str(), port), ("api.x.test", Some(8443)));
        let (host, port) = Host::parse_authority("[::1]:443").unwrap();
        assert_eq!((host.as_str(), port), ("::1", Some(443)));
        assert_eq!(Host::parse_authority("x.test").unwrap().1, None);
        assert_eq!(Host::parse_authority("[::1]").unwrap().1, None);
        for bad in [
            "x.test:65979",
            "x.test:0",
            "x.test:",
            "x.test:+1",
            "x.test:1x",
        ] {
            assert_eq!(
                Host::parse_authority(bad).unwrap_err(),
                HostError::BadPort,
                "{bad}"
            );
        }
        assert!(Host::parse_authority("::1:443").is_err());
        assert!(Host::parse_authority("[::1]x").is_err());
    }

    #[test]
    fn authority_brackets_ipv6_and_drops_the_default_port() {
        let v6 = Host::parse("::1").unwrap();
        assert_eq!(v6.authority(443, 443), "[::1]");
        assert_eq!(v6.authority(8443, 443), "[::1]:8443");
        let name = Host::parse("a.test").unwrap();
        assert_eq!(name.authority(80, 80), "a.test");
        assert_eq!(name.authority(8080, 80), "a.test:8080");
    }
}
