//! The compiled train step and forward pass, and the state they run on.
//!
//! Artifacts hold no state yet, so both graphs are compiled with their parameters as inputs
//! (`kiln_lower::params_as_inputs`): the train step reads the parameters, the optimizer state
//! and `optim.step`, and returns their next values under the same names; the [`Stepper`]
//! keeps them as bytes between calls and feeds them back. Only this type knows that; when
//! artifacts keep state themselves, it is the one place to change.

use crate::commands::{user, Failure};
use crate::native::{compile_graph, ir_dtype};
use kiln_codegen::artifact::runtime_dtype;
use kiln_ir::{DType, Graph, NodeId, Op, Tensor};
use kiln_lower::{params_as_inputs, train_step, Lowered, PARAM_INPUT_PREFIX};
use kiln_runtime::{Model, Options, TensorRef};
use std::collections::HashMap;

/// A named tensor as the runtime holds it: dtype, shape and little-endian bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct Raw {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    pub bytes: Vec<u8>,
}

/// What one train step reports.
pub struct StepStats {
    pub loss: f64,
    /// The learning rate this step used (under the schedule).
    pub lr: f64,
}

/// The data inputs of a compiled graph: name, dtype and full shape.
struct DataInput {
    name: String,
    dtype: DType,
    shape: Vec<u64>,
}

pub struct Stepper {
    train: Model,
    eval: Model,
    /// Parameters (under `param.NAME`) and optimizer state (`optim.…`): the train step's
    /// inputs that its outputs of the same names replace.
    state: Vec<Raw>,
    train_data: Vec<DataInput>,
    eval_data: Vec<DataInput>,
    /// The artifacts' directories, removed when the stepper goes.
    _dirs: [tempfile::TempDir; 2],
}

/// The names of the evaluation graph's outputs: the loss's first operand (logits or the
/// prediction) and, when it is not a model input, its second (labels or target).
pub const EVAL_PRED: &str = "pred";
pub const EVAL_TARGET: &str = "target";

impl Stepper {
    /// Compiles `lowered`'s train step and its forward pass for `device` (`None`: this CPU),
    /// starting from the parameters `params` (by checkpoint name) and zero optimizer state.
    pub fn new(
        lowered: &Lowered,
        params: &HashMap<String, Tensor>,
        device: Option<&str>,
        threads: Option<usize>,
    ) -> Result<Stepper, Failure> {
        let step = train_step(lowered).map_err(|e| user(e.to_string()))?;
        let mut g = step.graph;
        params_as_inputs(&mut g);
        let mut state = Vec::new();
        let mut train_data = Vec::new();
        for (name, dtype, shape) in inputs_of(&g) {
            if let Some(p) = name.strip_prefix(PARAM_INPUT_PREFIX) {
                let t = params
                    .get(p)
                    .ok_or_else(|| user(format!("internal error: no value for parameter `{p}`")))?;
                state.push(Raw { name, dtype, shape, bytes: t.data.to_le_bytes() });
            } else if name.starts_with("optim.") {
                let bytes = vec![0u8; dtype.size_bytes() * shape.iter().product::<u64>() as usize];
                state.push(Raw { name, dtype, shape, bytes });
            } else {
                train_data.push(DataInput { name, dtype, shape });
            }
        }
        let eval_graph = eval_graph(lowered)?;
        let eval_data = inputs_of(&eval_graph)
            .into_iter()
            .filter(|(n, _, _)| !n.starts_with(PARAM_INPUT_PREFIX))
            .map(|(name, dtype, shape)| DataInput { name, dtype, shape })
            .collect();
        let options = Options { threads, device: device.map(str::to_string) };
        let scratch =
            || tempfile::tempdir().map_err(|e| user(format!("cannot create a scratch directory: {e}")));
        let (train_dir, eval_dir) = (scratch()?, scratch()?);
        compile_graph(&g, device, train_dir.path())?;
        compile_graph(&eval_graph, device, eval_dir.path())?;
        let train = Model::load_with(train_dir.path(), &options).map_err(|e| user(e.to_string()))?;
        let eval = Model::load_with(eval_dir.path(), &options).map_err(|e| user(e.to_string()))?;
        Ok(Stepper { train, eval, state, train_data, eval_data, _dirs: [train_dir, eval_dir] })
    }

    /// The data inputs of the forward pass, in the order [`Stepper::evaluate`] takes them.
    pub fn eval_inputs(&self) -> Vec<(&str, DType, &[u64])> {
        self.eval_data.iter().map(|d| (d.name.as_str(), d.dtype, d.shape.as_slice())).collect()
    }

    /// One optimizer step on `batch` (the bytes of each model input, in declaration order):
    /// the parameters and state move on.
    pub fn step(&mut self, batch: &[Vec<u8>]) -> Result<StepStats, Failure> {
        let shapes: Vec<&DataInput> = self.train_data.iter().collect();
        let mut refs: Vec<TensorRef> = shapes
            .iter()
            .zip(batch)
            .map(|(d, b)| TensorRef::new(&d.name, runtime_dtype(d.dtype), &d.shape, b))
            .collect();
        refs.extend(
            self.state.iter().map(|s| TensorRef::new(&s.name, runtime_dtype(s.dtype), &s.shape, &s.bytes)),
        );
        let outputs = self.train.run(&refs).map_err(|e| user(e.to_string()))?;
        let (mut loss, mut lr) = (f64::NAN, f64::NAN);
        for out in outputs {
            match out.name() {
                "loss" => loss = scalar(&out),
                "optim.lr" => lr = scalar(&out),
                name => {
                    if let Some(slot) = self.state.iter_mut().find(|s| s.name == name) {
                        slot.bytes.clear();
                        slot.bytes.extend_from_slice(out.bytes());
                    }
                }
            }
        }
        Ok(StepStats { loss, lr })
    }

