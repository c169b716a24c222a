//! Stable VIPs for ServiceEntry hosts that have no `addresses`.
//!
//! A host's VIP is derived from a hash of the host name alone, so it is the same after a restart,
//! on every replica, and whatever other entries exist. Only when two hosts hash to the same
//! address (or a host's address is one an entry lists explicitly) does a rule decide: the
//! lexicographically smallest host keeps the slot, the others probe further slots of their own
//! hash sequence, in host order, skipping every slot already held. So deleting an entry can only
//! move the VIP of a host that collided with it; every other VIP stays where it is.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use registry::Cidr;
use serde::Serialize;

/// Random probes tried before falling back to a linear scan of the range.
const MAX_PROBES: u32 = 64;
/// Upper bound on the linear scan, so a huge, nearly full range cannot stall a rebuild.
const MAX_SCAN: u128 = 1 << 20;

/// An allocated VIP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Vip {
    pub addr: IpAddr,
    /// 0 when the host holds its own hash slot; more after a collision.
    pub probe: u32,
}

/// VIPs for `hosts` from `range`, never one of `taken`. Hosts that cannot get one (the range is
/// full) are returned with a message for the operator.
pub fn allocate(
    range: &Cidr,
    hosts: &[String],
    taken: &HashSet<IpAddr>,
) -> (BTreeMap<String, Vip>, Vec<String>) {
    let space = Space::new(range);
    let mut hosts: Vec<&String> = hosts.iter().collect();
    hosts.sort();
    hosts.dedup();
    let mut used: HashSet<u128> = taken.iter().filter_map(|ip| space.offset_of(ip)).collect();
    let mut out = BTreeMap::new();
    let mut errors = Vec::new();
    if space.usable == 0 {
        return (out, errors);
    }

    // Phase 1: every host whose own slot is free and uncontested takes it; in a contested slot
    // the smallest host (they are sorted) wins.
    let mut losers = Vec::new();
    for host in &hosts {
        let slot = space.slot(host, 0);
        if used.insert(slot) {
            out.insert(host.to_string(), space.vip(slot, 0));
        } else {
            losers.push(*host);
        }
    }
    // Phase 2: the others probe their own sequence, in host order, around the held slots.
    for host in losers {
        match probe(&space, host, &used) {
            Some((slot, probe)) => {
                used.insert(slot);
                out.insert(host.to_string(), space.vip(slot, probe));
            }
            None => errors.push(format!(
                "no free VIP left in {range} for {host}: widen the VIP range \
                 (--vip-range / --vip-range-v6) or give the ServiceEntry `addresses`"
            )),
        }
    }
    (out, errors)
}

fn probe(space: &Space, host: &str, used: &HashSet<u128>) -> Option<(u128, u32)> {
    for i in 1..=MAX_PROBES {
        let slot = space.slot(host, i);
        if !used.contains(&slot) {
            return Some((slot, i));
        }
    }
    let start = space.slot(host, 0);
    let steps = space.usable.min(MAX_SCAN);
    (1..steps)
        .map(|k| 1 + (start - 1 + k) % space.usable)
        .find(|slot| !used.contains(slot))
        .map(|slot| (slot, MAX_PROBES + 1))
}

/// The usable offsets of a range: 1 ..= size-2 (the network and the all-ones address are
/// skipped).
struct Space {
    base: u128,
    v4: bool,
    /// Number of usable offsets.
    usable: u128,
}

impl Space {
    fn new(range: &Cidr) -> Space {
        let (bits, base, v4) = match range.addr() {
            IpAddr::V4(a) => (32u32, u128::from(u32::from(a)), true),
            IpAddr::V6(a) => (128u32, u128::from(a), false),
        };
        let host_bits = bits - u32::from(range.prefix());
        let size = 1u128.checked_shl(host_bits).unwrap_or(0);
        // /0 of IPv6: every offset but two.
        let usable = if size == 0 {
            u128::MAX - 1
        } else {
            size.saturating_sub(2)
        };
        let mask = if host_bits >= 128 {
            0
        } else {
            !((1u128 << host_bits) - 1)
        };
        Space {
            base: base & mask,
            v4,
            usable,
        }
    }

    /// The `i`th slot of `host`'s probe sequence, in 1..=usable.
    fn slot(&self, host: &str, i: u32) -> u128 {
        1 + u128::from(hash(host, i)) % self.usable
    }

    fn vip(&self, slot: u128, probe: u32) -> Vip {
        let n = self.base + slot;
        let addr = if self.v4 {
            IpAddr::V4(Ipv4Addr::from(n as u32))
        } else {
            IpAddr::V6(Ipv6Addr::from(n))
        };
        Vip { addr, probe }
    }

