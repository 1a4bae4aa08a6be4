//! The optimization report: what fired, what it cost, how big the e-graph grew, and why each
//! stage stopped.

use crate::analysis::KGraph;
use crate::cost::{graph_time, TargetCost};
use crate::lang::KNode;
use egg::Runner;
use kiln_ir::Graph;
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Duration;

/// One rule stage of the run.
#[derive(Clone, Debug, Serialize)]
pub struct StageReport {
    pub name: String,
    pub iterations: usize,
    pub stop_reason: String,
    pub egraph_nodes: usize,
    pub egraph_classes: usize,
    pub time_ms: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Ops of the optimized graph by name (`attention`, `layer_norm`, …).
    pub op_counts: BTreeMap<String, usize>,
    /// How often each rule added something new.
    pub rules_fired: BTreeMap<String, usize>,
    /// Estimated seconds of the graph before and after, on the target.
    pub cost_before: f64,
    pub cost_after: f64,
    pub target: TargetCost,
    pub nodes_before: usize,
    pub nodes_after: usize,
    pub egraph_nodes: usize,
    pub egraph_classes: usize,
    pub iterations: usize,
    /// Why the last stage stopped (saturated, or which limit it hit).
    pub stop_reason: String,
    pub stages: Vec<StageReport>,
    /// What extraction did: the greedy and refined DAG costs, steps kept, why it stopped.
    pub extraction: crate::ExtractReport,
    pub time_ms: f64,
    /// With `Options::explain`: why each fused node exists.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub explanations: Vec<crate::Explanation>,
}

impl Report {
    pub fn new(g: &Graph, target: &TargetCost) -> Report {
        Report {
            op_counts: BTreeMap::new(),
            rules_fired: BTreeMap::new(),
            cost_before: graph_time(g, target),
            cost_after: 0.0,
            target: target.clone(),
            nodes_before: g.node_count(),
            nodes_after: 0,
            egraph_nodes: 0,
            egraph_classes: 0,
            iterations: 0,
            stop_reason: String::new(),
            stages: vec![],
            extraction: Default::default(),
            time_ms: 0.0,
            explanations: vec![],
        }
    }

    pub fn add_stage(&mut self, name: &str, runner: &Runner<KNode, crate::Facts>, time: Duration) {
        for it in &runner.iterations {
            for (rule, n) in &it.applied {
                *self.rules_fired.entry(rule.to_string()).or_insert(0) += n;
            }
        }
        let stop = match &runner.stop_reason {
            Some(egg::StopReason::Saturated) => "saturated".to_string(),
            Some(egg::StopReason::IterationLimit(n)) => format!("iteration limit ({n})"),
            Some(egg::StopReason::NodeLimit(n)) => format!("node limit ({n})"),
            Some(egg::StopReason::TimeLimit(s)) => format!("time limit ({s:.1} s)"),
            Some(egg::StopReason::Other(s)) => s.clone(),
            None => "not run".to_string(),
        };
        self.iterations += runner.iterations.len();
        self.stages.push(StageReport {
            name: name.to_string(),
            iterations: runner.iterations.len(),
            stop_reason: stop.clone(),
            egraph_nodes: runner.egraph.total_number_of_nodes(),
            egraph_classes: runner.egraph.number_of_classes(),
            time_ms: time.as_secs_f64() * 1e3,
        });
        self.stop_reason = stop;
    }

    pub fn finish(&mut self, out: &Graph, target: &TargetCost, egraph: &KGraph, time: Duration) {
        for id in out.node_ids() {
            *self.op_counts.entry(out.node(id).op.name().to_string()).or_insert(0) += 1;
        }
        self.cost_after = graph_time(out, target);
        self.nodes_after = out.node_count();
        self.egraph_nodes = egraph.total_number_of_nodes();
        self.egraph_classes = egraph.number_of_classes();
        self.time_ms = time.as_secs_f64() * 1e3;
    }

    /// A short human summary.
    pub fn summary(&self) -> String {
        let fired: Vec<String> = self.rules_fired.iter().map(|(k, v)| format!("{k} {v}")).collect();
        format!(
            "optimized in {:.0} ms: {} → {} nodes, estimated {:.3} ms → {:.3} ms on {}; e-graph {} nodes / {} classes, {} iterations, stopped: {}\nrules fired: {}",
            self.time_ms,
            self.nodes_before,
            self.nodes_after,
            self.cost_before * 1e3,
            self.cost_after * 1e3,
            self.target.name,
            self.egraph_nodes,
            self.egraph_classes,
            self.iterations,
            self.stop_reason,
            fired.join(", ")
        )
    }
}
