//! The config parser on arbitrary text: it must never panic, and an error must never repeat a
//! line of the input longer than a key may be (24 characters; a pasted secret would be in it).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Err(error) = keystamp::Config::from_yaml(std::path::Path::new("/f/k.yaml"), text) {
        let shown = error.to_string();
        for line in text
            .lines()
            .map(str::trim)
            .filter(|l| l.len() > 24 && !l.contains(':'))
        {
            if !shown.contains(line) {
                continue;
            }
            // The line may be a piece of the parser's own wording (the fuzzer finds those):
            // with the line blanked out of the input, an echo disappears, wording stays.
            let blanked = text.replace(line, &"#".repeat(line.len()));
            let still = keystamp::Config::from_yaml(std::path::Path::new("/f/k.yaml"), &blanked)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(still.contains(line), "config error echoed input: {line}");
        }
    }
});
