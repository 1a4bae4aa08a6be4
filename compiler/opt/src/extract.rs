//! Extraction: which e-node computes each class of the optimized graph.
//!
//! Two steps. **Greedy bottom-up** gives every class its cheapest node by a per-class cost:
//! a node costs its own time plus the larger of (a) the costs of the children only it uses
//! and (b) its costliest child. Plain tree costs count a shared subexpression once per use,
//! which doubles at every residual connection; here shared classes are paid once, wherever
//! they sit, so costs grow linearly with depth and two alternatives over the same operands
//! differ by exactly their own work. The costs are computed once per node in order of
//! increasing cost (Knuth's generalization of Dijkstra: the cost of a node is at least that of
//! each child), so every node is costed exactly once.
//!
//! A per-class cost cannot see sharing across classes: whether `layer_norm(a + b)` beats
//! `add_norm(a, b)` depends on whether the graph computes `a + b` anyway, and merging three
//! projections into one wide matmul pays only if all three read slices of it. **DAG
//! refinement** therefore starts from the greedy choice and costs the *whole extracted DAG*,
//! each chosen class paid once: for every class of the DAG, bottom-up, it tries each other
//! node of the class, keeping reference counts so a move costs only the classes it brings in
//! or frees. When a move brings in new classes, other classes of the DAG that have a node
//! over those classes may switch along with it (its "followers"): the move and the followers
//! that help are one step. A step is kept only if it strictly lowers the DAG's cost, and
//! passes repeat until none does, or a pass or work bound is reached. A move that would make a
//! class depend on itself is refused: the DAG is kept in a topological order, and a path back
//! to the moved class can only run through classes placed between the two.
//!
//! The choice is then rebuilt as a DAG (`convert.rs`), one node per class, so the graph never
//! duplicates a class.

use crate::analysis::KGraph;
use crate::cost::{is_run_invariant, reshape_copies_broadcast, TargetCost};
use crate::lang::KNode;
use egg::Id;
use serde::Serialize;
use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap};
use std::time::Instant;

/// The refinement stops after this many passes over the DAG.
const MAX_PASSES: usize = 8;
/// … or after visiting this many classes per e-node of the e-graph, in all moves together.
const WORK_PER_NODE: usize = 400;
/// A tiny per-node term breaks ties toward fewer nodes (views and leaves cost 0).
const PER_NODE: f64 = 1e-12;
/// A step must lower the DAG's cost by more than this, seconds (rounding is far below it).
const MIN_GAIN: f64 = 1e-14;

/// What extraction did, for the report.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ExtractReport {
    /// Estimated seconds of the greedy choice's DAG, each class paid once.
    pub greedy_cost: f64,
    /// … and after refinement.
    pub refined_cost: f64,
    /// Steps kept by the refinement (a step is one class's switch and its followers).
    pub improvements: usize,
    pub passes: usize,
    /// `fixed point`, `pass limit (8)` or `work limit`.
    pub stop_reason: String,
    pub time_ms: f64,
}

/// The chosen node of every class reachable from the roots (keys are canonical ids).
pub struct Extraction {
    pub choice: HashMap<Id, KNode>,
    pub report: ExtractReport,
}

const NONE: u32 = u32::MAX;

/// The e-graph flattened into dense arrays: classes `0..classes`, nodes grouped by class.
struct Dense {
    /// Canonical id of each dense class.
    ids: Vec<Id>,
    /// Nodes of class `c` are `class_nodes[c]..class_nodes[c + 1]`.
    class_nodes: Vec<u32>,
    node_class: Vec<u32>,
    /// Children of node `n` are `children[child_start[n]..child_start[n + 1]]` (dense
    /// classes, in operand order, repeats kept).
    child_start: Vec<u32>,
    children: Vec<u32>,
    /// Each node's own time (∞ when it does not type-check).
    own: Vec<f64>,
    /// Nodes that read each class, each node once.
    parents: Vec<Vec<u32>>,
    /// How many child slots of all nodes name each class.
    uses: Vec<u32>,
}

