//! NVIDIA's PTX assembler, when this machine has it: it turns each PTX module into a cubin for
//! one architecture (loaded without the driver's JIT) and reports registers and spills. The
//! compiler never needs it: PTX alone is a complete CUDA artifact.

use crate::CodegenError;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A `ptxas` executable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ptxas {
    pub path: PathBuf,
}

/// One module assembled for one architecture.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assembled {
    /// The cubin (an ELF image).
    pub cubin: Vec<u8>,
    /// Per kernel: registers per thread, and bytes spilled to local memory by stores and loads.
    pub usage: Vec<KernelUsage>,
    /// ptxas's warnings, one line each (such as warpgroup products it had to serialize).
    pub warnings: Vec<String>,
}

/// What `ptxas -v` says about one kernel.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelUsage {
    pub kernel: String,
    pub registers: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
}

impl Ptxas {
    /// `KILN_PTXAS` when set, else `ptxas` in `$CUDA_HOME/bin`, `/usr/local/cuda/bin` or on
    /// the `PATH`; `None` when there is none that runs.
    pub fn find() -> Option<Ptxas> {
        let mut candidates: Vec<PathBuf> = Vec::new();
        if let Some(p) = std::env::var_os("KILN_PTXAS") {
            candidates.push(PathBuf::from(p));
        }
        if let Some(home) = std::env::var_os("CUDA_HOME") {
            candidates.push(Path::new(&home).join("bin/ptxas"));
        }
        candidates.push(PathBuf::from("/usr/local/cuda/bin/ptxas"));
        candidates.push(PathBuf::from("ptxas"));
        candidates.into_iter().map(|path| Ptxas { path }).find(|p| p.version().is_some())
    }

    /// The first line of `ptxas --version` that names a release, if it runs.
    pub fn version(&self) -> Option<String> {
        let out = Command::new(&self.path).arg("--version").output().ok()?;
        if !out.status.success() {
            return None;
        }
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.lines().find(|l| l.contains("release")).or(text.lines().last()).map(|l| l.trim().to_string())
    }

    /// Assembles `ptx` for `arch` (`sm_90`) at -O3 with `-v`; an error carries ptxas's
    /// message.
    pub fn assemble(&self, ptx: &str, arch: &str) -> Result<Assembled, CodegenError> {
        let dir =
            tempfile::tempdir().map_err(|e| CodegenError::Artifact(format!("a temporary directory: {e}")))?;
        let input = dir.path().join("module.ptx");
        let output = dir.path().join("module.cubin");
        std::fs::write(&input, ptx)
            .map_err(|e| CodegenError::Artifact(format!("{}: {e}", input.display())))?;
        let out = Command::new(&self.path)
            .arg(format!("-arch={arch}"))
            .args(["-O3", "-v", "-o"])
            .arg(&output)
            .arg(&input)
            .output()
            .map_err(|e| CodegenError::Artifact(format!("running {}: {e}", self.path.display())))?;
        let log = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        if !out.status.success() {
            return Err(CodegenError::Unsupported(format!(
                "ptxas -arch={arch} refused a module: {}",
                log.trim()
            )));
        }
        let cubin = std::fs::read(&output)
            .map_err(|e| CodegenError::Artifact(format!("{}: {e}", output.display())))?;
        let warnings = log.lines().filter(|l| l.contains("warning")).map(|l| l.trim().to_string()).collect();
        Ok(Assembled { cubin, usage: parse_usage(&log), warnings })
    }
}

/// Reads `ptxas -v` output: `Compiling entry function 'k3' for 'sm_90'`, then
/// `N bytes stack frame, N bytes spill stores, N bytes spill loads` and `Used N registers`.
pub fn parse_usage(log: &str) -> Vec<KernelUsage> {
    let mut out: Vec<KernelUsage> = Vec::new();
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let kernel = rest.split('\'').next().unwrap_or("").to_string();
            out.push(KernelUsage { kernel, ..KernelUsage::default() });
            continue;
        }
        let Some(current) = out.last_mut() else { continue };
        let number_before = |what: &str| -> Option<u32> {
            let head = line.split(what).next()?;
            head.split([',', ' ', ':']).rfind(|w| !w.is_empty())?.parse().ok()
        };
        if line.contains("spill stores") {
            current.spill_stores = number_before(" bytes spill stores").unwrap_or(0);
            current.spill_loads = number_before(" bytes spill loads").unwrap_or(0);
        }
        if line.contains("Used ") && line.contains(" registers") {
            let regs =
                line.split("Used ").nth(1).and_then(|r| r.split(' ').next()).and_then(|n| n.parse().ok());
            current.registers = regs.unwrap_or(0);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_is_read_from_the_verbose_log() {
        let log = "ptxas info    : 0 bytes gmem\n\
ptxas info    : Compiling entry function 'k3' for 'sm_90'\n\
ptxas info    : Function properties for k3\n\
    16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads\n\
ptxas info    : Used 40 registers, used 1 barriers, 2048 bytes smem, 384 bytes cmem[0]\n";
        assert_eq!(
            parse_usage(log),
            vec![KernelUsage { kernel: "k3".into(), registers: 40, spill_stores: 8, spill_loads: 12 }]
        );
    }
}
