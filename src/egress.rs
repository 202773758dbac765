//! Where keystamp may connect. Addresses in loopback, private, link-local (the cloud metadata
//! endpoint 169.254.169.254 included), unique-local, CGNAT and unspecified ranges are refused
//! unless `egress.allow_cidrs` lists them or `resolve:` pins the host there. The check is made on
//! the address actually dialled, after resolution, so a DNS answer cannot smuggle a request in.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// An IP network like `10.0.0.0/8` or `fd00::/8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl FromStr for Cidr {
    /// Says what is wrong without repeating the text (config errors never echo a value).
    type Err = &'static str;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let network: IpAddr = address
            .parse()
            .map_err(|_| "is not an address or CIDR like 10.0.0.0/8")?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or("has a bad prefix length")?,
            None => max,
        };
        Ok(Self { network, prefix })
    }
}

impl Cidr {
    pub fn contains(&self, address: IpAddr) -> bool {
        match (self.network, canonical(address)) {
            (IpAddr::V4(network), IpAddr::V4(address)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(network) & mask == u32::from(address) & mask
            }
            (IpAddr::V6(network), IpAddr::V6(address)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(network) & mask == u128::from(address) & mask
            }
            _ => false,
        }
    }
}

/// The egress guard: refused ranges minus the operator's allowances.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EgressPolicy {
    pub allow: Vec<Cidr>,
}

impl EgressPolicy {
    /// Whether keystamp may dial `address` (that was not pinned by `resolve:`).
    pub fn permits(&self, address: IpAddr) -> bool {
        !is_internal(address) || self.allow.iter().any(|cidr| cidr.contains(address))
    }
}

/// An IPv6 address that carries an IPv4 address is judged as that IPv4 address: mapped
/// (`::ffff:a.b.c.d`), compatible (`::a.b.c.d`), NAT64 (`64:ff9b::/96`, where
/// `64:ff9b::a9fe:a9fe` reaches the metadata address on an IPv6-only cluster) and 6to4
/// (`2002:AABB:CCDD::/48`).
fn canonical(address: IpAddr) -> IpAddr {
    let IpAddr::V6(v6) = address else {
        return address;
    };
    let segments = v6.segments();
    let low_v4 = || {
        let bits = u128::from(v6) as u32;
        IpAddr::V4(Ipv4Addr::from(bits))
    };
    if let Some(mapped) = v6.to_ipv4_mapped() {
        return IpAddr::V4(mapped);
    }
    match segments {
        // IPv4-compatible (deprecated), but not :: or ::1 themselves.
        [0, 0, 0, 0, 0, 0, high, _] if high != 0 => low_v4(),
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => low_v4(),
        [0x2002, a, b, ..] => IpAddr::V4(Ipv4Addr::new(
            (a >> 8) as u8,
            a as u8,
            (b >> 8) as u8,
            b as u8,
        )),
        _ => address,
    }
}

fn is_internal(address: IpAddr) -> bool {
    match canonical(address) {
        IpAddr::V4(v4) => is_internal_v4(v4),
        IpAddr::V6(v6) => is_internal_v6(v6),
    }
}

fn is_internal_v4(address: Ipv4Addr) -> bool {
    let [a, b, ..] = address.octets();
    address.is_loopback()
        || address.is_private()
        || address.is_link_local()
        || address.is_unspecified()
        || address.is_broadcast()
        || a == 0
        || (a == 100 && (64..128).contains(&b)) // CGNAT, 100.64.0.0/10
}

fn is_internal_v6(address: Ipv6Addr) -> bool {
    let [first, second, third, ..] = address.segments();
    address.is_loopback()
        || address.is_unspecified()
        || (first & 0xfe00) == 0xfc00 // unique local, fc00::/7
        || (first & 0xffc0) == 0xfe80 // link local, fe80::/10
        || (first & 0xffc0) == 0xfec0 // site local (deprecated), fec0::/10
        || (first & 0xff00) == 0xff00 // multicast
        || (first, second, third) == (0x64, 0xff9b, 1) // local-use NAT64, 64:ff9b:1::/48
        || (first, second) == (0x2001, 0) // Teredo: the IPv4 inside is obfuscated
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn internal_ranges_are_refused_unless_allowed() {
        let policy = EgressPolicy::default();
        for refused in [
            "127.0.0.1",
            "10.0.0.1",
            "172.16.5.4",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.1.1",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b::10.0.0.1",
            "64:ff9b:1::1",
            "::169.254.169.254",
            "::127.0.0.1",
            "2002:a9fe:a9fe::1",
            "2002:7f00:1::1",
            "2001:0:4136:e378::1",
            "fec0::1",
            "ff02::1",
        ] {
            assert!(!policy.permits(ip(refused)), "{refused}");
        }
        for permitted in [
            "8.8.8.8",
            "1.1.1.1",
            "2606:4700::1111",
            "172.32.0.1",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ] {
            assert!(policy.permits(ip(permitted)), "{permitted}");
        }
        let policy = EgressPolicy {
            allow: vec!["10.1.0.0/16".parse().unwrap(), "127.0.0.1".parse().unwrap()],
        };
        assert!(policy.permits(ip("10.1.2.3")));
        assert!(!policy.permits(ip("10.2.0.1")));
        assert!(policy.permits(ip("127.0.0.1")));
        assert!(!policy.permits(ip("127.0.0.2")));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("nonsense".parse::<Cidr>().is_err());
    }
}