impl Dense {
    fn new(egraph: &KGraph, target: &TargetCost) -> Dense {
        let mut ids: Vec<Id> = egraph.classes().map(|c| c.id).collect();
        ids.sort();
        let max = ids.iter().map(|i| usize::from(*i)).max().unwrap_or(0);
        let mut index = vec![NONE; max + 1];
        for (i, id) in ids.iter().enumerate() {
            index[usize::from(*id)] = i as u32;
        }
        let dense = |c: Id| index[usize::from(egraph.find(c))];
        let (mut class_nodes, mut node_class, mut child_start, mut children) =
            (vec![0u32], vec![], vec![0u32], vec![]);
        let mut ops = vec![];
        for (ci, id) in ids.iter().enumerate() {
            for node in &egraph[*id].nodes {
                node_class.push(ci as u32);
                children.extend(node.children.iter().map(|c| dense(*c)));
                child_start.push(children.len() as u32);
                ops.push(node);
            }
            class_nodes.push(node_class.len() as u32);
        }
        let classes = ids.len();
        let mut parents: Vec<Vec<u32>> = vec![vec![]; classes];
        let mut uses = vec![0u32; classes];
        for n in 0..node_class.len() {
            let kids = &children[child_start[n] as usize..child_start[n + 1] as usize];
            for (i, &c) in kids.iter().enumerate() {
                uses[c as usize] += 1;
                if !kids[..i].contains(&c) {
                    parents[c as usize].push(n as u32);
                }
            }
        }
        let mut d = Dense { ids, class_nodes, node_class, child_start, children, own: vec![], parents, uses };
        let weight_only = if target.folds_weights { d.weight_only(&ops) } else { vec![false; classes] };
        let hints = egraph.analysis.hints();
        d.own = ops
            .iter()
            .enumerate()
            .map(|(n, node)| {
                let kids = d.kids(n as u32);
                let types: Vec<&kiln_ir::TensorType> =
                    kids.iter().map(|c| &egraph[d.ids[*c as usize]].data.ty).collect();
                let folded = target.folds_weights
                    && is_run_invariant(node.ir())
                    && kids.iter().all(|c| weight_only[*c as usize]);
                match kiln_ir::infer_with(node.ir(), &types, &egraph.analysis.symbols) {
                    Ok(_) if folded => PER_NODE,
                    Ok(t) => {
                        // Costs at the symbols' hints.
                        let at: Vec<kiln_ir::TensorType> = types.iter().map(|t| t.at(&hints)).collect();
                        let at: Vec<&kiln_ir::TensorType> = at.iter().collect();
                        let out = t.at(&hints);
                        let copy = match (node.ir(), kids) {
                            (kiln_ir::Op::Reshape { .. }, [x])
                                if d.copies_broadcast(*x, &out, &ops, egraph, &hints) =>
                            {
                                target.reshape_of_broadcast_time(&out)
                            }
                            _ => 0.0,
                        };
                        target.node_time(node.ir(), &at, &out) + copy + PER_NODE
                    }
                    Err(_) => f64::INFINITY,
                }
            })
            .collect();
        d
    }

    /// Whether reshaping class `c` to `out` is a copy: `c` holds a `broadcast_to` whose repeated
    /// axis the reshape merges (`reshape_copies_broadcast`, `TargetCost::reshape_of_broadcast_time`).
    fn copies_broadcast(
        &self,
        c: u32,
        out: &kiln_ir::TensorType,
        ops: &[&KNode],
        egraph: &KGraph,
        hints: &[i64],
    ) -> bool {
        let ty = |c: u32| egraph[self.ids[c as usize]].data.ty.at(hints);
        self.nodes_of(c).any(|n| match self.kids(n) {
            [x] => reshape_copies_broadcast(ops[n as usize].ir(), &ty(*x), &ty(c), out),
            _ => false,
        })
    }

