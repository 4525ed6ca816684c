//! The functions directory: `NAME.wasm` + `NAME.toml` pairs, written by
//! deploys so that they survive a restart.
//!
//! A deploy changes two files, and a crash must never leave a torn file or
//! a module paired with another deploy's settings. So a deploy first writes
//! both files into a staging directory `.deploy-NAME/` and marks it
//! committed (`COMMIT`, fsynced), then renames each file into place. On
//! start-up, a committed staging directory is rolled forward (its remaining
//! files renamed into place) and an uncommitted one is deleted: the
//! function is either wholly the old one or wholly the new one.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::function::{DefineError, FunctionDef};

const STAGING_PREFIX: &str = ".deploy-";
const COMMIT: &str = "COMMIT";
const MODULE: &str = "module.wasm";
const SETTINGS: &str = "settings.toml";

/// A directory of functions.
#[derive(Debug, Clone)]
pub struct FunctionDir {
    path: PathBuf,
}

impl FunctionDir {
    /// Opens `path` (which must exist) and finishes or undoes any deploy a
    /// crash interrupted.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        if !path.is_dir() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{} is not a directory", path.display()),
            ));
        }
        let dir = Self {
            path: path.to_owned(),
        };
        dir.recover()?;
        Ok(dir)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every function in the directory.
    pub fn load_all(&self) -> Result<Vec<FunctionDef>, DefineError> {
        FunctionDef::load_dir(&self.path)
    }

    /// Writes `NAME.wasm` and `NAME.toml`, atomically as a pair.
    pub fn persist(&self, name: &str, module: &[u8], settings: &str) -> std::io::Result<()> {
        let staging = self.path.join(format!("{STAGING_PREFIX}{name}"));
        if staging.exists() {
            fs::remove_dir_all(&staging)?;
        }
        fs::create_dir(&staging)?;
        write_synced(&staging.join(MODULE), module)?;
        write_synced(&staging.join(SETTINGS), settings.as_bytes())?;
        sync_dir(&staging)?;
        write_synced(&staging.join(COMMIT), b"")?;
        sync_dir(&staging)?;
        self.roll_forward(name, &staging)
    }

    /// Removes `NAME.wasm` (first: the function is gone from then on) and
    /// `NAME.toml`.
    pub fn remove(&self, name: &str) -> std::io::Result<()> {
        for ext in ["wasm", "toml"] {
            match fs::remove_file(self.path.join(format!("{name}.{ext}"))) {
                Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(error),
                _ => {}
            }
        }
        sync_dir(&self.path)
    }

    fn roll_forward(&self, name: &str, staging: &Path) -> std::io::Result<()> {
        // Settings first, module last: until the module lands, a reader
        // sees the old module (with, at worst, the new settings, which
        // were validated against the new module only — hence the staging
        // directory, which makes start-up finish the job).
        for (file, target) in [
            (SETTINGS, format!("{name}.toml")),
            (MODULE, format!("{name}.wasm")),
        ] {
            let from = staging.join(file);
            if from.exists() {
                fs::rename(&from, self.path.join(target))?;
            }
        }
        sync_dir(&self.path)?;
        fs::remove_dir_all(staging)?;
        sync_dir(&self.path)
    }

    fn recover(&self) -> std::io::Result<()> {
        for entry in fs::read_dir(&self.path)? {
            let entry = entry?;
            let file_name = entry.file_name();
            let file_name = file_name.to_string_lossy();
            let Some(name) = file_name.strip_prefix(STAGING_PREFIX) else {
                continue;
            };
            let staging = entry.path();
            if staging.join(COMMIT).exists() {
                tracing::warn!(function = name, "finishing a deploy interrupted by a crash");
                self.roll_forward(name, &staging)?;
            } else {
                tracing::warn!(function = name, "discarding a deploy interrupted by a crash");
                fs::remove_dir_all(&staging)?;
            }
        }
        Ok(())
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = fs::File::create(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

fn sync_dir(path: &Path) -> std::io::Result<()> {
    fs::File::open(path)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn persist_writes_both_files_and_leaves_no_staging() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = FunctionDir::open(tmp.path()).expect("open");
        dir.persist("f", b"\0asm\x01\0\0\0", "memory_mb = 8\n")
            .expect("persist");
        assert_eq!(
            fs::read(tmp.path().join("f.wasm")).expect("wasm"),
            b"\0asm\x01\0\0\0"
        );
        assert_eq!(
            fs::read_to_string(tmp.path().join("f.toml")).expect("toml"),
            "memory_mb = 8\n"
        );
        assert!(!tmp.path().join(".deploy-f").exists());
    }

    #[test]
    fn an_uncommitted_deploy_is_discarded_and_a_committed_one_finished() {
        let tmp = tempfile::tempdir().expect("tempdir");
        fs::write(tmp.path().join("a.wasm"), b"old a").expect("write");
        fs::write(tmp.path().join("b.wasm"), b"old b").expect("write");
        // `a`: crashed before COMMIT.
        let a = tmp.path().join(".deploy-a");
        fs::create_dir(&a).expect("mkdir");
        fs::write(a.join(MODULE), b"new a").expect("write");
        // `b`: crashed after COMMIT, settings already moved.
        let b = tmp.path().join(".deploy-b");
        fs::create_dir(&b).expect("mkdir");
        fs::write(b.join(MODULE), b"new b").expect("write");
        fs::write(b.join(COMMIT), b"").expect("write");
        fs::write(tmp.path().join("b.toml"), b"memory_mb = 1\n").expect("write");

        FunctionDir::open(tmp.path()).expect("recover");
        assert_eq!(fs::read(tmp.path().join("a.wasm")).expect("a"), b"old a");
        assert_eq!(fs::read(tmp.path().join("b.wasm")).expect("b"), b"new b");
        assert!(!a.exists() && !b.exists());
    }
}
