//! The runtime's dependency boundary: no MLIR or LLVM (not even transitively) and no other Kiln
//! crate, so a deployed model never links the compiler.

use std::path::Path;
use std::process::Command;

#[test]
fn runtime_links_no_compiler() {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let output = Command::new(env!("CARGO"))
        .args(["tree", "-p", "kiln-runtime", "-e", "normal,build", "--prefix", "none"])
        .current_dir(&workspace)
        .output()
        .expect("run cargo tree");
    assert!(output.status.success(), "cargo tree failed: {}", String::from_utf8_lossy(&output.stderr));
    let tree = String::from_utf8_lossy(&output.stdout);
    assert!(tree.lines().any(|l| l.starts_with("kiln-runtime ")), "unexpected cargo tree output:\n{tree}");
    let forbidden: Vec<&str> = tree
        .lines()
        .filter(|line| {
            let name = line.split_whitespace().next().unwrap_or("").to_ascii_lowercase();
            ["melior", "mlir", "inkwell", "llvm"].iter().any(|f| name.contains(f))
                || (name.starts_with("kiln") && name != "kiln-runtime")
        })
        .collect();
    assert!(forbidden.is_empty(), "kiln-runtime must not depend on these:\n{}", forbidden.join("\n"));
}