    fn offset_of(&self, ip: &IpAddr) -> Option<u128> {
        let n = match (ip, self.v4) {
            (IpAddr::V4(a), true) => u128::from(u32::from(*a)),
            (IpAddr::V6(a), false) => u128::from(*a),
            _ => return None,
        };
        let off = n.checked_sub(self.base)?;
        (off >= 1 && off <= self.usable).then_some(off)
    }
}

/// FNV-1a over the host and the probe number, finished with the splitmix64 mixer: fixed by this
/// code, not by the Rust release or the process (unlike `DefaultHasher`), so every replica and
/// every version agrees.
fn hash(host: &str, i: u32) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in host.bytes().chain(i.to_le_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    fn range(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    #[test]
    fn hash_is_fixed_forever() {
        // If this changes, every VIP in every cluster renumbers: don't.
        assert_eq!(hash("httpbin.bar.global", 0), 0x034f_3ecf_74f3_2fc8);
        let (vips, _) = allocate(
            &range("240.240.0.0/16"),
            &hosts(&["httpbin.bar.global"]),
            &HashSet::new(),
        );
        assert_eq!(
            vips["httpbin.bar.global"].addr.to_string(),
            "240.240.47.103"
        );
    }

    #[test]
    fn vips_stay_in_range_and_skip_network_and_broadcast() {
        let names: Vec<String> = (0..200).map(|i| format!("h{i}.ns.global")).collect();
        let r = range("10.9.0.0/24");
        let (vips, errors) = allocate(&r, &names, &HashSet::new());
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(vips.len(), 200);
        let distinct: HashSet<IpAddr> = vips.values().map(|v| v.addr).collect();
        assert_eq!(distinct.len(), 200, "VIPs must be unique");
        for v in vips.values() {
            assert!(r.contains(&v.addr));
            assert_ne!(v.addr.to_string(), "10.9.0.0");
            assert_ne!(v.addr.to_string(), "10.9.0.255");
        }
    }

    #[test]
    fn the_same_hosts_always_get_the_same_vips_whatever_the_order() {
        let mut names: Vec<String> = (0..50).map(|i| format!("s{i}.ns.global")).collect();
        let r = range("240.240.0.0/26");
        let (a, _) = allocate(&r, &names, &HashSet::new());
        names.reverse();
        let (b, _) = allocate(&r, &names, &HashSet::new());
        assert_eq!(a, b);
        assert!(
            a.values().any(|v| v.probe > 0),
            "expected collisions in a /26"
        );
    }

    #[test]
    fn deleting_a_host_moves_only_hosts_that_collided_with_it() {
        // A small range forces collisions; check every single deletion.
        let names: Vec<String> = (0..20).map(|i| format!("x{i}.global")).collect();
        let r = range("240.240.0.0/27");
        let (all, _) = allocate(&r, &names, &HashSet::new());
        assert!(
            all.values().any(|v| v.probe > 0),
            "expected collisions in a /27"
        );
        for gone in &names {
            let rest: Vec<String> = names.iter().filter(|n| *n != gone).cloned().collect();
            let (after, _) = allocate(&r, &rest, &HashSet::new());
            for h in &rest {
                // A host that holds its own hash slot keeps it whatever else is deleted: it was
                // the smallest contender for that slot and still is.
                if all[h].probe == 0 {
                    assert_eq!(after[h], all[h], "{h} moved when {gone} was deleted");
                }
            }
        }
    }

    #[test]
    fn explicit_addresses_are_never_handed_out() {
        let r = range("240.240.0.0/16");
        let names = hosts(&["httpbin.bar.global"]);
        let (free, _) = allocate(&r, &names, &HashSet::new());
        let own = free["httpbin.bar.global"].addr;
        let (vips, _) = allocate(&r, &names, &HashSet::from([own]));
        assert_ne!(vips["httpbin.bar.global"].addr, own);
        assert_eq!(vips["httpbin.bar.global"].probe, 1);
    }

    #[test]
    fn a_full_range_is_reported() {
        let r = range("240.240.0.0/30"); // two usable addresses
        let (vips, errors) = allocate(
            &r,
            &hosts(&["a.global", "b.global", "c.global"]),
            &HashSet::new(),
        );
        assert_eq!(vips.len(), 2);
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0].contains("no free VIP left in 240.240.0.0/30"),
            "{errors:?}"
        );
    }

    #[test]
    fn ipv6_ranges() {
        let r = range("2001:2::/48");
        let (vips, errors) = allocate(&r, &hosts(&["a.global", "b.global"]), &HashSet::new());
        assert!(errors.is_empty());
        for v in vips.values() {
            assert!(r.contains(&v.addr), "{v:?}");
            assert!(v.addr.is_ipv6());
        }
        // A range written with host bits set still allocates inside the network.
        let r = range("240.240.7.9/16");
        let (vips, _) = allocate(&r, &hosts(&["a.global"]), &HashSet::new());
        assert!(r.contains(&vips["a.global"].addr));
    }
}
