//! Partitioning: which IR nodes become kernels, which fold into views, and which elementwise
//! ops fuse into one loop.
//!
//! Walking the graph in topological order, every node gets a [`Value`]:
//! - inputs, parameters and constants are buffers of their own;
//! - transposes, slices, broadcasts and reshapes (when strides can express them) are views of
//!   their operand's buffer — no kernel, no copy;
//! - an elementwise op whose only user is an elementwise op of the same shape is *inlined*
//!   into that user's loop, and so are `full` constants; the rest of an elementwise tree
//!   becomes one [`KernelOp::Elementwise`] kernel;
//! - every other op is one kernel ([`KernelOp::Node`]).
//!
//! A kernel whose only user is a transpose writes its result straight into the transposed
//! layout (attention's `[b, h, s, d]` result lands as `[b, s, h, d]`), so the transpose — and
//! usually the reshape after it — cost nothing. So does one whose only user is a reshape read
//! only by a transpose, where strides express the reshape (grouped-query attention's
//! `[b, A, G, s, d]` result, merged to `[b, A·G, s, d]` and transposed).
//!
//! An `attention` and the `attention_lse` of the same operands (a train step's forward and
//! the statistic its backward reads) are one kernel with two results: the log-sum-exp is a
//! by-product of the attention's online softmax. A log-sum-exp met first waits for its
//! attention, unless a user needs it before: then it is a kernel of its own.
//!
//! A layer or RMS norm of a sum that something else reads too (a pre-norm residual stream)
//! takes the place of the sum's kernel: one `add_norm` kernel that also stores the sum.

use crate::faults::{FaultKind, FaultSite};
use crate::plan::{Buffer, BufferId, Expr, Kernel, KernelOp, Operand, StateSlot, Storage};
use crate::view::StridedView;
use crate::SchedError;
use kiln_ir::{BinaryOp, DType, Dim, Graph, NodeId, NormKind, Op, SizeError};
use std::collections::HashMap;

/// What a node's result is, once scheduled.
#[derive(Clone, Debug)]
enum Value {
    /// Stored (or viewed) in a buffer.
    Stored(Operand),
    /// Computed inside its user's elementwise loop.
    Inline,
}

pub(crate) struct Partition {
    pub buffers: Vec<Buffer>,
    /// Each buffer's element count as a size over the symbols (`buffers[i].len` is its value
    /// at the maxima); shorter than `buffers` when buffers are added after partitioning.
    pub sizes: Vec<Dim>,
    pub kernels: Vec<Kernel>,
    /// The fault sites the expressions name, in the order they were met.
    pub fault_sites: Vec<FaultSite>,
}

pub(crate) struct Builder<'g> {
    pub(crate) g: &'g Graph,
    values: HashMap<NodeId, Value>,
    /// Materialized `full`/inline values for non-elementwise users.
    materialized: HashMap<NodeId, Operand>,
    /// Values copied into rows for the norms that read them (at most one copy each).
    row_copies: HashMap<NodeId, Operand>,
    users: HashMap<NodeId, Vec<NodeId>>,
    outputs: HashMap<NodeId, Vec<usize>>,
    /// The nodes state variables are updated with: stored, like outputs, never inlined (an
    /// inlined update would be computed a second time to store it).
    updates: std::collections::HashSet<NodeId>,
    pub(crate) buffers: Vec<Buffer>,
    /// [`Partition::sizes`].
    sizes: Vec<Dim>,
    pub(crate) kernels: Vec<Kernel>,
    /// The state's slots, and the buffers that read a slot's old value (slot, buffer).
    pub(crate) layout: &'g [StateSlot],
    pub(crate) state_reads: Vec<(usize, BufferId)>,
    fault_sites: Vec<FaultSite>,
    /// `attention_lse` nodes met before the attention they share a kernel with: scheduled
    /// with it, or alone when a user needs them first.
    deferred: std::collections::HashSet<NodeId>,
}

