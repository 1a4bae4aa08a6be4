//! The compiled train step and forward pass, and the state they run on.
//!
//! On the CPU, `kiln train` compiles one training artifact (`native::train_entries`, as
//! `kiln compile --train` does, with evaluation's forward graph as its `forward`): its
//! `train_step` entry point takes a batch and updates the parameters, the optimizer state and
//! `optim.step` in place in the artifact's arena; `forward` computes with them; checkpoints
//! copy them out and back (`Model::read_state`, `write_state`).
//!
//! The GPU targets keep no state yet, so there both graphs are compiled with their parameters
//! as inputs (`kiln_lower::params_as_inputs`): the train step reads the parameters, the
//! optimizer state and `optim.step`, and returns their next values under the same names, which
//! the [`Stepper`] keeps as bytes between calls and feeds back. Only this type knows which.

use crate::commands::{user, Failure};
use crate::native::{compile_entries, compile_graph, ir_dtype, train_entries, TRAIN_ENTRY};
use kiln_codegen::artifact::runtime_dtype;
use kiln_ir::{DType, Graph, NodeId, Op, Tensor};
use kiln_lower::{params_as_inputs, train_step, Lowered, PARAM_INPUT_PREFIX};
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

/// Where the parameters and optimizer state live between steps.
enum Run {
    /// In the arena of one training artifact (the CPU).
    InPlace(Box<Model>),
    /// In [`Raw`] bytes fed to artifacts that take them as inputs (the GPU targets).
    Carried {
        train: Box<Model>,
        eval: Box<Model>,
        /// Parameters (under `param.NAME`) and optimizer state (`optim.…`): the train step's
        /// inputs that its outputs of the same names replace.
        state: Vec<Raw>,
    },
}

pub struct Stepper {
    run: Run,
    train_data: Vec<DataInput>,
    eval_data: Vec<DataInput>,
    /// The artifacts' directories, removed when the stepper goes.
    _dirs: Vec<tempfile::TempDir>,
}

/// The names of the evaluation graph's outputs: the loss's first operand (logits or the
/// prediction) and, when it is not a model input, its second (labels or target).
pub const EVAL_PRED: &str = "pred";
pub const EVAL_TARGET: &str = "target";

impl Stepper {
    /// Compiles `lowered`'s train step and its forward pass for `device` (`None` or `cpu`:
    /// this CPU), starting from the parameters `params` (by checkpoint name) and zero
    /// optimizer state.
    pub fn new(
        lowered: &Lowered,
        params: &HashMap<String, Tensor>,
        device: Option<&str>,
        threads: Option<usize>,
    ) -> Result<Stepper, Failure> {
        let options = Options { threads, device: device.map(str::to_string) };
        let columns = input_names(&lowered.graph);
        if device.is_some_and(|d| d != "cpu") {
            return Stepper::carried(lowered, params, device, &options, &columns);
        }
        let dir = scratch()?;
        let (entries, values) = train_entries(lowered, &eval_graph(lowered)?, |_| Ok(params.clone()))?;
        compile_entries(&entries, &values, device, dir.path())?;
        let model = Model::load_with(dir.path(), &options).map_err(|e| user(e.to_string()))?;
        let data = |entry: &str| -> Result<Vec<DataInput>, Failure> {
            let specs = model.entry_inputs(entry).map_err(|e| user(e.to_string()))?;
            specs.iter().map(|s| data_input(s, &columns)).collect()
        };
        let (train_data, eval_data) = (data(TRAIN_ENTRY)?, data(FORWARD_ENTRY)?);
        Ok(Stepper { run: Run::InPlace(Box::new(model)), train_data, eval_data, _dirs: vec![dir] })
    }

