//! Records the wasmtime version from Cargo.lock, for reports (`fnrunner
//! bench --json`) to say which engine they measured.

fn main() {
    println!("cargo:rerun-if-changed=Cargo.lock");
    let lock = std::fs::read_to_string("Cargo.lock").unwrap_or_default();
    let mut lines = lock.lines();
    let mut version = String::from("unknown");
    while let Some(line) = lines.next() {
        if line == "name = \"wasmtime\"" {
            if let Some(next) = lines.next()
                && let Some(v) = next.strip_prefix("version = \"")
            {
                version = v.trim_end_matches('"').to_owned();
            }
            break;
        }
    }
    println!("cargo:rustc-env=FNRUNNER_WASMTIME_VERSION={version}");
}