    fn kids(&self, n: u32) -> &[u32] {
        &self.children[self.child_start[n as usize] as usize..self.child_start[n as usize + 1] as usize]
    }

    fn nodes_of(&self, c: u32) -> std::ops::Range<u32> {
        self.class_nodes[c as usize]..self.class_nodes[c as usize + 1]
    }

    /// Classes with a node that reads only parameters and constants (transitively).
    fn weight_only(&self, ops: &[&KNode]) -> Vec<bool> {
        let classes = self.ids.len();
        let mut known = vec![false; classes];
        let mut pending: Vec<usize> = (0..ops.len())
            .map(|n| {
                let kids = self.kids(n as u32);
                (0..kids.len()).filter(|i| !kids[..*i].contains(&kids[*i])).count()
            })
            .collect();
        let mut stack: Vec<u32> = vec![];
        for (n, op) in ops.iter().enumerate() {
            let c = self.node_class[n];
            if pending[n] == 0 && is_run_invariant(op.ir()) && !known[c as usize] {
                known[c as usize] = true;
                stack.push(c);
            }
        }
        while let Some(c) = stack.pop() {
            for &p in &self.parents[c as usize] {
                pending[p as usize] -= 1;
                let pc = self.node_class[p as usize];
                if pending[p as usize] == 0 && is_run_invariant(ops[p as usize].ir()) && !known[pc as usize] {
                    known[pc as usize] = true;
                    stack.push(pc);
                }
            }
        }
        known
    }
}

