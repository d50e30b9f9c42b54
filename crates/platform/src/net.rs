//! Who is on the other end of a call: the client's address, from the TCP peer or, behind a
//! trusted proxy, from the header that proxy sets.

use std::net::IpAddr;
use std::str::FromStr;

/// A network, `address/prefix` (`10.0.0.0/8`, `fd00::/8`); a bare address is a /32 or /128.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (address, prefix) = match text.trim().split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text.trim(), None),
        };
        let network: IpAddr = address
            .parse()
            .map_err(|_| "expected an IP address or network, e.g. 10.0.0.0/8".to_owned())?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(prefix) => prefix
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("the prefix length must be 0-{max}"))?,
            None => max,
        };
        Ok(Self { network, prefix })
    }
}

impl Cidr {
    /// Whether `address` lies in this network.
    pub fn contains(&self, address: IpAddr) -> bool {
        match (self.network, address) {
            (IpAddr::V4(net), IpAddr::V4(addr)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(addr) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(addr)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(addr) & mask
            }
            _ => false,
        }
    }
}

/// Where a call's client address comes from.
#[derive(Debug, Clone, Default)]
pub struct ClientAddress {
    /// Peers whose header is believed.
    pub trusted_proxies: Vec<Cidr>,
    /// The header a trusted proxy sets (`x-forwarded-for`); its last address counts, the one
    /// the trusted proxy itself appended.
    pub header: String,
}

impl ClientAddress {
    /// The client's address of `request`: the TCP peer's, unless the peer is a trusted proxy
    /// that named one in the header. Of several header lines, the last counts (a proxy that
    /// adds a line of its own leaves the client's lines before it); IPv4-mapped IPv6
    /// addresses (a dual-stack listener's) count as the IPv4 address they are.
    pub fn of<T>(&self, request: &tonic::Request<T>) -> Option<IpAddr> {
        let peer = request.remote_addr().map(|addr| addr.ip().to_canonical())?;
        Some(self.resolve(peer, request.metadata()))
    }

    fn resolve(&self, peer: IpAddr, metadata: &tonic::metadata::MetadataMap) -> IpAddr {
        if !self
            .trusted_proxies
            .iter()
            .any(|proxy| proxy.contains(peer))
        {
            return peer;
        }
        let forwarded = metadata
            .get_all(self.header.as_str())
            .iter()
            .next_back()
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.rsplit(',').next())
            .and_then(|last| last.trim().parse::<IpAddr>().ok())
            .map(|address| address.to_canonical());
        forwarded.unwrap_or(peer)
    }
}

/// What rate limits count a client address under: an IPv4 address as it is, an IPv6 address
/// by its /64, the smallest network one subscriber is given, so that rotating through one's
/// own addresses gains nothing.
pub fn limit_subject(address: IpAddr) -> String {
    match address.to_canonical() {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => {
            let network = u128::from(v6) & (u128::MAX << 64);
            format!("{}/64", std::net::Ipv6Addr::from(network))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_contain_what_they_should() {
        let net: Cidr = "10.1.0.0/16"
            .parse()
            .unwrap_or_else(|e: String| panic!("{e}"));
        assert!(net.contains("10.1.200.3".parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))));
        assert!(!net.contains("10.2.0.1".parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))));
        let one: Cidr = "127.0.0.1"
            .parse()
            .unwrap_or_else(|e: String| panic!("{e}"));
        assert!(one.contains(IpAddr::from([127, 0, 0, 1])));
        assert!(!one.contains(IpAddr::from([127, 0, 0, 2])));
        let all: Cidr = "0.0.0.0/0"
            .parse()
            .unwrap_or_else(|e: String| panic!("{e}"));
        assert!(all.contains(IpAddr::from([8, 8, 8, 8])));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("nonsense".parse::<Cidr>().is_err());
    }

    #[test]
    fn the_client_address_is_the_last_line_of_a_trusted_proxy_and_canonical() {
        let proxies = ClientAddress {
            trusted_proxies: vec![
                "10.0.0.0/8"
                    .parse()
                    .unwrap_or_else(|e: String| panic!("{e}")),
            ],
            header: "x-forwarded-for".into(),
        };
        let mut metadata = tonic::metadata::MetadataMap::new();
        metadata.append(
            "x-forwarded-for",
            "1.1.1.1".parse().unwrap_or_else(|_| panic!()),
        );
        metadata.append(
            "x-forwarded-for",
            "2.2.2.2, 3.3.3.3".parse().unwrap_or_else(|_| panic!()),
        );
        // The proxy's address as a dual-stack listener reports it.
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap_or_else(|_| panic!());
        let peer = mapped.to_canonical();
        assert_eq!(proxies.resolve(peer, &metadata), IpAddr::from([3, 3, 3, 3]));
        // An untrusted peer's header is ignored.
        assert_eq!(
            proxies.resolve(IpAddr::from([192, 0, 2, 1]), &metadata),
            IpAddr::from([192, 0, 2, 1])
        );
    }

    #[test]
    fn ipv6_clients_are_limited_by_their_64() {
        let one: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap_or_else(|_| panic!());
        let other: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap_or_else(|_| panic!());
        let elsewhere: IpAddr = "2001:db8:1:3::1".parse().unwrap_or_else(|_| panic!());
        assert_eq!(limit_subject(one), limit_subject(other));
        assert_ne!(limit_subject(one), limit_subject(elsewhere));
        assert_eq!(limit_subject(one), "2001:db8:1:2::/64");
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap_or_else(|_| panic!());
        assert_eq!(limit_subject(mapped), "192.0.2.7");
    }
}
