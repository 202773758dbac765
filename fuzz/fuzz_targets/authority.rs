//! The host/authority parser on arbitrary text: total, normalised, and what keystamp writes back
//! into a URI parses to the same host and port.
#![no_main]

use keystamp::internals::Host;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Ok((host, port)) = Host::parse_authority(text) {
        assert!(!host.as_str().is_empty() && !host.as_str().ends_with('.'));
        assert_eq!(host.as_str().to_ascii_lowercase(), host.as_str());
        let written = host.authority(port.unwrap_or(443), 0);
        let (again, again_port) = Host::parse_authority(&written).expect("round trip");
        assert_eq!(again, host);
        assert_eq!(again_port, Some(port.unwrap_or(443)));
    }
});