pub(crate) fn partition<'g>(g: &'g Graph, layout: &'g [StateSlot]) -> Result<Partition, SchedError> {
    let order = g.topo_order();
    let mut b = Builder {
        g,
        values: HashMap::new(),
        materialized: HashMap::new(),
        row_copies: HashMap::new(),
        users: order.iter().map(|&n| (n, g.users(n))).collect(),
        outputs: HashMap::new(),
        updates: g.state.iter().filter_map(|v| v.update).collect(),
        buffers: Vec::new(),
        sizes: Vec::new(),
        kernels: Vec::new(),
        layout,
        state_reads: Vec::new(),
        fault_sites: Vec::new(),
        deferred: std::collections::HashSet::new(),
    };
    for (i, (_, n)) in g.outputs.iter().enumerate() {
        b.outputs.entry(*n).or_default().push(i);
    }
    for &n in &order {
        b.visit(n)?;
    }
    b.finish_outputs()?;
    crate::state::place_updates(&mut b)?;
    Ok(Partition { buffers: b.buffers, sizes: b.sizes, kernels: b.kernels, fault_sites: b.fault_sites })
}

impl Builder<'_> {
    pub(crate) fn add_buffer(&mut self, storage: Storage, dtype: DType, len: usize) -> BufferId {
        self.buffers.push(Buffer { storage, dtype, len: len.max(1), live: None });
        self.sizes.resize(self.buffers.len() - 1, Dim::Const(1));
        self.sizes.push(Dim::Const(len.max(1)));
        self.buffers.len() - 1
    }

    /// A buffer of `shape`'s elements: `len` at the symbols' maxima, its size kept.
    fn add_shaped(&mut self, storage: Storage, dtype: DType, shape: &[Dim]) -> Result<BufferId, SchedError> {
        let len = self.max_len(shape)?;
        let id = self.add_buffer(storage, dtype, len);
        self.sizes[id] = crate::view::product(shape).map_err(size_error)?;
        Ok(id)
    }

    /// The symbols' maxima: the values at which views over symbols are grouped for a reshape
    /// (`StridedView::reshape_at`, which proves what it groups).
    fn probe(&self) -> Vec<i64> {
        self.g.symbols.iter().map(|d| d.max).collect()
    }

    /// The elements of `shape` at the symbols' maxima: what a buffer of it holds.
    pub(crate) fn max_len(&self, shape: &[Dim]) -> Result<usize, SchedError> {
        let n = crate::view::product(shape).map_err(size_error)?;
        match n {
            Dim::Const(c) => Ok(c),
            Dim::Sym(e) => usize::try_from(e.range(&self.g.symbols).max)
                .map_err(|_| SchedError::Invalid(format!("the extent {e} has no positive maximum"))),
        }
    }

    /// A fresh result buffer for node `n`: the caller's output buffer when `n` is a graph
    /// output (its first listing), else arena scratch.
    fn result_buffer(&mut self, n: NodeId, shape: &[Dim]) -> Result<BufferId, SchedError> {
        let dtype = self.g.ty(n).dtype;
        match self.outputs.get_mut(&n).and_then(|list| (!list.is_empty()).then(|| list.remove(0))) {
            Some(index) => self.add_shaped(Storage::Output { index }, dtype, shape),
            None => self.add_shaped(Storage::Arena { offset: 0 }, dtype, shape),
        }
    }

    fn stored(&self, n: NodeId) -> Option<&Operand> {
        match self.values.get(&n) {
            Some(Value::Stored(o)) => Some(o),
            _ => None,
        }
    }

    fn is_inlinable(&self, n: NodeId) -> bool {
        let node = self.g.node(n);
        if matches!(node.op, Op::Full { .. }) {
            return true;
        }
        if !node.op.is_elementwise() || self.outputs.contains_key(&n) || self.updates.contains(&n) {
            return false;
        }
        match self.users[&n].as_slice() {
            [u] => {
                let user = self.g.node(*u);
                let uses = self.g.operands(*u).iter().filter(|&&o| o == n).count();
                user.op.is_elementwise() && uses == 1 && user.ty.shape == node.ty.shape
            }
            _ => false,
        }
    }

    fn visit(&mut self, n: NodeId) -> Result<(), SchedError> {
        // Computed already, as a second result of an earlier node's kernel.
        if self.values.contains_key(&n) {
            return Ok(());
        }
        if let Some((att, lse)) = self.attention_pair(n) {
            return self.attention_with_lse(att, lse);
        }
        if self.waits_for_attention(n) {
            self.deferred.insert(n);
            return Ok(());
        }
        if let Some((op, at)) = self.norm_of_stored_sum(n) {
            return self.add_norm_storing_sum(n, op, at);
        }
        self.visit_node(n)
    }

    /// Schedules node `n` on its own.
    fn visit_node(&mut self, n: NodeId) -> Result<(), SchedError> {
        let node = self.g.node(n);
        let ty = node.ty.clone();
        let operands = self.g.operands(n);
        // Weights, constants and state are static (the lowering refuses a symbol there).
        let value = match &node.op {
            Op::Input { .. } => {
                let index = self.g.inputs.iter().position(|&i| i == n).ok_or_else(|| {
                    SchedError::Invalid(format!("input node {} is not listed as a graph input", n.index()))
                })?;
                let buffer = self.add_shaped(Storage::Input { index }, ty.dtype, &ty.shape)?;
                Value::Stored(Operand { buffer, view: contiguous(&ty.shape)?, dtype: ty.dtype })
            }
            Op::Param { name, .. } => {
                let buffer = match self.g.state_var(name) {
                    Some(_) => {
                        let index = self.slot_of(name)?;
                        let buffer = self.add_buffer(Storage::State { index }, ty.dtype, ty.numel());
                        self.state_reads.push((index, buffer));
                        buffer
                    }
                    None => self.add_buffer(Storage::Weight { name: name.clone() }, ty.dtype, ty.numel()),
                };
                Value::Stored(Operand { buffer, view: contiguous(&ty.shape)?, dtype: ty.dtype })
            }
            Op::Const { value } => {
                let name = format!("kiln.const.{}", n.index());
                let storage = Storage::Const { name, value: value.clone() };
                let buffer = self.add_buffer(storage, ty.dtype, ty.numel());
                Value::Stored(Operand { buffer, view: contiguous(&ty.shape)?, dtype: ty.dtype })
            }
            Op::Full { .. } => Value::Inline,
            Op::Transpose { perm } => {
                let src = self.operand(operands[0])?;
                Value::Stored(Operand { view: src.view.transpose(perm), ..src })
            }
            Op::Slice { axis, start, end, step } => {
                let src = self.operand(operands[0])?;
                let view = src.view.slice(*axis, start, end, *step).map_err(size_error)?;
                Value::Stored(Operand { view, ..src })
            }
            Op::BroadcastTo { .. } => {
                let src = self.operand(operands[0])?;
                Value::Stored(Operand { view: src.view.broadcast_to(&ty.shape), ..src })
            }
            Op::Reshape { .. } => {
                let shape = &ty.shape;
                let src = self.operand(operands[0])?;
                let src = match src.view.reshape_at(shape, &self.probe()) {
                    Some(view) => Operand { view, ..src },
                    None => {
                        let copy = self.copy_kernel(operands[0], &src)?;
                        let view = copy.view.reshape(shape).ok_or_else(|| {
                            SchedError::Invalid(format!(
                                "reshape of node {} to {}",
                                n.index(),
                                kiln_ir::fmt_shape(shape)
                            ))
                        })?;
                        Operand { view, ..copy }
                    }
                };
                Value::Stored(src)
            }
            op if op.is_elementwise() => {
                if self.is_inlinable(n) {
                    Value::Inline
                } else {
                    let mut inputs = Vec::new();
                    let mut nodes = Vec::new();
                    let expr = self.expr(n, &ty.shape, &mut inputs, &mut nodes)?;
                    Value::Stored(self.emit(n, KernelOp::Elementwise(expr), inputs, nodes, &ty.shape)?)
                }
            }
            Op::Iota { axis, dtype, .. } => {
                let expr = Expr::Iota { axis: *axis, dtype: *dtype };
                Value::Stored(self.emit(n, KernelOp::Elementwise(expr), vec![], vec![n], &ty.shape)?)
            }
            Op::RandomUniform { seed, offset, dtype, base, .. } => {
                // The counter base, when there is one, is a scalar read by every element.
                let inputs = if *base {
                    let stored = self.operand(operands[0])?;
                    vec![Operand { view: stored.view.broadcast_to(&ty.shape), ..stored }]
                } else {
                    vec![]
                };
                let base = (!inputs.is_empty()).then_some(0);
                let expr = Expr::Random { seed: *seed, offset: *offset, base, dtype: *dtype };
                Value::Stored(self.emit(n, KernelOp::Elementwise(expr), inputs, vec![n], &ty.shape)?)
            }
            Op::ScatterAdd { axis, .. } => {
                // The emitters walk the updates as [pre, positions, post] and the indices as
                // one run; an operand whose strides cannot merge that way is copied first.
                let (updates, indices) = (self.operand(operands[0])?, self.operand(operands[1])?);
                let k = indices.view.shape.len();
                let count = indices.view.numel().map_err(size_error)?;
                let shape = &updates.view.shape;
                let pre = crate::view::product(&shape[..(*axis).min(shape.len())]).map_err(size_error)?;
                let post = crate::view::product(&shape[(axis + k).min(shape.len())..]).map_err(size_error)?;
                let updates = self.mergeable(operands[0], updates, &[pre, count.clone(), post])?;
                let indices = self.mergeable(operands[1], indices, &[count])?;
                let op = KernelOp::Node(node.op.clone());
                Value::Stored(self.emit(n, op, vec![updates, indices], vec![n], &ty.shape)?)
            }
            Op::LayerNorm { .. } | Op::RmsNorm { .. } | Op::AddNorm { .. } => {
                // A row read at a run-time stride (a norm over the channels of a tensor whose
                // height and width are known at run time only) is copied into rows first:
                // norm kernels step along a row by a static stride.
                let rows = if matches!(node.op, Op::AddNorm { .. }) { 2 } else { 1 };
                let mut inputs = Vec::with_capacity(operands.len());
                for (i, &o) in operands.iter().enumerate() {
                    let src = self.operand(o)?;
                    let strided = i < rows && src.view.strides.last().is_some_and(|s| !s.is_static());
                    if !strided {
                        inputs.push(src);
                    } else if let Some(copy) = self.row_copies.get(&o) {
                        inputs.push(copy.clone());
                    } else {
                        let copy = self.copy_kernel(o, &src)?;
                        self.row_copies.insert(o, copy.clone());
                        inputs.push(copy);
                    }
                }
                Value::Stored(self.emit(n, KernelOp::Node(node.op.clone()), inputs, vec![n], &ty.shape)?)
            }
            op => {
                let mut inputs = Vec::with_capacity(operands.len());
                for &o in &operands {
                    inputs.push(self.operand(o)?);
                }
                Value::Stored(self.emit(n, KernelOp::Node(op.clone()), inputs, vec![n], &ty.shape)?)
            }
        };
        self.values.insert(n, value);
        Ok(())
    }

    /// For a layer or RMS norm `n` whose row operand is a sum `a + b` stored by a kernel of
    /// its own (because something else reads the sum too: the residual stream of a pre-norm
    /// block): the `add_norm` that computes both, and that kernel's index, when the norm can
    /// take its place and write the sum as a second result: nothing read the sum since, the
    /// norm writes its result in the sum's row-major layout (no transposed write), and a and b
    /// step along a row by a static stride.
    fn norm_of_stored_sum(&self, n: NodeId) -> Option<(Op, usize)> {
        let op = match self.g.node(n).op {
            Op::LayerNorm { eps, affine } => Op::AddNorm { eps, kind: NormKind::Layer, affine },
            Op::RmsNorm { eps, affine } => Op::AddNorm { eps, kind: NormKind::Rms, affine },
            _ => return None,
        };
        let s = *self.g.operands(n).first()?;
        if self.g.node(s).op != Op::Binary(BinaryOp::Add) {
            return None;
        }
        let Some(Value::Stored(sum)) = self.values.get(&s) else { return None };
        let at = self.kernels.iter().rposition(|k| k.output.buffer == sum.buffer)?;
        let k = &self.kernels[at];
        let adds = matches!(&k.op, KernelOp::Elementwise(Expr::Apply { op: Op::Binary(BinaryOp::Add), args, fault: None, .. })
            if matches!(args.as_slice(), [Expr::Operand(_), Expr::Operand(_)]));
        let read_since = self.kernels[at + 1..].iter().any(|k| k.operands().any(|o| o.buffer == sum.buffer));
        let transposed = match self.users[&n].as_slice() {
            [u] => !self.outputs.contains_key(&n) && self.transposed_through(*u).is_some(),
            _ => false,
        };
        let static_rows = k.inputs.iter().all(|o| o.view.strides.last().is_some_and(Dim::is_static));
        let one_dtype = k.inputs.iter().all(|o| o.dtype == sum.dtype) && self.g.ty(n).dtype == sum.dtype;
        let plain = k.nodes == [s]
            && k.extra_outputs.is_empty()
            && k.output.view == contiguous(&self.g.ty(s).shape).ok()?;
        (adds && !read_since && !transposed && static_rows && one_dtype && plain).then_some((op, at))
    }

    /// The norm `n` of a stored sum ([`Builder::norm_of_stored_sum`]) as one `add_norm` kernel
    /// `op` in place of the sum's kernel, number `at`: it reads a and b, writes the norm and, as
    /// a second result, the sum into the buffer the sum's kernel wrote.
    fn add_norm_storing_sum(&mut self, n: NodeId, op: Op, at: usize) -> Result<(), SchedError> {
        let operands = self.g.operands(n);
        let sum_kernel = self.kernels.remove(at);
        let KernelOp::Elementwise(Expr::Apply { args, .. }) = &sum_kernel.op else {
            return Err(SchedError::Invalid("an add kernel".into()));
        };
        let mut inputs = Vec::with_capacity(operands.len() + 1);
        for arg in args {
            let Expr::Operand(i) = arg else { return Err(SchedError::Invalid("an add kernel".into())) };
            inputs.push(sum_kernel.inputs[*i].clone());
        }
        for &o in &operands[1..] {
            inputs.push(self.operand(o)?);
        }
        let s = operands[0];
        let out = self.emit(n, KernelOp::Node(op), inputs, vec![s, n], &self.g.ty(n).shape.clone())?;
        if let Some(k) = self.kernels.last_mut() {
            k.extra_outputs.push(sum_kernel.output.clone());
        }
        self.values.insert(n, Value::Stored(out));
        Ok(())
    }

    /// When `n` is an `attention` or an `attention_lse`, and the other of the two over the same
    /// operands (q, k, the mask) and attributes is in the graph, not scheduled yet and ready
    /// (its operands scheduled): the pair `(attention, attention_lse)`.
    fn attention_pair(&self, n: NodeId) -> Option<(NodeId, NodeId)> {
        let ops = self.g.operands(n);
        let (lse_of, is_attention) = match self.g.node(n).op {
            Op::Attention { scale, causal, masked } => (Op::AttentionLse { scale, causal, masked }, true),
            Op::AttentionLse { scale, causal, masked } => (Op::Attention { scale, causal, masked }, false),
            _ => return None,
        };
        let scores_operands =
            |att: &[NodeId]| -> Vec<NodeId> { att[..2].iter().chain(att.get(3)).copied().collect() };
        let other = self.users[&ops[0]].iter().copied().find(|&u| {
            let uops = self.g.operands(u);
            u != n
                && self.g.node(u).op == lse_of
                && !self.values.contains_key(&u)
                && uops.iter().all(|o| self.values.contains_key(o))
                && if is_attention { scores_operands(&ops) == uops } else { scores_operands(&uops) == ops }
        })?;
        Some(if is_attention { (n, other) } else { (other, n) })
    }

    /// Whether `n` is an `attention_lse` whose attention (same operands and attributes) is not
    /// scheduled yet: it waits to be computed in that kernel.
    fn waits_for_attention(&self, n: NodeId) -> bool {
        let Op::AttentionLse { scale, causal, masked } = self.g.node(n).op else { return false };
        let ops = self.g.operands(n);
        let attention = Op::Attention { scale, causal, masked };
        self.users[&ops[0]].iter().any(|&u| {
            let uops = self.g.operands(u);
            self.g.node(u).op == attention
                && !self.values.contains_key(&u)
                && uops[..2].iter().chain(uops.get(3)).copied().collect::<Vec<_>>() == ops
        })
    }

    /// One attention kernel for node `att` that also writes the log-sum-exp node `lse`.
    fn attention_with_lse(&mut self, att: NodeId, lse: NodeId) -> Result<(), SchedError> {
        let mut inputs = Vec::new();
        for o in self.g.operands(att) {
            inputs.push(self.operand(o)?);
        }
        let op = KernelOp::Node(self.g.node(att).op.clone());
        let out = self.emit(att, op, inputs, vec![att, lse], &self.g.ty(att).shape.clone())?;
        let shape = self.g.ty(lse).shape.clone();
        let buffer = self.result_buffer(lse, &shape)?;
        let stats = Operand { buffer, view: contiguous(&shape)?, dtype: self.g.ty(lse).dtype };
        if let Some(k) = self.kernels.last_mut() {
            k.extra_outputs.push(stats.clone());
        }
        self.values.insert(att, Value::Stored(out));
        self.values.insert(lse, Value::Stored(stats));
        self.deferred.remove(&lse);
        Ok(())
    }

    /// Adds a kernel computing node `n` into a fresh buffer and returns its result operand.
    /// When `n` is an attention or a norm whose only user is a transpose (and `n` is no graph
    /// output), the buffer takes the transposed shape and the kernel writes through the
    /// inverse permutation: those kernels write their rows at any strides, so the transpose
    /// back of a norm over another axis than the last (`docs/optimizer.md`) is no copy.
    fn emit(
        &mut self,
        n: NodeId,
        op: KernelOp,
        inputs: Vec<Operand>,
        nodes: Vec<NodeId>,
        shape: &[Dim],
    ) -> Result<Operand, SchedError> {
        let dtype = self.g.ty(n).dtype;
        let is_norm =
            matches!(op, KernelOp::Node(Op::LayerNorm { .. } | Op::RmsNorm { .. } | Op::AddNorm { .. }));
        let writes_strided = is_norm || matches!(op, KernelOp::Node(Op::Attention { .. }));
        let transposed_user = match self.users[&n].as_slice() {
            [u] if !self.outputs.contains_key(&n) && writes_strided => self.transposed_through(*u),
            _ => None,
        };
        let (buffer, view) = match transposed_user {
            Some((t, perm, seen)) => {
                let stored: Vec<Dim> = perm.iter().map(|&p| seen[p].clone()).collect();
                // Stored layout is `stored` row-major; element i of the transpose's operand
                // (`seen`) sits at the position whose transposed index is perm⁻¹ applied to i.
                let row = crate::view::row_major(&stored).map_err(size_error)?;
                let mut strides = vec![Dim::Const(0); seen.len()];
                for (k, &p) in perm.iter().enumerate() {
                    strides[p] = row[k].clone();
                }
                let through = StridedView { shape: seen.clone(), strides, offset: Dim::Const(0) };
                // `n` itself: the operand's view reshaped to `n`'s shape, where strides allow
                // (attention over heads split in two, merged back before the transpose).
                let view = if seen.as_slice() == shape {
                    Some(through)
                } else {
                    through.reshape_at(shape, &self.probe())
                };
                // Norm kernels step along a row by a static stride.
                let view = view.filter(|v| !is_norm || v.strides.iter().all(Dim::is_static));
                // A transpose that is a graph output takes its caller's buffer, which the
                // kernel then fills in place (no copy at the end).
                let owner = if self.outputs.get(&t).is_some_and(|slots| !slots.is_empty()) { t } else { n };
                match view {
                    Some(view) => (self.result_buffer(owner, &stored)?, view),
                    None => (self.result_buffer(n, shape)?, contiguous(shape)?),
                }
            }
            None => {
                // A result whose only user is a reshape that is a graph output (a norm over
                // the last few axes merged, reshaped back) fills the caller's buffer: the
                // reshape of a row-major result is the same bytes.
                let owner = match self.users[&n].as_slice() {
                    [u] if !self.outputs.contains_key(&n)
                        && matches!(self.g.node(*u).op, Op::Reshape { .. })
                        && self.outputs.get(u).is_some_and(|slots| !slots.is_empty()) =>
                    {
                        *u
                    }
                    _ => n,
                };
                (self.result_buffer(owner, shape)?, contiguous(shape)?)
            }
        };
        let output = Operand { buffer, view, dtype };
        self.kernels.push(Kernel { op, inputs, output: output.clone(), extra_outputs: vec![], nodes });
        Ok(output)
    }

    /// For `u`, the only user of a kernel's result: the transpose the result reaches (`u`
    /// itself or, when `u` is a reshape read only by a transpose, neither a graph output, that
    /// transpose), its permutation and its operand's shape.
    fn transposed_through(&self, u: NodeId) -> Option<(NodeId, Vec<usize>, Vec<Dim>)> {
        match &self.g.node(u).op {
            Op::Transpose { perm } => Some((u, perm.clone(), self.g.ty(self.g.operands(u)[0]).shape.clone())),
            Op::Reshape { shape } if !self.outputs.contains_key(&u) => match self.users[&u].as_slice() {
                [t] => match &self.g.node(*t).op {
                    Op::Transpose { perm } => Some((*t, perm.clone(), shape.clone())),
                    _ => None,
                },
                _ => None,
            },
            _ => None,
        }
    }

    /// The stored operand for node `o`, materializing inline values (`full` constants used by
    /// non-elementwise ops) once.
    pub(crate) fn operand(&mut self, o: NodeId) -> Result<Operand, SchedError> {
        if let Some(s) = self.stored(o) {
            return Ok(s.clone());
        }
        if let Some(m) = self.materialized.get(&o) {
            return Ok(m.clone());
        }
        // A log-sum-exp needed before its attention is reached: computed alone after all.
        if self.deferred.remove(&o) {
            self.visit_node(o)?;
            if let Some(s) = self.stored(o) {
                return Ok(s.clone());
            }
        }
        let shape = self.g.ty(o).shape.clone();
        let mut inputs = Vec::new();
        let mut nodes = Vec::new();
        let expr = self.expr(o, &shape, &mut inputs, &mut nodes)?;
        let out = self.emit(o, KernelOp::Elementwise(expr), inputs, nodes, &shape)?;
        self.materialized.insert(o, out.clone());
        Ok(out)
    }

    /// The elementwise tree rooted at `n`, evaluated over `shape` (inlined nodes have the
    /// same shape as their user; stored operands are broadcast to it).
    fn expr(
        &mut self,
        n: NodeId,
        shape: &[Dim],
        inputs: &mut Vec<Operand>,
        nodes: &mut Vec<NodeId>,
    ) -> Result<Expr, SchedError> {
        let node = self.g.node(n);
        match &node.op {
            Op::Full { value, dtype, .. } => return Ok(Expr::Scalar { value: *value, dtype: *dtype }),
            op if op.is_elementwise()
                && (!self.values.contains_key(&n) || matches!(self.values.get(&n), Some(Value::Inline))) =>
            {
                let op = op.clone();
                let dtype = node.ty.dtype;
                nodes.push(n);
                let mut args = Vec::new();
                for o in self.g.operands(n) {
                    let inline = matches!(self.values.get(&o), Some(Value::Inline))
                        && self.g.node(o).op.is_elementwise();
                    if inline || matches!(self.g.node(o).op, Op::Full { .. }) {
                        args.push(self.expr(o, shape, inputs, nodes)?);
                    } else {
                        let stored = self.operand(o)?;
                        let view = stored.view.broadcast_to(shape);
                        args.push(Expr::Operand(push_operand(inputs, Operand { view, ..stored })));
                    }
                }
                let fault = self.fault_site(n, &args)?;
                return Ok(Expr::Apply { op, args, dtype, fault });
            }
            _ => {}
        }
        let stored = self.operand(n)?;
        let view = stored.view.broadcast_to(shape);
        Ok(Expr::Operand(push_operand(inputs, Operand { view, ..stored })))
    }

    /// The slot of state variable `name`.
    pub(crate) fn slot_of(&self, name: &str) -> Result<usize, SchedError> {
        self.layout
            .iter()
            .position(|s| s.name == name)
            .ok_or_else(|| SchedError::Invalid(format!("state `{name}` has no slot in the layout")))
    }

    /// A copy of `src` into a fresh contiguous arena buffer, as a kernel of its own that
    /// stands for `nodes`.
    pub(crate) fn copy_to_arena(&mut self, src: &Operand, nodes: Vec<NodeId>) -> Result<Operand, SchedError> {
        let shape = src.view.shape.clone();
        let buffer = self.add_shaped(Storage::Arena { offset: 0 }, src.dtype, &shape)?;
        let output = Operand { buffer, view: contiguous(&shape)?, dtype: src.dtype };
        self.kernels.push(Kernel {
            op: KernelOp::Elementwise(Expr::Operand(0)),
            inputs: vec![src.clone()],
            output: output.clone(),
            extra_outputs: vec![],
            nodes,
        });
        Ok(output)
    }

    /// The fault site of elementwise node `n` (with arguments `args`), if its compiled code can
    /// fault: an integer division whose divisor is not a non-zero constant.
    fn fault_site(&mut self, n: NodeId, args: &[Expr]) -> Result<Option<usize>, SchedError> {
        let node = self.g.node(n);
        let divides = matches!(node.op, Op::Binary(BinaryOp::Div)) && node.ty.dtype.is_int();
        let constant_divisor = matches!(args.get(1), Some(Expr::Scalar { value, .. }) if *value as i64 != 0);
        if !divides || constant_divisor {
            return Ok(None);
        }
        // A fault reports its element as a position in a static shape.
        let static_shape = |t: &kiln_ir::TensorType| {
            kiln_ir::static_dims(&t.shape).ok_or_else(|| {
                SchedError::Invalid(format!(
                    "an integer division by a value that may be zero, over the symbolic shape {t}: \
                     its fault reports need static shapes"
                ))
            })
        };
        let shape = static_shape(&node.ty)?;
        let divisor = match self.g.operands(n).get(1) {
            Some(&d) => static_shape(self.g.ty(d))?,
            None => Vec::new(),
        };
        self.fault_sites.push(FaultSite {
            kind: FaultKind::IntDivByZero,
            kernel: 0,
            op: node.op.name().to_string(),
            name: node.name.clone(),
            origin: node.origin.as_ref().map(ToString::to_string),
            shape,
            divisor,
        });
        Ok(Some(self.fault_sites.len() - 1))
    }

    /// `src` (a view of node `n`'s value) when strides can express it as `shape`, else a copy.
    fn mergeable(&mut self, n: NodeId, src: Operand, shape: &[Dim]) -> Result<Operand, SchedError> {
        match src.view.reshape_at(shape, &self.probe()) {
            Some(_) => Ok(src),
            None => self.copy_kernel(n, &src),
        }
    }

    /// A copy of `src` (a view of node `n`'s value) into a fresh contiguous buffer.
    fn copy_kernel(&mut self, n: NodeId, src: &Operand) -> Result<Operand, SchedError> {
        self.copy_to_arena(src, vec![n])
    }

    /// Every graph output must end up in its own caller buffer: outputs that are views,
    /// inputs, weights, constants, or repeated, get a copy kernel.
    fn finish_outputs(&mut self) -> Result<(), SchedError> {
        for (index, (_, n)) in self.g.outputs.iter().enumerate() {
            let n = *n;
            let src = self.operand(n)?;
            let in_place = matches!(self.buffers[src.buffer].storage, Storage::Output { index: i } if i == index)
                && src.view == contiguous(&src.view.shape)?;
            if in_place {
                continue;
            }
            let shape = self.g.ty(n).shape.clone();
            let buffer = self.add_shaped(Storage::Output { index }, src.dtype, &shape)?;
            let output = Operand { buffer, view: contiguous(&shape)?, dtype: src.dtype };
            self.kernels.push(Kernel {
                op: KernelOp::Elementwise(Expr::Operand(0)),
                inputs: vec![src],
                output,
                extra_outputs: vec![],
                nodes: vec![n],
            });
        }
        Ok(())
    }
}

/// The row-major view of a whole buffer of `shape`.
fn contiguous(shape: &[Dim]) -> Result<StridedView, SchedError> {
    StridedView::contiguous_dims(shape).map_err(size_error)
}

/// A size that cannot be computed (its arithmetic overflows): the graph cannot be scheduled.
pub(crate) fn size_error(e: SizeError) -> SchedError {
    SchedError::Invalid(format!("a view's size: {e}"))
}

/// Adds `o` to a kernel's operands unless the same view is there already; returns its index.
fn push_operand(inputs: &mut Vec<Operand>, o: Operand) -> usize {
    match inputs.iter().position(|x| *x == o) {
        Some(i) => i,
        None => {
            inputs.push(o);
            inputs.len() - 1
        }
    }
}