/// A cost in a heap, ordered totally.
#[derive(PartialEq)]
struct Cost(f64);
impl Eq for Cost {}
impl PartialOrd for Cost {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Cost {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// The greedy choice: for each class, the first of its nodes of least per-class cost
/// (`NONE` for a class no finite node computes).
fn greedy(d: &Dense) -> Vec<u32> {
    let classes = d.ids.len();
    let nodes = d.node_class.len();
    let mut class_cost = vec![f64::INFINITY; classes];
    let mut node_cost = vec![f64::INFINITY; nodes];
    let mut done = vec![false; classes];
    let mut pending: Vec<usize> = (0..nodes)
        .map(|n| {
            let kids = d.kids(n as u32);
            (0..kids.len()).filter(|i| !kids[..*i].contains(&kids[*i])).count()
        })
        .collect();
    let mut heap: BinaryHeap<Reverse<(Cost, u32)>> = BinaryHeap::new();
    let node_total = |n: u32, class_cost: &[f64]| {
        let (mut private, mut deepest) = (0.0f64, 0.0f64);
        for &c in d.kids(n) {
            let cost = class_cost[c as usize];
            if d.uses[c as usize] <= 1 {
                private += cost;
            }
            deepest = deepest.max(cost);
        }
        // At least the costliest child plus its own: costs grow strictly along every path,
        // so the chosen nodes can never form a cycle (x = x · 1 never picks itself).
        d.own[n as usize] + private.max(deepest)
    };
    for n in 0..nodes as u32 {
        if pending[n as usize] == 0 && d.own[n as usize].is_finite() {
            let cost = node_total(n, &class_cost);
            node_cost[n as usize] = cost;
            let c = d.node_class[n as usize];
            if cost < class_cost[c as usize] {
                class_cost[c as usize] = cost;
                heap.push(Reverse((Cost(cost), c)));
            }
        }
    }
    while let Some(Reverse((Cost(cost), c))) = heap.pop() {
        if done[c as usize] || cost > class_cost[c as usize] {
            continue;
        }
        done[c as usize] = true;
        for &p in &d.parents[c as usize] {
            pending[p as usize] -= 1;
            if pending[p as usize] > 0 || !d.own[p as usize].is_finite() {
                continue;
            }
            let total = node_total(p, &class_cost);
            node_cost[p as usize] = total;
            let pc = d.node_class[p as usize];
            if total < class_cost[pc as usize] && !done[pc as usize] {
                class_cost[pc as usize] = total;
                heap.push(Reverse((Cost(total), pc)));
            }
        }
    }
    (0..classes as u32)
        .map(|c| {
            d.nodes_of(c)
                .filter(|n| node_cost[*n as usize].is_finite())
                .min_by(|a, b| node_cost[*a as usize].total_cmp(&node_cost[*b as usize]))
                .unwrap_or(NONE)
        })
        .collect()
}

/// One undoable change to the refinement's state.
enum Change {
    Refs(u32, u32),
    Choice(u32, u32),
}

/// The DAG refinement's state: the choice, reference counts (live classes have one or more),
/// a topological position of every live class, and the changes of the step being tried.
struct Refiner<'d> {
    d: &'d Dense,
    choice: Vec<u32>,
    refs: Vec<u32>,
    pos: Vec<u32>,
    log: Vec<Change>,
    delta: f64,
    /// Per-move stamps: classes brought in by the current move, and those on its walk stack.
    epoch: u32,
    brought: Vec<u32>,
    on_path: Vec<u32>,
    seen: Vec<u32>,
    work: usize,
}

impl<'d> Refiner<'d> {
    fn new(d: &'d Dense, choice: Vec<u32>, roots: &[u32]) -> Refiner<'d> {
        let classes = d.ids.len();
        let mut r = Refiner {
            d,
            choice,
            refs: vec![0; classes],
            pos: vec![NONE; classes],
            log: vec![],
            delta: 0.0,
            epoch: 0,
            brought: vec![0; classes],
            on_path: vec![0; classes],
            seen: vec![0; classes],
            work: 0,
        };
        let mut stack: Vec<u32> = roots.to_vec();
        for &root in roots {
            r.refs[root as usize] += 1;
        }
        // Every live class once: its chosen node's children are referenced once per slot.
        let mut visited = vec![false; classes];
        for &root in roots {
            visited[root as usize] = true;
        }
        while let Some(c) = stack.pop() {
            for &k in d.kids(r.choice[c as usize]) {
                r.refs[k as usize] += 1;
                if !visited[k as usize] {
                    visited[k as usize] = true;
                    stack.push(k);
                }
            }
        }
        r.log.clear();
        r.place(roots);
        r
    }

    /// The live classes in a topological order (children first), as positions.
    fn place(&mut self, roots: &[u32]) {
        let d = self.d;
        self.pos.iter_mut().for_each(|p| *p = NONE);
        let mut next = 0u32;
        for &root in roots {
            if self.pos[root as usize] != NONE {
                continue;
            }
            let mut stack: Vec<(u32, usize)> = vec![(root, 0)];
            // Mark as "entered" with a placeholder so shared classes are entered once.
            self.pos[root as usize] = NONE - 1;
            while let Some((c, i)) = stack.last_mut() {
                let kids = d.kids(self.choice[*c as usize]);
                if *i < kids.len() {
                    let k = kids[*i];
                    *i += 1;
                    if self.pos[k as usize] == NONE {
                        self.pos[k as usize] = NONE - 1;
                        stack.push((k, 0));
                    }
                } else {
                    self.pos[*c as usize] = next;
                    next += 1;
                    stack.pop();
                }
            }
        }
    }

    fn live(&self, c: u32) -> bool {
        self.refs[c as usize] > 0
    }

    fn set_refs(&mut self, c: u32, to: u32) {
        self.log.push(Change::Refs(c, self.refs[c as usize]));
        self.refs[c as usize] = to;
    }

    fn undo_to(&mut self, mark: usize, delta: f64) {
        while self.log.len() > mark {
            match self.log.pop() {
                Some(Change::Refs(c, v)) => self.refs[c as usize] = v,
                Some(Change::Choice(c, v)) => self.choice[c as usize] = v,
                None => break,
            }
        }
        self.delta = delta;
    }

    /// Whether `target` is reachable from the live class `from` through chosen nodes. Valid
    /// while `pos` is a topological order of the live classes other than `target`'s new
    /// choice: a path from `from` down to `target` only visits classes placed above
    /// `target`.
    fn reaches(&mut self, from: u32, target: u32) -> bool {
        let d = self.d;
        let floor = self.pos[target as usize];
        if self.pos[from as usize] < floor {
            return false;
        }
        self.epoch += 1;
        let stamp = self.epoch;
        let mut stack = vec![from];
        self.seen[from as usize] = stamp;
        while let Some(c) = stack.pop() {
            if c == target {
                return true;
            }
            self.work += 1;
            for &k in d.kids(self.choice[c as usize]) {
                if self.seen[k as usize] != stamp && self.pos[k as usize] >= floor {
                    self.seen[k as usize] = stamp;
                    stack.push(k);
                }
            }
        }
        false
    }

    /// Makes `n` the chosen node of the live class `c`, updating the reference counts and
    /// `delta`; false (with the changes still logged, to undo) if it would close a cycle.
    fn switch(&mut self, c: u32, n: u32) -> bool {
        let d = self.d;
        let old = self.choice[c as usize];
        self.log.push(Change::Choice(c, old));
        self.choice[c as usize] = n;
        self.delta += self.d.own[n as usize] - self.d.own[old as usize];
        self.epoch += 1;
        let move_stamp = self.epoch;
        // Bring in what the new node reads, depth first, watching for a path back to `c`.
        self.on_path[c as usize] = move_stamp;
        let mut stack: Vec<(u32, usize)> = vec![(c, 0)];
        while let Some(&mut (p, ref mut i)) = stack.last_mut() {
            let kids = d.kids(self.choice[p as usize]);
            if *i == kids.len() {
                self.on_path[p as usize] = 0;
                stack.pop();
                continue;
            }
            let k = kids[*i];
            *i += 1;
            self.work += 1;
            if self.on_path[k as usize] == move_stamp {
                return false;
            }
            let was = self.refs[k as usize];
            self.set_refs(k, was + 1);
            if was > 0 {
                // Already live: brought in by this move (and finished), or live before it,
                // when it must not reach `c`.
                if self.brought[k as usize] != move_stamp && self.reaches(k, c) {
                    return false;
                }
                continue;
            }
            let chosen = self.choice[k as usize];
            if chosen == NONE {
                return false;
            }
            self.brought[k as usize] = move_stamp;
            self.on_path[k as usize] = move_stamp;
            self.delta += self.d.own[chosen as usize];
            stack.push((k, 0));
        }
        self.on_path[c as usize] = 0;
        // Release what the old node read; classes nobody reads any more are freed.
        let mut stack: Vec<u32> = d.kids(old).to_vec();
        while let Some(k) = stack.pop() {
            self.work += 1;
            let now = self.refs[k as usize] - 1;
            self.set_refs(k, now);
            if now == 0 {
                let chosen = self.choice[k as usize];
                self.delta -= self.d.own[chosen as usize];
                stack.extend_from_slice(d.kids(chosen));
            }
        }
        true
    }

    /// Classes the changes logged since `mark` made live.
    fn brought_in(&self, mark: usize) -> Vec<u32> {
        let mut out: Vec<u32> = self.log[mark..]
            .iter()
            .filter_map(|ch| match ch {
                Change::Refs(c, 0) if self.refs[*c as usize] > 0 => Some(*c),
                _ => None,
            })
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Tries `n` for class `c`, with followers; keeps the step if it lowers the DAG's cost.
    fn try_step(&mut self, c: u32, n: u32, roots: &[u32]) -> bool {
        self.log.clear();
        self.delta = 0.0;
        if !self.switch(c, n) {
            self.undo_to(0, 0.0);
            return false;
        }
        if self.delta < -MIN_GAIN {
            self.log.clear();
            self.place(roots);
            return true;
        }
        // Followers: live classes with a node over what this move brought in, and nothing
        // else new.
        let mut followers: Vec<(u32, u32)> = vec![];
        for r in self.brought_in(0) {
            for &p in &self.d.parents[r as usize] {
                let pc = self.d.node_class[p as usize];
                if pc != c
                    && self.live(pc)
                    && self.choice[pc as usize] != p
                    && self.d.own[p as usize].is_finite()
                    && self.d.kids(p).iter().all(|k| self.live(*k))
                {
                    followers.push((pc, p));
                }
            }
        }
        if followers.is_empty() {
            self.undo_to(0, 0.0);
            return false;
        }
        followers.sort_unstable();
        followers.dedup_by_key(|f| f.0);
        let saved_pos = self.pos.clone();
        self.place(roots);
        for (fc, p) in followers {
            if !self.live(fc) || self.choice[fc as usize] == p {
                continue;
            }
            let (mark, before) = (self.log.len(), self.delta);
            if self.switch(fc, p) && self.delta < before - MIN_GAIN {
                self.place(roots);
            } else {
                self.undo_to(mark, before);
            }
        }
        if self.delta < -MIN_GAIN {
            self.log.clear();
            self.place(roots);
            true
        } else {
            self.undo_to(0, 0.0);
            self.pos = saved_pos;
            false
        }
    }

    fn total(&self) -> f64 {
        (0..self.refs.len()).filter(|c| self.refs[*c] > 0).map(|c| self.d.own[self.choice[c] as usize]).sum()
    }
}

/// The chosen node of every class reachable from `roots` (keys are canonical ids): the greedy
/// choice, refined on the whole DAG.
pub fn choose(egraph: &KGraph, roots: &[Id], target: &TargetCost) -> Extraction {
    let start = Instant::now();
    let d = Dense::new(egraph, target);
    let index: HashMap<Id, u32> = d.ids.iter().enumerate().map(|(i, id)| (*id, i as u32)).collect();
    let mut dense_roots: Vec<u32> = vec![];
    for r in roots {
        let c = index[&egraph.find(*r)];
        if !dense_roots.contains(&c) {
            dense_roots.push(c);
        }
    }
    let choice = greedy(&d);
    let mut r = Refiner::new(&d, choice, &dense_roots);
    let greedy_cost = r.total();
    let budget = WORK_PER_NODE * d.node_class.len().max(1);
    let mut report = ExtractReport { greedy_cost, stop_reason: "fixed point".into(), ..Default::default() };
    'passes: for pass in 0..MAX_PASSES {
        report.passes = pass + 1;
        let mut order: Vec<u32> = (0..d.ids.len() as u32).filter(|c| r.live(*c)).collect();
        order.sort_by_key(|c| r.pos[*c as usize]);
        let mut improved = false;
        for c in order {
            for n in d.nodes_of(c) {
                if !r.live(c) || r.choice[c as usize] == n || !d.own[n as usize].is_finite() {
                    continue;
                }
                if r.work > budget {
                    report.stop_reason = "work limit".into();
                    break 'passes;
                }
                if r.try_step(c, n, &dense_roots) {
                    report.improvements += 1;
                    improved = true;
                }
            }
        }
        if !improved {
            break;
        }
        if pass + 1 == MAX_PASSES {
            report.stop_reason = format!("pass limit ({MAX_PASSES})");
        }
    }
    report.refined_cost = r.total();
    let mut choice = HashMap::new();
    for c in 0..d.ids.len() {
        if r.refs[c] > 0 {
            let n = r.choice[c] as usize;
            let class = d.ids[c];
            let offset = n - d.class_nodes[c] as usize;
            choice.insert(class, egraph[class].nodes[offset].clone());
        }
    }
    report.time_ms = start.elapsed().as_secs_f64() * 1e3;
    Extraction { choice, report }
}
