//! Compile time of the shipped transformers, stage by stage (median of 3 runs):
//! `cargo bench --bench compile`. Reported, not asserted: machines are shared and noisy.

use std::path::Path;
use std::time::{Duration, Instant};

fn median(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1e3
}

fn main() {
    let target = kiln_codegen::CpuTarget::host();
    println!("compile time on {} ({}), median of 3, ms", target_cpu(&target), std::env::consts::ARCH);
    println!(
        "{:<28} {:>9} {:>9} {:>7} {:>8} {:>11} {:>8} {:>8}",
        "model", "front", "optimize", "sched", "emit", "MLIR+LLVM", "write", "total"
    );
    for (model, set) in [("bert_encoder.ron", vec![]), ("gpt2.ron", vec![])] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models").join(model);
        let ov: Vec<kiln_lower::Override> =
            set.iter().map(|s: &&str| kiln_lower::Override::parse(s).unwrap()).collect();
        let mut times: Vec<Vec<Duration>> = vec![Vec::new(); 7];
        for _ in 0..3 {
            let t0 = Instant::now();
            let (_, lowered) = kiln_lower::load(&path, &ov);
            let lowered = lowered.unwrap_or_else(|_| panic!("{model} lowers"));
            let t1 = Instant::now();
            let (g, _) = kiln_opt::optimize(&lowered.graph, &kiln_opt::Options::default()).unwrap();
            let t2 = Instant::now();
            let s = kiln_sched::schedule(&g).unwrap();
            let t3 = Instant::now();
            let params = kiln_ir::bind_params(&g, None, 0, false).unwrap();
            let dir = tempfile::tempdir().unwrap();
            let t4 = Instant::now();
            let built = kiln_codegen::build_artifact(&g.name, &s, &params, &target, dir.path()).unwrap();
            let t5 = Instant::now();
            for (i, d) in [t1 - t0, t2 - t1, t3 - t2, built.emit_time, built.compile_time, built.write_time]
                .into_iter()
                .enumerate()
            {
                times[i].push(d);
            }
            times[6].push((t3 - t0) + (t5 - t4));
        }
        let m: Vec<f64> = times.into_iter().map(median).collect();
        println!(
            "{:<28} {:>9.0} {:>9.0} {:>7.0} {:>8.0} {:>11.0} {:>8.0} {:>8.0}",
            model, m[0], m[1], m[2], m[3], m[4], m[5], m[6]
        );
    }
    println!(
        "(write includes linking kernels.so and writing the weights; parameter initialization is excluded)"
    );
}

fn target_cpu(t: &kiln_codegen::CpuTarget) -> String {
    use kiln_codegen::Target;
    t.cpu().to_string()
}
