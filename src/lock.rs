//! One writer per workdir: an advisory lock (`flock`, through `fs4`) on
//! `<workdir>/cache/pipeline.lock`, held for as long as a command that writes the cache runs.
//!
//! A second `pipeline run` on the same workdir is refused with the holder's pid, which the holder
//! writes into the lock file. The operating system releases the lock when its holder exits, however
//! it exits (a crash, `kill -9`), so a lock left by a dead process is simply taken over; the file
//! itself stays (deleting a lock file is what makes lock files racy).

use crate::error::{bail, Context, Result};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Held for the life of the value; dropping it (or the process ending) releases the lock.
#[derive(Debug)]
pub struct WorkdirLock {
    file: File,
    path: PathBuf,
}

impl WorkdirLock {
    /// The lock file of `workdir`.
    fn path_in(workdir: &Path) -> PathBuf {
        workdir.join("cache").join("pipeline.lock")
    }

    /// Take the workdir's lock, or fail at once naming the process that holds it.
    pub fn acquire(workdir: &Path) -> Result<WorkdirLock> {
        let path = Self::path_in(workdir);
        let dir = path.parent().expect("the lock file has a folder");
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening the workdir lock {}", path.display()))?;
        match fs4::FileExt::try_lock(&file) {
            Ok(()) => {}
            Err(fs4::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                let who = if holder.is_empty() {
                    "another process".to_string()
                } else {
                    format!("another `pipeline` (pid {holder})")
                };
                bail!(
                    "workdir {} is in use by {who}, which holds {}; wait for it to finish, \
                     or give this command another --workdir",
                    workdir.display(),
                    path.display()
                );
            }
            Err(fs4::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("locking {}", path.display()))
            }
        }
        // Ours now: record who holds it, for the message a second process prints.
        file.set_len(0)?;
        file.seek(SeekFrom::Start(0))?;
        writeln!(file, "{}", std::process::id())?;
        file.flush()?;
        Ok(WorkdirLock { file, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for WorkdirLock {
    fn drop(&mut self) {
        // Closing the file releases the lock too; unlocking first makes the release immediate
        // even if something else still holds a duplicate of the descriptor.
        let _ = fs4::FileExt::unlock(&self.file);
    }
}
