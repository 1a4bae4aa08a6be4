//! The compiled train step and forward pass, and the state they run on.
//!
//! `kiln train` compiles one training artifact for its device (`native::train_entries`, as
//! `kiln compile --train` does, with evaluation's forward graph as its `forward`): its
//! `train_step` entry point takes a batch and updates the parameters, the optimizer state and
//! `optim.step` in place in the artifact's arena (the CPU's, or the Vulkan or CUDA device's);
//! `forward` computes with them; checkpoints copy them out and back (`Model::read_state`,
//! `write_state`).

use crate::commands::{user, Failure};
use crate::native::{compile_entries, ir_dtype, train_entries, TRAIN_ENTRY};
use kiln_codegen::artifact::runtime_dtype;
use kiln_ir::{DType, Graph, NodeId, Op, Tensor};
use kiln_lower::Lowered;
use kiln_runtime::{Model, Options, TensorRef, TensorSpec, FORWARD_ENTRY};
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

/// A data input of a compiled graph: name, dtype, full shape, and which of the model's inputs
/// (the batch's tensors, in declaration order) it takes.
struct DataInput {
    name: String,
    dtype: DType,
    shape: Vec<u64>,
    column: usize,
}

pub struct Stepper {
    /// The training artifact, which holds the parameters and optimizer state between steps.
    model: Model,
    train_data: Vec<DataInput>,
    eval_data: Vec<DataInput>,
    /// The artifact's directory, removed when the stepper goes.
    _dir: tempfile::TempDir,
}

/// The names of the evaluation graph's outputs: the loss's first operand (logits or the
/// prediction) and, when it is not a model input, its second (labels or target).
pub const EVAL_PRED: &str = "pred";
pub const EVAL_TARGET: &str = "target";

impl Stepper {
    /// Compiles `lowered`'s train step and its forward pass for `device` (`None` or `cpu`:
    /// this CPU; `vulkan[:N]`; `cuda[:N]`), starting from the parameters `params` (by checkpoint name) and
    /// zero optimizer state.
    pub fn new(
        lowered: &Lowered,
        params: &HashMap<String, Tensor>,
        device: Option<&str>,
        threads: Option<usize>,
    ) -> Result<Stepper, Failure> {
        let options = Options { threads, device: device.map(str::to_string) };
        let columns = input_names(&lowered.graph);
        let dir = scratch()?;
        let (entries, values) = train_entries(lowered, &eval_graph(lowered)?, |_| Ok(params.clone()))?;
        compile_entries(&entries, &values, device, dir.path())?;
        let model = Model::load_with(dir.path(), &options).map_err(|e| user(e.to_string()))?;
        let data = |entry: &str| -> Result<Vec<DataInput>, Failure> {
            let specs = model.entry_inputs(entry).map_err(|e| user(e.to_string()))?;
            specs.iter().map(|s| data_input(s, &columns)).collect()
        };
        let (train_data, eval_data) = (data(TRAIN_ENTRY)?, data(FORWARD_ENTRY)?);
        Ok(Stepper { model, train_data, eval_data, _dir: dir })
    }

    /// The data inputs of the forward pass: name, dtype and shape.
    pub fn eval_inputs(&self) -> Vec<(&str, DType, &[u64])> {
        self.eval_data.iter().map(|d| (d.name.as_str(), d.dtype, d.shape.as_slice())).collect()
    }

    /// One optimizer step on `batch` (the bytes of each model input, in declaration order):
    /// the parameters and state move on.
    pub fn step(&mut self, batch: &[Vec<u8>]) -> Result<StepStats, Failure> {
        let refs = data_refs(&self.train_data, batch)?;
        let outputs = self.model.run_entry(TRAIN_ENTRY, &refs).map_err(|e| user(e.to_string()))?;
        let (mut loss, mut lr) = (f64::NAN, f64::NAN);
        for out in outputs {
            match out.name() {
                "loss" => loss = scalar(&out),
                "optim.lr" => lr = scalar(&out),
                _ => {}
            }
        }
        Ok(StepStats { loss, lr })
    }

