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
    /// that named one in the header.
    pub fn of<T>(&self, request: &tonic::Request<T>) -> Option<IpAddr> {
        let peer = request.remote_addr().map(|addr| addr.ip())?;
        if !self
            .trusted_proxies
            .iter()
            .any(|proxy| proxy.contains(peer))
        {
            return Some(peer);
        }
        let forwarded = request
            .metadata()
            .get(self.header.as_str())
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.rsplit(',').next())
            .and_then(|last| last.trim().parse::<IpAddr>().ok());
        Some(forwarded.unwrap_or(peer))
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
}
