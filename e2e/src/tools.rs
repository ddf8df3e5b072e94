//! Where the harness finds its binaries: the Go-built control-plane tools and `ninelives`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::error::{Error, Result};

/// The workspace root (the parent of `e2e/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// Directory of kube-apiserver, kubectl and helm: `$NINELIVES_E2E_BIN`, else
/// `<repo>/.e2e-cache/bin` (where `e2e/tools/build.sh` puts them).
pub fn tool_dir() -> PathBuf {
    std::env::var_os("NINELIVES_E2E_BIN").map_or_else(|| repo_root().join(".e2e-cache/bin"), PathBuf::from)
}

/// Path of a cached tool, or an error that says how to build it.
pub fn tool(name: &'static str) -> Result<PathBuf> {
    let path = tool_dir().join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::MissingTool { tool: name, path: path.display().to_string() })
    }
}

/// The `ninelives` binary: `$NINELIVES_BIN`, else built once per process with
/// `cargo build -p ninelives` into the workspace's target directory.
pub fn ninelives() -> Result<PathBuf> {
    static BUILT: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    if let Some(path) = std::env::var_os("NINELIVES_BIN") {
        return Ok(PathBuf::from(path));
    }
    BUILT
        .get_or_init(|| {
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let output = Command::new(cargo)
                .args(["build", "--quiet", "-p", "ninelives", "--message-format=short"])
                .current_dir(repo_root())
                .output()
                .map_err(|e| e.to_string())?;
            if !output.status.success() {
                return Err(String::from_utf8_lossy(&output.stderr).into_owned());
            }
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map_or_else(|| repo_root().join("target"), PathBuf::from);
            Ok(target.join("debug/ninelives"))
        })
        .clone()
        .map_err(Error::Build)
}
