//! Counts of connections per source (an IP address or IPv6 /64, or an identity), for the
//! limits of the data plane and the HTTP APIs: no single host takes every slot.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use beacon_proto::PeerId;

/// Where a connection comes from, for the per-source limits: an IPv4 address, or an IPv6
/// /64 (one subscriber's prefix: counting single IPv6 addresses would limit nothing).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub(crate) enum Source {
    Ip(IpAddr),
    Peer(PeerId),
}

pub(crate) fn ip_source(ip: IpAddr) -> Source {
    Source::Ip(address_group(ip))
}

/// The address a per-client limit counts: an IPv4 address as it is (IPv4-mapped IPv6
/// too), an IPv6 address as its /64, one subscriber's prefix (counting single IPv6
/// addresses would limit nothing).
pub fn address_group(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        v4 => v4,
    }
}

/// Things held per key (connections per source, audits per peer); a [`Held`] gives its
/// count back when dropped, and keys that hold nothing take no memory.
pub struct Counts<K>(Arc<Mutex<HashMap<K, usize>>>);

impl<K> Clone for Counts<K> {
    fn clone(&self) -> Self {
        Counts(self.0.clone())
    }
}

impl<K> Default for Counts<K> {
    fn default() -> Self {
        Counts(Arc::default())
    }
}

/// One unit held under a key in [`Counts`].
pub struct Held<K: Eq + Hash + Clone> {
    counts: Counts<K>,
    key: K,
}

impl<K: Eq + Hash + Clone> Counts<K> {
    /// Takes one unit under `key`, or `None` when `key` already holds `max`.
    pub fn take(&self, key: K, max: usize) -> Option<Held<K>> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(key.clone()).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Held {
            counts: self.clone(),
            key,
        })
    }
}

impl<K: Eq + Hash + Clone> Drop for Held<K> {
    fn drop(&mut self) {
        let mut map = self.counts.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_source_counts_hold_and_give_back() {
        let counts = Counts::default();
        let a = ip_source("192.0.2.1".parse().unwrap());
        let held: Vec<Held<Source>> = (0..3).map(|_| counts.take(a, 3).unwrap()).collect();
        assert!(
            counts.take(a, 3).is_none(),
            "a fourth connection from one address"
        );
        // Another address is not affected.
        assert!(
            counts
                .take(ip_source("192.0.2.2".parse().unwrap()), 3)
                .is_some()
        );
        drop(held);
        assert!(counts.take(a, 3).is_some());
        // Nothing is kept for sources that hold no connection.
        assert!(counts.0.lock().unwrap().is_empty());
    }

    #[test]
    fn ipv6_sources_are_counted_per_64_and_mapped_ipv4_as_ipv4() {
        let s = |a: &str| ip_source(a.parse().unwrap());
        assert_eq!(s("2001:db8:1:2::1"), s("2001:db8:1:2:ffff::9"));
        assert_ne!(s("2001:db8:1:2::1"), s("2001:db8:1:3::1"));
        assert_eq!(s("::ffff:192.0.2.7"), s("192.0.2.7"));
    }
}