    /// The forward pass on `batch` (the bytes of each model input, in declaration order)
    /// with the current parameters: its outputs [`EVAL_PRED`] and maybe [`EVAL_TARGET`].
    pub fn evaluate(&mut self, batch: &[Vec<u8>]) -> Result<Vec<Raw>, Failure> {
        let refs = data_refs(&self.eval_data, batch)?;
        let outputs = self.model.run_entry(FORWARD_ENTRY, &refs).map_err(|e| user(e.to_string()))?;
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

    /// The parameters (by checkpoint name) and the optimizer state (`optim.…`).
    pub fn state(&mut self) -> Result<Vec<Raw>, Failure> {
        self.model
            .state_names()
            .iter()
            .map(|name| {
                let t = self.model.read_state(name).map_err(|e| user(e.to_string()))?;
                Ok(Raw {
                    name: name.clone(),
                    dtype: ir_dtype(t.dtype()),
                    shape: t.shape().to_vec(),
                    bytes: t.bytes().to_vec(),
                })
            })
            .collect()
    }

    /// Replaces the parameters and optimizer state with `saved` (as [`Stepper::state`] gives
    /// them). Every one must be there with its dtype and shape.
    pub fn set_state(&mut self, saved: &[Raw], from: &str) -> Result<(), Failure> {
        for spec in self.model.state().to_vec() {
            let name = &spec.name;
            let Some(t) = saved.iter().find(|t| t.name == *name) else {
                return Err(user(format!(
                    "{from} has no tensor `{name}`: it is not a checkpoint of this model"
                )));
            };
            let (dtype, shape) = (ir_dtype(spec.dtype), &spec.shape);
            if t.dtype != dtype || t.shape != *shape {
                return Err(user(format!(
                    "tensor `{name}` of {from} is {}{:?}, the model's is {dtype}{shape:?}: it is not a checkpoint of this model as configured",
                    t.dtype, t.shape
                )));
            }
        }
        for t in saved {
            if self.model.state().iter().any(|s| s.name == t.name) {
                let value = TensorRef::new(&t.name, runtime_dtype(t.dtype), &t.shape, &t.bytes);
                self.model.write_state(&t.name, &value).map_err(|e| user(e.to_string()))?;
            }
        }
        Ok(())
    }
}

fn scratch() -> Result<tempfile::TempDir, Failure> {
    tempfile::tempdir().map_err(|e| user(format!("cannot create a scratch directory: {e}")))
}

/// The batch's tensors that `inputs` take, as the runtime's references.
fn data_refs<'a>(inputs: &'a [DataInput], batch: &'a [Vec<u8>]) -> Result<Vec<TensorRef<'a>>, Failure> {
    inputs
        .iter()
        .map(|d| {
            let bytes = batch
                .get(d.column)
                .ok_or_else(|| user(format!("internal error: no data for input `{}`", d.name)))?;
            Ok(TensorRef::new(&d.name, runtime_dtype(d.dtype), &d.shape, bytes))
        })
        .collect()
}

/// An entry point's input as a [`DataInput`] of the model input of its name.
fn data_input(spec: &TensorSpec, columns: &[String]) -> Result<DataInput, Failure> {
    Ok(DataInput {
        name: spec.name.clone(),
        dtype: ir_dtype(spec.dtype),
        shape: spec.fixed_shape().ok_or_else(|| {
            user(format!(
                "internal error: the compiled step's input `{}` has extents set at run time; training takes fixed shapes",
                spec.name
            ))
        })?,
        column: column_of(&spec.name, columns)?,
    })
}

fn column_of(name: &str, columns: &[String]) -> Result<usize, Failure> {
    columns
        .iter()
        .position(|c| c == name)
        .ok_or_else(|| user(format!("internal error: the compiled step takes `{name}`, not a model input")))
}

/// The model's input names in declaration order: the order of a batch's tensors.
fn input_names(g: &Graph) -> Vec<String> {
    inputs_of(g).into_iter().map(|(name, _, _)| name).collect()
}

/// The forward graph that evaluation runs: the model with the loss's operands as outputs.
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
    Ok(g)
}

fn inputs_of(g: &Graph) -> Vec<(String, DType, Vec<u64>)> {
    g.inputs
        .iter()
        .filter_map(|&i| match &g.node(i).op {
            Op::Input { name, dtype, .. } => {
                Some((name.clone(), *dtype, g.ty(i).static_shape().iter().map(|&d| d as u64).collect()))
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
