//! Which client addresses may speak for someone else: the `--trusted-proxies` list. A request
//! from one of them keeps the forwarding headers it carries (`X-Forwarded-For`, whose chain the
//! proxy extends, `X-Forwarded-Host`, `Forwarded`, `X-Real-IP`); from anyone else the editor
//! drops them and `X-Forwarded-For` starts at the real peer. Parsed once at start; a lookup is
//! a scan of a few prefixes.

use std::net::IpAddr;

/// One address range, `addr/prefix`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

/// Why a `--trusted-proxies` entry is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("{0:?} is not an IP address or an address/prefix")]
    Address(String),
    #[error("{0:?}: the prefix is over the address's {1} bits")]
    Prefix(String, u8),
}

impl std::str::FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Cidr, CidrError> {
        let bad = || CidrError::Address(s.to_owned());
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p.parse::<u8>().map_err(|_| bad())?)),
            None => (s, None),
        };
        let addr: IpAddr = addr.trim().parse().map_err(|_| bad())?;
        let bits = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(bits);
        if prefix > bits {
            return Err(CidrError::Prefix(s.to_owned(), bits));
        }
        Ok(Cidr { addr, prefix })
    }
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        // An IPv4 client may arrive on a dual-stack socket as ::ffff:a.b.c.d.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// The proxies whose forwarding headers are believed. Empty (the default): nobody's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<Cidr>);

impl TrustedProxies {
    pub fn new(ranges: Vec<Cidr>) -> Self {
        TrustedProxies(ranges)
    }

    pub fn trusts(&self, peer: Option<IpAddr>) -> bool {
        peer.is_some_and(|ip| self.0.iter().any(|c| c.contains(ip)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    #[test]
    fn ranges_contain_what_their_prefix_covers() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(cidr("10.0.0.0/8").contains(ip("10.200.3.4")));
        assert!(!cidr("10.0.0.0/8").contains(ip("11.0.0.1")));
        assert!(cidr("192.168.1.5").contains(ip("192.168.1.5")));
        assert!(!cidr("192.168.1.5").contains(ip("192.168.1.6")));
        assert!(cidr("0.0.0.0/0").contains(ip("8.8.8.8")));
        assert!(cidr("fd00::/8").contains(ip("fd12::1")));
        assert!(!cidr("fd00::/8").contains(ip("fe80::1")));
        assert!(
            cidr("127.0.0.1").contains(ip("::ffff:127.0.0.1")),
            "mapped IPv4"
        );
        assert!(!cidr("::1").contains(ip("127.0.0.1")));
    }

    #[test]
    fn bad_entries_are_refused_with_the_entry_named() {
        assert_eq!(
            "10.0.0.0/33".parse::<Cidr>(),
            Err(CidrError::Prefix("10.0.0.0/33".into(), 32))
        );
        assert_eq!(
            "ten.0.0.0/8".parse::<Cidr>(),
            Err(CidrError::Address("ten.0.0.0/8".into()))
        );
        assert!("10.0.0.0/x".parse::<Cidr>().is_err());
        let t = TrustedProxies::new(vec![cidr("127.0.0.0/8")]);
        assert!(t.trusts(Some("127.0.0.9".parse().unwrap())));
        assert!(!t.trusts(None));
        assert!(!TrustedProxies::default().trusts(Some("127.0.0.1".parse().unwrap())));
    }
}
