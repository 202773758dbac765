//! The pod's netfilter rules that make keystamp its only way out: every outbound TCP
//! connection of another uid is redirected to the transparent listener; the pod's IPv6 egress
//! is dropped for those uids (not mirrored: one address family to reason about); with
//! `lockdown`, every other outbound packet of theirs is refused too, UDP 443 (QUIC) included,
//! so clients fall back to TCP. Loopback, DNS (port 53) and keystamp's own uid are left alone.
//! One `inet keystamp` table, replaced whole on every apply (idempotent).

use std::io::Write;
use std::process::{Command, Stdio};

use crate::config::TransparentConfig;

/// The table keystamp owns; nothing else in the pod's ruleset is touched.
const TABLE: &str = "inet keystamp";

#[derive(Debug, thiserror::Error)]
pub enum NetfilterError {
    #[error("`transparent:` is not configured: there is nothing to redirect to")]
    NotConfigured,
    #[error("running nft: {0} (the init container needs the nft binary and CAP_NET_ADMIN)")]
    Spawn(std::io::Error),
    #[error("nft refused the rules: {0}")]
    Refused(String),
}

/// The ruleset for `config`, as `nft -f` reads it.
pub fn ruleset(config: &TransparentConfig) -> String {
    let uid = config.uid;
    let port = config.listen.port();
    let redirected = match &config.ports {
        None => "meta l4proto tcp".to_string(),
        Some(ports) => {
            let list: Vec<String> = ports.iter().map(u16::to_string).collect();
            format!("tcp dport {{ {} }}", list.join(", "))
        }
    };
    let mut rules = format!(
        "table {TABLE} {{}}\n\
         flush table {TABLE}\n\
         table {TABLE} {{\n\
         \tchain steer {{\n\
         \t\ttype nat hook output priority -100; policy accept;\n\
         \t\tmeta skuid {uid} return\n\
         \t\toifname \"lo\" return\n\
         \t\tmeta nfproto ipv4 ip daddr 127.0.0.0/8 return\n\
         \t\ttcp dport 53 return\n\
         \t\tmeta nfproto ipv4 {redirected} redirect to :{port}\n\
         \t}}\n\
         \tchain guard {{\n\
         \t\ttype filter hook output priority 0; policy accept;\n\
         \t\tmeta skuid {uid} accept\n\
         \t\toifname \"lo\" accept\n\
         \t\tmeta nfproto ipv6 counter drop comment \"IPv6 egress of the agent's uids\"\n"
    );
    if config.lockdown {
        rules.push_str(
            "\t\tmeta nfproto ipv4 ip daddr 127.0.0.0/8 accept\n\
             \t\tudp dport 53 accept\n\
             \t\ttcp dport 53 accept\n\
             \t\tmeta l4proto tcp counter reject with tcp reset comment \"lockdown\"\n\
             \t\tcounter reject comment \"lockdown: UDP (QUIC included) and everything else\"\n",
        );
    }
    rules.push_str("\t}\n}\n");
    rules
}

/// Installs the ruleset (replacing keystamp's table, if any).
pub fn apply(config: Option<&TransparentConfig>) -> Result<String, NetfilterError> {
    let config = config.ok_or(NetfilterError::NotConfigured)?;
    let rules = ruleset(config);
    nft(&["-f", "-"], Some(&rules))?;
    Ok(rules)
}

/// What is installed now.
pub fn show() -> Result<String, NetfilterError> {
    nft(&["list", "table", TABLE], None)
}

/// Removes keystamp's table.
pub fn remove() -> Result<(), NetfilterError> {
    nft(&["delete", "table", TABLE], None).map(drop)
}

fn nft(args: &[&str], input: Option<&str>) -> Result<String, NetfilterError> {
    let mut child = Command::new("nft")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(NetfilterError::Spawn)?;
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(input.as_bytes())
            .map_err(NetfilterError::Spawn)?;
    }
    let output = child.wait_with_output().map_err(NetfilterError::Spawn)?;
    if !output.status.success() {
        let said = String::from_utf8_lossy(&output.stderr);
        return Err(NetfilterError::Refused(
            said.trim().chars().take(400).collect(),
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(ports: Option<Vec<u16>>, lockdown: bool) -> TransparentConfig {
        TransparentConfig {
            listen: "127.0.0.1:15001".parse().unwrap(),
            uid: 65532,
            ports,
            lockdown,
        }
    }

    #[test]
    fn every_tcp_port_is_redirected_except_keystamps_own_and_dns() {
        let rules = ruleset(&config(None, false));
        assert!(rules.contains("meta skuid 65532 return"));
        assert!(rules.contains("meta nfproto ipv4 meta l4proto tcp redirect to :15001"));
        assert!(rules.contains("tcp dport 53 return"));
        assert!(rules.contains("meta nfproto ipv6 counter drop"));
        assert!(!rules.contains("lockdown"));
        let listed = ruleset(&config(Some(vec![80, 443]), true));
        assert!(listed.contains("tcp dport { 80, 443 } redirect to :15001"));
        assert!(listed.contains("reject with tcp reset"));
    }
}
