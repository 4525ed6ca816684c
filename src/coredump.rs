//! Wasm core dumps of trapping calls, kept in a directory bounded in count
//! and total size (oldest removed first), and the metric counting them.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;

use crate::runner::DumpSink;

/// Dumps kept unless configured.
pub const DEFAULT_MAX_DUMPS: usize = 20;
/// Total bytes of dumps kept unless configured.
pub const DEFAULT_MAX_DUMP_BYTES: u64 = 512 << 20;
const EXTENSION: &str = "coredump";

pub struct DumpDir {
    path: PathBuf,
    max_files: usize,
    max_bytes: u64,
    written: Counter,
    /// Serialises writes and pruning.
    lock: Mutex<()>,
}

impl DumpDir {
    pub fn open(
        path: &Path,
        max_files: usize,
        max_bytes: u64,
        registry: &mut Registry,
    ) -> std::io::Result<Self> {
        std::fs::create_dir_all(path)?;
        let written = Counter::default();
        registry.register(
            "fnrunner_core_dumps_written",
            "Wasm core dumps written for trapping calls",
            written.clone(),
        );
        Ok(Self {
            path: path.to_owned(),
            max_files,
            max_bytes,
            written,
            lock: Mutex::new(()),
        })
    }

    /// Dump files, oldest first (names start with a sortable timestamp).
    fn dumps(&self) -> Vec<(PathBuf, u64)> {
        let Ok(entries) = std::fs::read_dir(&self.path) else {
            return Vec::new();
        };
        let mut dumps: Vec<(PathBuf, u64)> = entries
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .filter(|path| path.extension().is_some_and(|ext| ext == EXTENSION))
            .map(|path| {
                let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                (path, size)
            })
            .collect();
        dumps.sort();
        dumps
    }

    fn prune(&self) {
        let mut dumps = self.dumps();
        let mut total: u64 = dumps.iter().map(|(_, size)| size).sum();
        while !dumps.is_empty() && (dumps.len() > self.max_files || total > self.max_bytes) {
            let (oldest, size) = dumps.remove(0);
            if std::fs::remove_file(&oldest).is_ok() {
                total = total.saturating_sub(size);
            }
        }
    }
}

impl DumpSink for DumpDir {
    fn write(&self, call_id: &str, function: &str, dump: &[u8]) {
        let _guard = crate::lock(&self.lock);
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros())
            .unwrap_or_default();
        let name = format!("{stamp:020}-{function}-{call_id}.{EXTENSION}");
        let temp = self.path.join(format!(".{name}.tmp"));
        let result = std::fs::write(&temp, dump).and_then(|()| std::fs::rename(&temp, self.path.join(&name)));
        match result {
            Ok(()) => {
                self.written.inc();
                tracing::info!(call_id, function, file = %name, bytes = dump.len(), "core dump written");
                self.prune();
            }
            Err(error) => {
                let _ = std::fs::remove_file(&temp);
                tracing::warn!(call_id, function, %error, "cannot write a core dump");
            }
        }
    }

    fn count(&self) -> u64 {
        self.dumps().len() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dumps_are_bounded_by_count_and_size_oldest_first() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut registry = Registry::default();
        let dir = DumpDir::open(tmp.path(), 3, 250, &mut registry).expect("open");
        for i in 0..5 {
            dir.write(&format!("call{i}"), "f", &[0u8; 50]);
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        assert_eq!(dir.count(), 3);
        let names: Vec<String> = dir.dumps().iter().map(|(p, _)| p.display().to_string()).collect();
        assert!(
            names.iter().all(|n| !n.contains("call0") && !n.contains("call1")),
            "{names:?}"
        );
        dir.write("big", "f", &[0u8; 200]);
        assert!(dir.dumps().iter().map(|(_, s)| s).sum::<u64>() <= 250);
    }
}
