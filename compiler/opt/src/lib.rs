//! kiln-opt: the e-graph optimizer.
//!
//! The graph goes into an [`egg`] e-graph; rule sets run in stages (algebra, then fusion with
//! algebra) under node, iteration and time limits; then matmuls sharing their left operand
//! gain a merged alternative (a rewrite of several classes at once, `rules::merge`).
//! Extraction picks the cheapest form of every output under the target's [`TargetCost`],
//! greedily per class and then refined on the whole extracted DAG, and rebuilds a graph with
//! one node per e-class, so sharing is kept. [`optimize`] returns the new graph and a
//! [`Report`] of what happened.
//!
//! **Architecture invariant:** the optimized graph computes the same outputs as the input
//! graph (property tests compare both with the reference interpreter), with the same inputs,
//! parameters and output names.

mod analysis;
mod convert;
mod cost;
mod explain;
mod extract;
mod lang;
mod report;
pub mod rules;

pub use analysis::{Facts, KGraph, Meta};
pub use cost::{flops, graph_time, reshape_copies_broadcast, TargetCost};
pub use explain::{to_text as explanations_to_text, Explanation};
pub use extract::ExtractReport;
pub use lang::{KNode, OpKey};
pub use report::{Report, StageReport};

use egg::{BackoffScheduler, Runner};
use kiln_ir::Graph;
use std::time::{Duration, Instant};

/// Limits and choices for one optimization.
#[derive(Clone, Debug)]
pub struct Options {
    pub target: TargetCost,
    /// Stop growing the e-graph past this many e-nodes.
    pub node_limit: usize,
    /// Iterations per stage.
    pub iter_limit: usize,
    /// Wall time per stage.
    pub time_limit: Duration,
    /// Record, for each fused node, the rules and spec lines it came from.
    pub explain: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            target: TargetCost::cpu_default(),
            node_limit: 400_000,
            iter_limit: 12,
            time_limit: Duration::from_secs(10),
            explain: false,
        }
    }
}

/// Why optimization failed: only an internal error (a rule built something ill-typed).
#[derive(Debug, thiserror::Error)]
pub enum OptError {
    #[error("internal optimizer error: the extracted graph does not type-check: {0}")]
    Extraction(#[from] kiln_ir::InferError),
    #[error("internal optimizer error: the extracted graph fails verification: {0}")]
    Verify(#[from] kiln_ir::VerifyError),
}

/// The rule stages, in order: each is a name and its rules.
pub fn stages() -> Vec<(&'static str, Vec<rules::Rule>)> {
    let algebra = rules::algebra::rules();
    let mut fusion = rules::fusion::rules();
    fusion.extend(rules::algebra::rules());
    vec![("algebra", algebra), ("fusion", fusion)]
}

/// Optimizes a graph; see the crate docs.
pub fn optimize(g: &Graph, opts: &Options) -> Result<(Graph, Report), OptError> {
    let start = Instant::now();
    let mut egraph = KGraph::new(Facts::new(&g.symbols));
    let loaded = convert::to_egraph(g, &mut egraph);
    let mut report = Report::new(g, &opts.target);
    for (name, rules) in stages() {
        let stage_start = Instant::now();
        let runner = Runner::default()
            .with_egraph(egraph)
            .with_node_limit(opts.node_limit)
            .with_iter_limit(opts.iter_limit)
            .with_time_limit(opts.time_limit)
            .with_scheduler(BackoffScheduler::default())
            .run(&rules);
        report.add_stage(name, &runner, stage_start.elapsed());
        egraph = runner.egraph;
    }
    // A rewrite of several classes at once, over the saturated e-graph; extraction decides.
    let merged = rules::merge::merge_shared_inputs(&mut egraph);
    if merged > 0 {
        report.rules_fired.insert(rules::merge::RULE.to_string(), merged);
    }
    // Inputs are roots too: an input no output reads still belongs to the interface.
    let roots: Vec<egg::Id> =
        loaded.outputs.iter().map(|(_, id)| *id).chain(loaded.inputs.iter().copied()).collect();
    let extraction = extract::choose(&egraph, &roots, &opts.target);
    report.extraction = extraction.report;
    let (out, classes) = convert::from_egraph(&g.name, &egraph, &loaded, &extraction.choice)?;
    kiln_ir::verify(&out)?;
    if opts.explain {
        report.explanations = explain::explain(&egraph, g, &loaded.classes, &out, &classes);
    }
    report.finish(&out, &opts.target, &egraph, start.elapsed());
    Ok((out, report))
}
