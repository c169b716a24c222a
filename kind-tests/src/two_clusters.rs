//! The network of the two-cluster tests (`tests/two_clusters.rs`): network namespaces, one per
//! cluster, each its own network stack with pod addresses on its `lo`, joined only by a "WAN"
//! namespace whose bridge carries the gateways' addresses. Every namespace and link is removed
//! on drop.
//!
//! ```text
//!   <p>c1 (cluster-1)                <p>wan                 <p>c2 (cluster-2)
//!   lo: pods, dns, xds        ┌──── bridge wan0 ────┐      lo: pods, dns, xds
//!   eth0 172.30.0.1/24 ───────┘ (veth)       (veth) └───── eth0 172.30.0.2/24
//! ```

use std::net::IpAddr;
use std::process::Command;

/// Why a namespace could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("`ip {args}` failed: {stderr}; network namespace tests need root and iproute2")]
    Ip { args: String, stderr: String },
    #[error("cannot run `ip`: {0}; install iproute2")]
    Spawn(std::io::Error),
}

fn ip(args: &[&str]) -> Result<(), NetnsError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(NetnsError::Spawn)?;
    if !out.status.success() {
        return Err(NetnsError::Ip {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Whether this process may create network namespaces (root with iproute2), and if not, why.
#[allow(unsafe_code)] // geteuid has no safe wrapper in std
pub fn unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root: network namespaces need CAP_SYS_ADMIN".into());
    }
    match Command::new("ip").arg("-V").output() {
        Ok(o) if o.status.success() => None,
        _ => Some("`ip` (iproute2) is not installed".into()),
    }
}

/// Skip (with a printed reason) when namespaces are unavailable; under `CI=true`, fail.
pub fn require_or_skip(test: &str) -> bool {
    match unavailable() {
        None => true,
        Some(why) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "{test}: {why}; CI must run the network-namespace tests"
            );
            eprintln!("SKIPPED {test}: {why}");
            false
        }
    }
}

/// Two (or more) cluster namespaces joined by a WAN bridge.
pub struct Topology {
    pub wan: String,
    pub clusters: Vec<String>,
}

/// The address of cluster `i` (0-based) on the WAN.
pub fn wan_addr(i: usize) -> IpAddr {
    IpAddr::from([172, 30, 0, (i + 1) as u8])
}

impl Topology {
    /// Create `<prefix>wan` and `<prefix>c1..cN`, each cluster's `lo` carrying `lo_addrs[i]`
    /// (host routes), and `eth0` on the WAN at [`wan_addr`].
    pub fn create(prefix: &str, lo_addrs: &[Vec<IpAddr>]) -> Result<Topology, NetnsError> {
        let wan = format!("{prefix}wan");
        let mut topo = Topology {
            wan: wan.clone(),
            clusters: Vec::new(),
        };
        ip(&["netns", "add", &wan])?;
        ip(&["-n", &wan, "link", "set", "lo", "up"])?;
        ip(&["-n", &wan, "link", "add", "wan0", "type", "bridge"])?;
        ip(&["-n", &wan, "link", "set", "wan0", "up"])?;
        for (i, addrs) in lo_addrs.iter().enumerate() {
            let ns = format!("{prefix}c{}", i + 1);
            ip(&["netns", "add", &ns])?;
            topo.clusters.push(ns.clone());
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            for a in addrs {
                let cidr = if a.is_ipv4() {
                    format!("{a}/32")
                } else {
                    format!("{a}/128")
                };
                ip(&["-n", &ns, "addr", "add", &cidr, "dev", "lo"])?;
            }
            // A veth pair created in the WAN namespace, one end moved into the cluster.
            let port = format!("p{}", i + 1);
            ip(&[
                "-n", &wan, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
            ])?;
            ip(&["-n", &wan, "link", "set", "eth0", "netns", &ns])?;
            ip(&["-n", &wan, "link", "set", &port, "master", "wan0"])?;
            ip(&["-n", &wan, "link", "set", &port, "up"])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", wan_addr(i)),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        }
        Ok(topo)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in self.clusters.iter().chain(std::iter::once(&self.wan)) {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}
