//! How long optimization takes on the shipped Transformers, against the time budgets
//! (BERT at MiniLM size under 1 s, GPT-2 small under 2 s, a 48-layer GPT-2 bounded).
//! A measurement, not a test: run it in a release build on a quiet machine.
//!
//! `cargo run --release -p kiln-opt --example optimize_time`

use kiln_lower::Override;
use kiln_opt::{optimize, Options};
use std::path::Path;
use std::time::Instant;

fn main() {
    let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models");
    let cases: &[(&str, &str, &[&str], f64)] = &[
        ("BERT MiniLM-L6 (6 layers)", "bert_encoder", &[], 1.0),
        ("GPT-2 small (12 layers)", "gpt2", &[], 2.0),
        ("GPT-2, 48 layers", "gpt2", &["layers=48"], f64::INFINITY),
        ("GPT-2, 200 layers", "gpt2", &["layers=200"], f64::INFINITY),
    ];
    println!(
        "{:<28} {:>8} {:>8} {:>8} {:>10} {:>9}  budget",
        "model", "median", "min", "max", "e-nodes", "attention"
    );
    for (label, file, set, budget) in cases {
        let ov: Vec<Override> = set.iter().map(|s| Override::parse(s).expect("name=value")).collect();
        let (sources, r) = kiln_lower::load(&models.join(format!("{file}.ron")), &ov);
        let g = r.unwrap_or_else(|d| panic!("{}", d.render(&sources))).graph;
        let mut times = vec![];
        let mut last = None;
        for _ in 0..5 {
            let t = Instant::now();
            let (_, report) = optimize(&g, &Options::default()).expect("optimizes");
            times.push(t.elapsed().as_secs_f64());
            last = Some(report);
        }
        times.sort_by(f64::total_cmp);
        let r = last.expect("ran");
        let verdict = if times[2] <= *budget { "within" } else { "OVER" };
        let budget_text =
            if budget.is_finite() { format!("{verdict} {budget} s") } else { "bounded".to_string() };
        println!(
            "{label:<28} {:>7.0}ms {:>7.0}ms {:>7.0}ms {:>10} {:>9}  {budget_text} ({}; stages {:.0} ms, extraction {:.0} ms, {} steps, {})",
            times[2] * 1e3,
            times[0] * 1e3,
            times[4] * 1e3,
            r.egraph_nodes,
            r.op_counts.get("attention").copied().unwrap_or(0),
            r.stop_reason,
            r.stages.iter().map(|s| s.time_ms).sum::<f64>(),
            r.extraction.time_ms,
            r.extraction.improvements,
            r.extraction.stop_reason,
        );
    }
}
