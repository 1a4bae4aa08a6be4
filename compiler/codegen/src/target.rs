//! Targets: what the code generator needs to know about the machine it compiles for.
//!
//! Everything target-specific (triple, CPU, features, vector width, register count, linker)
//! sits behind the [`Target`] trait, so kernel emitters ask questions ("how many f32 lanes?")
//! instead of matching on architectures. The NVIDIA backend will be one more implementation.

use crate::llvm::host_cpu;
use std::fmt;

/// A machine the code generator can compile for.
pub trait Target: fmt::Debug + Send + Sync {
    /// Short name as given on the command line: `host`, `x86_64`, `aarch64`.
    fn name(&self) -> &str;
    /// LLVM target triple, e.g. `x86_64-unknown-linux-gnu`.
    fn triple(&self) -> &str;
    /// LLVM CPU name, e.g. `znver3` or `generic`.
    fn cpu(&self) -> &str;
    /// LLVM feature string, e.g. `+avx2,+fma,...`.
    fn features(&self) -> &str;
    /// f32 lanes of the widest vector register kernels should use.
    fn f32_lanes(&self) -> usize;
    /// Number of architectural vector registers (bounds register tiles).
    fn vector_registers(&self) -> usize;
    /// Whether code for this target can run on the machine compiling it.
    fn runs_here(&self) -> bool;
}

/// A CPU target: the host as LLVM detects it, or a named generic one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuTarget {
    name: String,
    triple: String,
    cpu: String,
    features: String,
    lanes: usize,
    registers: usize,
    runs_here: bool,
}

impl CpuTarget {
    /// The machine we are running on, with every feature LLVM detects.
    pub fn host() -> CpuTarget {
        let host = host_cpu();
        let has = |f: &str| host.features.split(',').any(|x| x == f);
        let (lanes, registers) = if host.triple.starts_with("x86_64") {
            if has("+avx512f") {
                (16, 32)
            } else if has("+avx2") || has("+avx") {
                (8, 16)
            } else {
                (4, 16)
            }
        } else {
            (4, 32)
        };
        CpuTarget {
            name: "host".into(),
            triple: host.triple,
            cpu: host.name,
            features: host.features,
            lanes,
            registers,
            runs_here: true,
        }
    }

    /// Baseline x86-64 (SSE2): runs on any x86-64 machine.
    pub fn x86_64() -> CpuTarget {
        CpuTarget {
            name: "x86_64".into(),
            triple: "x86_64-unknown-linux-gnu".into(),
            cpu: "x86-64".into(),
            features: String::new(),
            lanes: 4,
            registers: 16,
            runs_here: std::env::consts::ARCH == "x86_64",
        }
    }

    /// 64-bit Arm with NEON (cross-compiled from here).
    pub fn aarch64() -> CpuTarget {
        CpuTarget {
            name: "aarch64".into(),
            triple: "aarch64-unknown-linux-gnu".into(),
            cpu: "generic".into(),
            features: "+neon".into(),
            lanes: 4,
            registers: 32,
            runs_here: std::env::consts::ARCH == "aarch64",
        }
    }

    /// The target named on the command line.
    pub fn by_name(name: &str) -> Option<CpuTarget> {
        match name {
            "host" | "native" => Some(CpuTarget::host()),
            "x86_64" | "x86-64" => Some(CpuTarget::x86_64()),
            "aarch64" | "arm64" => Some(CpuTarget::aarch64()),
            _ => None,
        }
    }

    /// The names [`CpuTarget::by_name`] accepts, for error messages.
    pub const NAMES: &'static [&'static str] = &["host", "x86_64", "aarch64"];
}

impl Target for CpuTarget {
    fn name(&self) -> &str {
        &self.name
    }
    fn triple(&self) -> &str {
        &self.triple
    }
    fn cpu(&self) -> &str {
        &self.cpu
    }
    fn features(&self) -> &str {
        &self.features
    }
    fn f32_lanes(&self) -> usize {
        self.lanes
    }
    fn vector_registers(&self) -> usize {
        self.registers
    }
    fn runs_here(&self) -> bool {
        self.runs_here
    }
}
