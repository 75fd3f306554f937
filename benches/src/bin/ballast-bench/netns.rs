//! Network namespaces for the cluster soak's partitions (`cluster --netns`).
//!
//! Each node runs in a network namespace of its own (`<prefix>-n1`..`-n3`),
//! with one interface, `eth0` at `10.99.0.<i>`, whose other end is a port of
//! a bridge in the bench's own namespace (`10.99.0.254`). A partition is a
//! pair of blackhole routes, one in each node's namespace, so two nodes
//! stop hearing each other while the bench still reaches both (a client on
//! the minority side, as in Jepsen's tests).
//!
//! The bench must itself run in a private network namespace, so nothing it
//! sets up is seen outside it (`unshare -n`, see `scripts/cluster-partitions`):
//! it refuses to start in a namespace with any interface but `lo`. Needs root
//! and the `ip` tool (iproute2). The node namespaces are deleted on drop.

use std::{net::SocketAddr, process::Command};

use anyhow::{Context, bail};

/// The bench's side of the bridge.
const BRIDGE: &str = "blbr0";
/// The nodes' subnet; node `i` (1-based) is `.i`, the bench `.254`.
const SUBNET: &str = "10.99.0";
/// Where each node listens, in its own namespace.
const PORT: u16 = 7400;

/// The namespaces of a three-node cluster, made by [`Netns::create`].
pub struct Netns {
    names: Vec<String>,
}

impl Netns {
    /// Creates `nodes` namespaces named `<prefix>-n<i>`, each linked to a
    /// bridge in the current namespace.
    pub fn create(prefix: &str, nodes: usize) -> anyhow::Result<Netns> {
        let links = ip_output(&["-o", "link", "show"])?;
        let foreign: Vec<&str> = links
            .lines()
            .filter_map(|l| l.split(':').nth(1).map(str::trim))
            .filter(|name| *name != "lo" && !name.starts_with(BRIDGE) && !name.starts_with("blv"))
            .collect();
        if !foreign.is_empty() {
            bail!(
                "--netns sets up interfaces and routes: run the bench in a private network namespace \
                 (`unshare -n`, as scripts/cluster-partitions does); this one has {foreign:?}"
            );
        }
        ip(&["link", "set", "lo", "up"])?;
        ip(&["link", "add", BRIDGE, "type", "bridge"])?;
        ip(&["addr", "add", &format!("{SUBNET}.254/24"), "dev", BRIDGE])?;
        ip(&["link", "set", BRIDGE, "up"])?;
        let mut netns = Netns { names: Vec::new() };
        for i in 1..=nodes {
            let name = format!("{prefix}-n{i}");
            let _ = ip(&["netns", "del", &name]);
            ip(&["netns", "add", &name])?;
            netns.names.push(name.clone());
            let host_end = format!("blv{i}");
            ip(&["link", "add", &host_end, "type", "veth", "peer", "name", "eth0", "netns", &name])?;
            ip(&["link", "set", &host_end, "master", BRIDGE])?;
            ip(&["link", "set", &host_end, "up"])?;
            ip(&["-n", &name, "link", "set", "lo", "up"])?;
            ip(&["-n", &name, "addr", "add", &format!("{SUBNET}.{i}/24"), "dev", "eth0"])?;
            ip(&["-n", &name, "link", "set", "eth0", "up"])?;
        }
        Ok(netns)
    }

    /// Where node `index` (0-based) listens.
    pub fn listen(index: usize) -> SocketAddr {
        SocketAddr::from(([10, 99, 0, index as u8 + 1], PORT))
    }

    /// The command that runs `program` in node `index`'s namespace.
    pub fn command(&self, index: usize, program: &std::path::Path) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.names[index]]).arg(program);
        command
    }

    /// Cuts (or, with `cut` false, heals) the link between nodes `a` and
    /// `b`, in both directions.
    pub fn set_cut(&self, a: usize, b: usize, cut: bool) -> anyhow::Result<()> {
        let verb = if cut { "add" } else { "del" };
        for (from, to) in [(a, b), (b, a)] {
            let peer = format!("{SUBNET}.{}/32", to + 1);
            ip(&["-n", &self.names[from], "route", verb, "blackhole", &peer])
                .with_context(|| format!("{verb} the cut {}-{}", from + 1, to + 1))?;
        }
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = ip(&["netns", "del", name]);
        }
        let _ = ip(&["link", "del", BRIDGE]);
    }
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    ip_output(args).map(drop)
}

fn ip_output(args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new("ip").args(args).output().context("running `ip` (iproute2)")?;
    if !output.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
