//! Helpers shared by the integration tests that run real checkpoints (`golden.rs`, `minilm.rs`).
//! Each test binary compiles this module on its own, so a helper one of them does not use is
//! not dead code.
#![allow(dead_code)]

use kiln_ir::Tensor;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The repository root (spec and golden paths in the tests are relative to it).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every tensor of a safetensors file, by name.
pub fn read_tensors(path: &Path) -> HashMap<String, Tensor> {
    kiln_ir::tensor_io::read_safetensors(path).unwrap_or_else(|e| panic!("{e}")).into_iter().collect()
}

/// Runs the `kiln` CLI in the repository root and fails the test, with everything it printed,
/// unless it succeeds. Returns its stderr (warnings).
pub fn run_kiln(args: &[&str]) -> String {
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .current_dir(root())
        .args(args)
        .output()
        .expect("run kiln");
    let stderr = String::from_utf8_lossy(&run.stderr).into_owned();
    assert!(
        run.status.success(),
        "kiln {} failed ({}):\n{}{stderr}",
        args.join(" "),
        run.status,
        String::from_utf8_lossy(&run.stdout),
    );
    stderr
}
