//! The settings parser: any text is valid settings or a located error,
//! never a panic; valid settings written back out parse to the same
//! settings (and the same slot hash).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use fnrunner::function::{Settings, SlotHashId};
use fnrunner::guest::GuestKind;
use fnrunner::module_store::ModuleDigest;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match Settings::parse(text, "fuzz.toml", Path::new("/nonexistent-fuzz-dir")) {
        Ok(settings) => {
            let again = Settings::parse(&settings.to_toml(), "again.toml", Path::new("/nonexistent-fuzz-dir"))
                .expect("written settings parse back");
            assert_eq!(settings, again);
            let digest = ModuleDigest::of(b"module");
            assert_eq!(
                SlotHashId::compute(&digest, GuestKind::Cgi, &settings),
                SlotHashId::compute(&digest, GuestKind::Cgi, &again)
            );
        }
        Err(error) => assert!(error.to_string().starts_with("fuzz.toml")),
    }
});
