//! `--out DIR`: a demo's output files written whole or not at all.
//!
//! [`OutDir::prepare`] checks DIR before any work (its parent exists and is a directory, DIR is a
//! directory if it exists, no output would be replaced without `--force`) and makes a hidden staging
//! directory: inside DIR when DIR exists, else next to it. The demo writes every output there;
//! [`OutDir::commit`] then moves them into place — the staging directory renamed to DIR, or each file
//! renamed into the existing DIR (one rename each, so a file is always the old one or the new one).
//! A run that fails, or is dropped before `commit`, removes the staging directory and leaves DIR as
//! it was.

use std::path::{Path, PathBuf};

use crate::Fail;

pub struct OutDir {
    dir: PathBuf,
    staging: PathBuf,
    /// DIR did not exist: the staging directory becomes DIR.
    fresh: bool,
    force: bool,
    files: Vec<String>,
    done: bool,
}

fn shown(p: &Path) -> String {
    molora::model::inspect::escape(&p.display().to_string())
}

impl OutDir {
    /// Checks `dir` for the outputs `files` and makes the staging directory. Errors name `--out`,
    /// the directory and what is wrong.
    pub fn prepare(dir: &Path, files: &[&str], force: bool) -> Result<OutDir, Fail> {
        let err = |what: String| Fail::failure(format!("--out {}: {what}", shown(dir)));
        let tag = format!(".molora-staging-{}", std::process::id());
        let (staging, fresh) = match std::fs::metadata(dir) {
            Ok(m) if m.is_dir() => {
                if !force {
                    for f in files {
                        let path = dir.join(f);
                        if std::fs::symlink_metadata(&path).is_ok() {
                            return Err(err(format!(
                                "{} already exists (pass --force to replace it)",
                                shown(&path)
                            )));
                        }
                    }
                }
                (dir.join(tag), false)
            }
            Ok(_) => return Err(err("exists and is not a directory".into())),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
                ) =>
            {
                let name = dir
                    .file_name()
                    .ok_or_else(|| err("does not name a directory".into()))?;
                let parent = match dir.parent() {
                    Some(p) if !p.as_os_str().is_empty() => p,
                    _ => Path::new("."),
                };
                match std::fs::metadata(parent) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => return Err(err(format!("{} is not a directory", shown(parent)))),
                    Err(e) => {
                        return Err(err(format!("its parent directory {}: {e}", shown(parent))))
                    }
                }
                let mut staged = std::ffi::OsString::from(".");
                staged.push(name);
                staged.push(&tag);
                (parent.join(staged), true)
            }
            Err(e) => return Err(err(e.to_string())),
        };
        std::fs::create_dir(&staging).map_err(|e| {
            err(format!(
                "cannot write there ({} could not be made: {e})",
                shown(&staging)
            ))
        })?;
        Ok(OutDir {
            dir: dir.to_path_buf(),
            staging,
            fresh,
            force,
            files: files.iter().map(|f| f.to_string()).collect(),
            done: false,
        })
    }

    /// The directory the outputs are written into until [`commit`](Self::commit).
    pub fn staging(&self) -> &Path {
        &self.staging
    }

    /// DIR, where the outputs end up.
    pub fn target(&self) -> &Path {
        &self.dir
    }

    /// Writes one output file into the staging directory.
    pub fn write(&self, name: &str, bytes: &[u8]) -> Result<(), Fail> {
        let path = self.staging.join(name);
        std::fs::write(&path, bytes)
            .map_err(|e| Fail::failure(format!("--out {}: writing {name}: {e}", shown(&self.dir))))
    }

    /// Moves every output into DIR, after checking that each expected file was written.
    pub fn commit(mut self) -> Result<(), Fail> {
        let err = |what: String| Fail::failure(format!("--out {}: {what}", shown(&self.dir)));
        for f in &self.files {
            if !self.staging.join(f).is_file() {
                return Err(err(format!("{f} was not written; nothing was replaced")));
            }
        }
        if self.fresh {
            std::fs::rename(&self.staging, &self.dir)
                .map_err(|e| err(format!("moving {} into place: {e}", shown(&self.staging))))?;
        } else {
            if !self.force {
                for f in &self.files {
                    let path = self.dir.join(f);
                    if std::fs::symlink_metadata(&path).is_ok() {
                        return Err(err(format!(
                            "{} appeared while the demo ran (pass --force to replace it)",
                            shown(&path)
                        )));
                    }
                }
            }
            for f in &self.files {
                std::fs::rename(self.staging.join(f), self.dir.join(f))
                    .map_err(|e| err(format!("moving {f} into place: {e}")))?;
            }
            let _ = std::fs::remove_dir_all(&self.staging);
        }
        self.done = true;
        Ok(())
    }
}

impl Drop for OutDir {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_dir_all(&self.staging);
        }
    }
}