    /// The GPU path: the train step and the forward pass compiled with their parameters as
    /// inputs, the state carried in bytes.
    fn carried(
        lowered: &Lowered,
        params: &HashMap<String, Tensor>,
        device: Option<&str>,
        options: &Options,
        columns: &[String],
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
                let column = column_of(&name, columns)?;
                train_data.push(DataInput { name, dtype, shape, column });
            }
        }
        let mut eval_graph = eval_graph(lowered)?;
        params_as_inputs(&mut eval_graph);
        let eval_data = inputs_of(&eval_graph)
            .into_iter()
            .filter(|(n, _, _)| !n.starts_with(PARAM_INPUT_PREFIX))
            .map(|(name, dtype, shape)| {
                Ok(DataInput { column: column_of(&name, columns)?, name, dtype, shape })
            })
            .collect::<Result<Vec<_>, Failure>>()?;
        let (train_dir, eval_dir) = (scratch()?, scratch()?);
        compile_graph(&g, device, train_dir.path())?;
        compile_graph(&eval_graph, device, eval_dir.path())?;
        let train = Model::load_with(train_dir.path(), options).map_err(|e| user(e.to_string()))?;
        let eval = Model::load_with(eval_dir.path(), options).map_err(|e| user(e.to_string()))?;
        Ok(Stepper {
            run: Run::Carried { train: Box::new(train), eval: Box::new(eval), state },
            train_data,
            eval_data,
            _dirs: vec![train_dir, eval_dir],
        })
    }

    /// The data inputs of the forward pass: name, dtype and shape.
    pub fn eval_inputs(&self) -> Vec<(&str, DType, &[u64])> {
        self.eval_data.iter().map(|d| (d.name.as_str(), d.dtype, d.shape.as_slice())).collect()
    }

    /// One optimizer step on `batch` (the bytes of each model input, in declaration order):
    /// the parameters and state move on.
    pub fn step(&mut self, batch: &[Vec<u8>]) -> Result<StepStats, Failure> {
        let mut refs = data_refs(&self.train_data, batch)?;
        let outputs = match &mut self.run {
            Run::InPlace(model) => model.run_entry(TRAIN_ENTRY, &refs),
            Run::Carried { train, state, .. } => {
                refs.extend(state.iter().map(raw_ref));
                train.run(&refs)
            }
        }
        .map_err(|e| user(e.to_string()))?;
        let (mut loss, mut lr) = (f64::NAN, f64::NAN);
        for out in outputs {
            match out.name() {
                "loss" => loss = scalar(&out),
                "optim.lr" => lr = scalar(&out),
                name => {
                    if let Run::Carried { state, .. } = &mut self.run {
                        if let Some(slot) = state.iter_mut().find(|s| s.name == name) {
                            slot.bytes.clear();
                            slot.bytes.extend_from_slice(out.bytes());
                        }
                    }
                }
            }
        }
        Ok(StepStats { loss, lr })
    }

    /// The forward pass on `batch` (the bytes of each model input, in declaration order)
    /// with the current parameters: its outputs [`EVAL_PRED`] and maybe [`EVAL_TARGET`].
    pub fn evaluate(&mut self, batch: &[Vec<u8>]) -> Result<Vec<Raw>, Failure> {
        let mut refs = data_refs(&self.eval_data, batch)?;
        let outputs = match &mut self.run {
            Run::InPlace(model) => model.run_entry(FORWARD_ENTRY, &refs),
            Run::Carried { eval, state, .. } => {
                refs.extend(state.iter().filter(|s| s.name.starts_with(PARAM_INPUT_PREFIX)).map(raw_ref));
                eval.run(&refs)
            }
        }
        .map_err(|e| user(e.to_string()))?;
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
        match &mut self.run {
            Run::InPlace(model) => model
                .state_names()
                .iter()
                .map(|name| {
                    let t = model.read_state(name).map_err(|e| user(e.to_string()))?;
                    Ok(Raw {
                        name: name.clone(),
                        dtype: ir_dtype(t.dtype()),
                        shape: t.shape().to_vec(),
                        bytes: t.bytes().to_vec(),
                    })
                })
                .collect(),
            Run::Carried { state, .. } => Ok(state
                .iter()
                .map(|s| {
                    let name = s.name.strip_prefix(PARAM_INPUT_PREFIX).unwrap_or(&s.name).to_string();
                    Raw { name, ..s.clone() }
                })
                .collect()),
        }
    }

    /// Replaces the parameters and optimizer state with `saved` (as [`Stepper::state`] gives
    /// them). Every one must be there with its dtype and shape.
    pub fn set_state(&mut self, saved: &[Raw], from: &str) -> Result<(), Failure> {
        let current = self.state()?;
        for slot in &current {
            let name = &slot.name;
            let Some(t) = saved.iter().find(|t| t.name == *name) else {
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
        }
        for t in saved {
            match &mut self.run {
                Run::InPlace(model) => {
                    if current.iter().any(|s| s.name == t.name) {
                        model.write_state(&t.name, &raw_ref(t)).map_err(|e| user(e.to_string()))?;
                    }
                }
                Run::Carried { state, .. } => {
                    let param = format!("{PARAM_INPUT_PREFIX}{}", t.name);
                    if let Some(slot) = state.iter_mut().find(|s| s.name == t.name || s.name == param) {
                        slot.bytes.clone_from(&t.bytes);
                    }
                }
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

fn raw_ref(s: &Raw) -> TensorRef<'_> {
    TensorRef::new(&s.name, runtime_dtype(s.dtype), &s.shape, &s.bytes)
}

/// An entry point's input as a [`DataInput`] of the model input of its name.
fn data_input(spec: &TensorSpec, columns: &[String]) -> Result<DataInput, Failure> {
    Ok(DataInput {
        name: spec.name.clone(),
        dtype: ir_dtype(spec.dtype),
        shape: spec.shape.clone(),
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