    /// The forward pass on `batch` (bytes in [`Stepper::eval_inputs`] order) with the
    /// current parameters: its outputs [`EVAL_PRED`] and maybe [`EVAL_TARGET`].
    pub fn evaluate(&mut self, batch: &[Vec<u8>]) -> Result<Vec<Raw>, Failure> {
        let mut refs: Vec<TensorRef> = self
            .eval_data
            .iter()
            .zip(batch)
            .map(|(d, b)| TensorRef::new(&d.name, runtime_dtype(d.dtype), &d.shape, b))
            .collect();
        refs.extend(
            self.state
                .iter()
                .filter(|s| s.name.starts_with(PARAM_INPUT_PREFIX))
                .map(|s| TensorRef::new(&s.name, runtime_dtype(s.dtype), &s.shape, &s.bytes)),
        );
        let outputs = self.eval.run(&refs).map_err(|e| user(e.to_string()))?;
        Ok(outputs
            .iter()
            .map(|t| Raw {
                name: t.name().to_string(),
                dtype: ir_dtype(t.dtype()),
                shape: t.shape().to_vec(),
                bytes: t.bytes().to_vec(),
            })
            .collect())
    }

    /// The parameters (by checkpoint name) and the optimizer state (`optim.…`), in the train
    /// step's input order.
    pub fn state(&self) -> Vec<Raw> {
        self.state
            .iter()
            .map(|s| {
                let name = s.name.strip_prefix(PARAM_INPUT_PREFIX).unwrap_or(&s.name).to_string();
                Raw { name, ..s.clone() }
            })
            .collect()
    }

    /// Replaces the parameters and optimizer state with `saved` (as [`Stepper::state`] gives
    /// them). Every one must be there with its dtype and shape.
    pub fn set_state(&mut self, saved: &[Raw], from: &str) -> Result<(), Failure> {
        for slot in &mut self.state {
            let name = slot.name.strip_prefix(PARAM_INPUT_PREFIX).unwrap_or(&slot.name);
            let Some(t) = saved.iter().find(|t| t.name == name) else {
                return Err(user(format!(
                    "{from} has no tensor `{name}`: it is not a checkpoint of this model"
                )));
            };
            if t.dtype != slot.dtype || t.shape != slot.shape {
                return Err(user(format!(
                    "tensor `{name}` of {from} is {}{:?}, the model's is {}{:?}: it is not a checkpoint of this model as configured",
                    t.dtype, t.shape, slot.dtype, slot.shape
                )));
            }
            slot.bytes.clone_from(&t.bytes);
        }
        Ok(())
    }
}

/// The forward graph that evaluation runs: the model with the loss's operands as outputs and
/// its parameters as inputs.
fn eval_graph(lowered: &Lowered) -> Result<Graph, Failure> {
    let plan = lowered.training.as_ref().ok_or_else(|| user("the model has no training section"))?;
    let mut g = lowered.graph.clone();
    let [pred, target] = plan.reads;
    let is_input = |n: NodeId| matches!(g.node(n).op, Op::Input { .. });
    let mut outputs = vec![(EVAL_PRED.to_string(), pred)];
    if !is_input(target) {
        outputs.push((EVAL_TARGET.to_string(), target));
    }
    g.outputs = outputs;
    g.remove_dead();
    params_as_inputs(&mut g);
    Ok(g)
}

fn inputs_of(g: &Graph) -> Vec<(String, DType, Vec<u64>)> {
    g.inputs
        .iter()
        .filter_map(|&i| match &g.node(i).op {
            Op::Input { name, dtype, shape } => {
                Some((name.clone(), *dtype, shape.iter().map(|&d| d as u64).collect()))
            }
            _ => None,
        })
        .collect()
}

fn scalar(t: &kiln_runtime::Tensor) -> f64 {
    to_f64(ir_dtype(t.dtype()), t.bytes()).first().copied().unwrap_or(f64::NAN)
}

/// Little-endian bytes of `dtype` as f64 values.
pub fn to_f64(dtype: DType, b: &[u8]) -> Vec<f64> {
    fn each<const N: usize>(b: &[u8], f: impl Fn([u8; N]) -> f64) -> Vec<f64> {
        b.chunks_exact(N)
            .map(|c| {
                let mut a = [0u8; N];
                a.copy_from_slice(c);
                f(a)
            })
            .collect()
    }
    match dtype {
        DType::F32 => each(b, |a| f32::from_le_bytes(a) as f64),
        DType::F64 => each(b, f64::from_le_bytes),
        DType::F16 => each(b, |a| half::f16::from_le_bytes(a).to_f64()),
        DType::BF16 => each(b, |a| half::bf16::from_le_bytes(a).to_f64()),
        DType::I32 => each(b, |a| i32::from_le_bytes(a) as f64),
        DType::I64 => each(b, |a| i64::from_le_bytes(a) as f64),
        DType::Bool => b.iter().map(|&x| if x != 0 { 1.0 } else { 0.0 }).collect(),
    }
}
