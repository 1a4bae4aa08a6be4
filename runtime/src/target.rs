//! Refuses kernels compiled for another machine: a wrong architecture or a missing CPU feature
//! would otherwise crash with SIGILL in the middle of a run.

use crate::error::RuntimeError;
use crate::manifest::{Target, TargetInfo};

/// Checks the manifest's target against the running machine.
pub(crate) fn check(target: &Target) -> Result<(), RuntimeError> {
    match target {
        Target::Cpu(cpu) => check_with(cpu, std::env::consts::ARCH, host_has),
        Target::Vulkan(_) => Err(RuntimeError::WrongDevice {
            artifact: target.artifact_name(),
            device: "cpu".to_string(),
            fix: "run it on a Vulkan device (\"vulkan\" or \"vulkan:N\")".to_string(),
        }),
        Target::Cuda(_) => Err(RuntimeError::WrongDevice {
            artifact: target.artifact_name(),
            device: "cpu".to_string(),
            fix: "run it on a CUDA device (\"cuda\" or \"cuda:N\")".to_string(),
        }),
    }
}

/// [`check`] with the host's architecture and feature test given, so tests can play other CPUs.
pub(crate) fn check_with(
    target: &TargetInfo,
    host_arch: &str,
    has: impl Fn(&str) -> Option<bool>,
) -> Result<(), RuntimeError> {
    let artifact_arch = triple_arch(&target.triple);
    if artifact_arch != host_arch {
        return Err(RuntimeError::TargetArch {
            triple: target.triple.clone(),
            artifact_arch: artifact_arch.to_string(),
            host_arch: host_arch.to_string(),
        });
    }
    let missing: Vec<String> = required_features(&target.features)
        .filter(|feature| has(feature) == Some(false))
        .map(str::to_string)
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(RuntimeError::MissingCpuFeatures { cpu: target.cpu.clone(), missing })
    }
}

/// The architecture of an LLVM triple, in `std::env::consts::ARCH`'s spelling.
fn triple_arch(triple: &str) -> &str {
    match triple.split('-').next().unwrap_or("") {
        "amd64" | "x86_64h" => "x86_64",
        "arm64" => "aarch64",
        "i386" | "i486" | "i586" | "i686" => "x86",
        other => other,
    }
}

/// The features an LLVM feature string switches on (`+avx2,-sse4a` → `avx2`).
fn required_features(features: &str) -> impl Iterator<Item = &str> {
    features.split(',').filter_map(|f| f.trim().strip_prefix('+'))
}

/// Whether this CPU has `feature`; `None` for features the runtime does not know how to test,
/// which are let through rather than refused.
#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
fn host_has(feature: &str) -> Option<bool> {
    Some(match feature {
        "sse2" => is_x86_feature_detected!("sse2"),
        "sse3" => is_x86_feature_detected!("sse3"),
        "ssse3" => is_x86_feature_detected!("ssse3"),
        "sse4.1" => is_x86_feature_detected!("sse4.1"),
        "sse4.2" => is_x86_feature_detected!("sse4.2"),
        "popcnt" => is_x86_feature_detected!("popcnt"),
        "avx" => is_x86_feature_detected!("avx"),
        "avx2" => is_x86_feature_detected!("avx2"),
        "fma" => is_x86_feature_detected!("fma"),
        "f16c" => is_x86_feature_detected!("f16c"),
        "bmi1" => is_x86_feature_detected!("bmi1"),
        "bmi2" => is_x86_feature_detected!("bmi2"),
        "lzcnt" => is_x86_feature_detected!("lzcnt"),
        "avx512f" => is_x86_feature_detected!("avx512f"),
        "avx512bw" => is_x86_feature_detected!("avx512bw"),
        "avx512cd" => is_x86_feature_detected!("avx512cd"),
        "avx512dq" => is_x86_feature_detected!("avx512dq"),
        "avx512vl" => is_x86_feature_detected!("avx512vl"),
        "avx512vnni" => is_x86_feature_detected!("avx512vnni"),
        "avx512bf16" => is_x86_feature_detected!("avx512bf16"),
        "avx512fp16" => is_x86_feature_detected!("avx512fp16"),
        _ => return None,
    })
}

#[cfg(not(any(target_arch = "x86", target_arch = "x86_64")))]
fn host_has(_feature: &str) -> Option<bool> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(triple: &str, features: &str) -> TargetInfo {
        TargetInfo { triple: triple.into(), cpu: "skylake-avx512".into(), features: features.into() }
    }

    /// A CPU with AVX2 and FMA but no AVX-512.
    fn avx2_only(feature: &str) -> Option<bool> {
        match feature {
            "avx2" | "fma" => Some(true),
            "avx512f" | "avx512bw" => Some(false),
            _ => None,
        }
    }

    #[test]
    fn other_architecture_is_refused_naming_both() {
        let err = check_with(&target("aarch64-unknown-linux-gnu", ""), "x86_64", avx2_only).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("aarch64") && text.contains("x86_64"), "{text}");
        assert!(check_with(&target("arm64-apple-darwin", ""), "aarch64", avx2_only).is_ok());
        assert!(check_with(&target("x86_64-unknown-linux-gnu", ""), "x86_64", avx2_only).is_ok());
    }

    #[test]
    fn missing_features_are_named() {
        let t = target("x86_64-unknown-linux-gnu", "+avx2,+fma,+avx512f,-avx512bw,+avx512bw,+unknownfeat");
        let err = check_with(&t, "x86_64", avx2_only).unwrap_err();
        match &err {
            RuntimeError::MissingCpuFeatures { missing, .. } => assert_eq!(missing, &["avx512f", "avx512bw"]),
            other => panic!("{other}"),
        }
        assert!(err.to_string().contains("avx512f, avx512bw"), "{err}");
        assert!(
            check_with(&target("x86_64-pc-linux-gnu", "+avx2,+fma,-avx512f"), "x86_64", avx2_only).is_ok()
        );
    }

    #[test]
    fn this_machine_accepts_its_own_target() {
        let triple = format!("{}-unknown-linux-gnu", std::env::consts::ARCH);
        assert!(check(&Target::Cpu(target(&triple, ""))).is_ok());
    }
}
