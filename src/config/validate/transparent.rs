//! The `transparent:` section: where redirected connections arrive, whose connections are
//! exempt, which ports are redirected, and whether everything else is dropped.

use std::net::SocketAddr;

use super::super::raw::RawTransparent;
use super::super::TransparentConfig;
use super::Errors;

/// Where the transparent listener binds unless `listen:` says otherwise (Istio uses 15001).
const DEFAULT_LISTEN: &str = "127.0.0.1:15001";

impl Errors<'_> {
    pub(super) fn transparent(&mut self, raw: &RawTransparent) -> Option<TransparentConfig> {
        let listen = match raw.listen.as_deref() {
            Some(text) => self.socket_addr("transparent.listen", text),
            None => DEFAULT_LISTEN.parse::<SocketAddr>().ok(),
        };
        if listen.is_some_and(|addr| !addr.ip().is_loopback()) {
            self.push(
                "transparent.listen",
                "must be a loopback address: only this pod's own redirected connections come here",
            );
        }
        if raw.uid == 0 {
            self.push(
                "transparent.uid",
                "keystamp must not run as root: give the uid it runs as (the chart uses 65532)",
            );
        }
        if raw
            .ports
            .as_ref()
            .is_some_and(|ports| ports.is_empty() || ports.contains(&0))
        {
            self.push(
                "transparent.ports",
                "list TCP ports from 1 to 65535, or leave it out for every port",
            );
        }
        Some(TransparentConfig {
            listen: listen?,
            uid: raw.uid,
            ports: raw.ports.clone(),
            lockdown: raw.lockdown.unwrap_or(false),
        })
    }
}
