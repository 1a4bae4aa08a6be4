//! Persistent state: named tensors a graph keeps from one run to the next (trainable
//! parameters, optimizer moments, the step count), and the updates `state ← value` applied at
//! the end of a run.
//!
//! A graph reads a state variable through an `Op::Param` leaf of the same name, so autodiff,
//! the optimizer and the interpreter see it as the parameter it is; what makes it state is its
//! entry in [`Graph::state`]. Weight folding and prepacking apply only to parameters that are
//! not state (they do not change). An update names the node whose value the variable holds
//! after the run; every read of the variable in that run sees the value from before it (the
//! scheduler writes in place only when that stays true).

use crate::dtype::TensorType;
use crate::graph::{Graph, NodeId};
use crate::interp::{eval, Bindings, EvalError};
use crate::op::{Init, Op};
use crate::tensor::Tensor;
use std::collections::HashMap;

/// Where a state variable's value comes from before the first run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StateInit {
    /// The parameter's bound value (a checkpoint or its initializer): a trainable weight.
    Weights,
    /// Zeros (optimizer moments, the step count).
    Zeros,
}

impl StateInit {
    pub fn name(self) -> &'static str {
        match self {
            StateInit::Weights => "weights",
            StateInit::Zeros => "zeros",
        }
    }
}

/// One persistent tensor of a graph.
#[derive(Clone, Debug, PartialEq)]
pub struct StateVar {
    /// Its name; `Op::Param` nodes of this name read it.
    pub name: String,
    pub ty: TensorType,
    pub init: StateInit,
    /// The node whose value it holds after a run; `None`: the graph only reads it (a
    /// forward pass over trained weights).
    pub update: Option<NodeId>,
}

/// A state declaration that does not fit the graph.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum StateError {
    #[error("state `{0}` is declared twice")]
    Duplicate(String),
    #[error("state `{0}`: no parameter or input of that name reads it and no output updates it")]
    Unknown(String),
    #[error("state `{name}`: {what} is {found}, the state is {expected}")]
    Type { name: String, what: String, expected: TensorType, found: TensorType },
    #[error("state `{name}`: the graph has no output `{output}` to update it with")]
    NoOutput { name: String, output: String },
    #[error("state `{name}` reads the weights, but no value is bound for parameter `{name}`")]
    Unbound { name: String },
}

impl Graph {
    /// The state variable `name`, if the graph declares it.
    pub fn state_var(&self, name: &str) -> Option<&StateVar> {
        self.state.iter().find(|s| s.name == name)
    }

    /// Declares `name` persistent state with initial value `init`. Its reads are the
    /// parameters of that name; an input of that name becomes such a parameter (a train step
    /// built with its state as inputs). With `update_output`, the output of that name is
    /// taken out of the outputs and becomes the update.
    pub fn declare_state(
        &mut self,
        name: &str,
        init: StateInit,
        update_output: Option<&str>,
    ) -> Result<(), StateError> {
        if self.state_var(name).is_some() {
            return Err(StateError::Duplicate(name.to_string()));
        }
        let mut ty: Option<TensorType> = None;
        let reads: Vec<NodeId> = self
            .node_ids()
            .filter(|&n| match &self.node(n).op {
                Op::Param { name: p, .. } | Op::Input { name: p, .. } => p == name,
                _ => false,
            })
            .collect();
        for &n in &reads {
            let found = self.ty(n).clone();
            match &ty {
                Some(t) if *t != found => {
                    return Err(StateError::Type {
                        name: name.to_string(),
                        what: "one of its reads".into(),
                        expected: t.clone(),
                        found,
                    })
                }
                _ => ty = Some(found),
            }
        }
        let update = match update_output {
            None => None,
            Some(output) => {
                let at = self.outputs.iter().position(|(o, _)| o == output).ok_or_else(|| {
                    StateError::NoOutput { name: name.to_string(), output: output.to_string() }
                })?;
                let node = self.outputs[at].1;
                let found = self.ty(node).clone();
                match &ty {
                    Some(t) if *t != found => {
                        return Err(StateError::Type {
                            name: name.to_string(),
                            what: format!("its update `{output}`"),
                            expected: t.clone(),
                            found,
                        })
                    }
                    _ => ty = Some(found),
                }
                self.outputs.remove(at);
                Some(node)
            }
        };
        let ty = ty.ok_or_else(|| StateError::Unknown(name.to_string()))?;
        for n in reads {
            if let Op::Input { .. } = self.node(n).op {
                self.inputs.retain(|&i| i != n);
                let (dtype, shape) = (ty.dtype, ty.shape.clone());
                self.node_mut(n).op = Op::Param { name: name.to_string(), dtype, shape, init: Init::Zeros };
            }
        }
        self.state.push(StateVar { name: name.to_string(), ty, init, update });
        Ok(())
    }
}

/// Checks the state table: names unique, every parameter of a state name of the state's type,
/// every update a node of the graph of that type, no input of a state name.
pub(crate) fn check(g: &Graph) -> Result<(), String> {
    let mut names = std::collections::HashSet::new();
    for s in &g.state {
        if !names.insert(s.name.as_str()) {
            return Err(format!("state `{}` is declared twice", s.name));
        }
        if let Some(u) = s.update {
            if !g.node_ids().any(|n| n == u) {
                return Err(format!("the update of state `{}` is not a node of the graph", s.name));
            }
            if *g.ty(u) != s.ty {
                return Err(format!("state `{}` is {} but its update is {}", s.name, s.ty, g.ty(u)));
            }
        }
    }
    for n in g.node_ids() {
        match &g.node(n).op {
            Op::Param { name, .. } => {
                if let Some(s) = g.state_var(name) {
                    if *g.ty(n) != s.ty {
                        return Err(format!("state `{name}` is {} but a read of it is {}", s.ty, g.ty(n)));
                    }
                }
            }
            Op::Input { name, .. } if names.contains(name.as_str()) => {
                return Err(format!("`{name}` is both an input and state"));
            }
            _ => {}
        }
    }
    Ok(())
}

/// The state's values before the first run: each `Weights` variable's bound parameter,
/// zeros for the rest.
pub fn initial_state(
    g: &Graph,
    params: &HashMap<String, Tensor>,
) -> Result<HashMap<String, Tensor>, StateError> {
    g.state
        .iter()
        .map(|s| {
            let value = match s.init {
                StateInit::Weights => params
                    .get(&s.name)
                    .cloned()
                    .ok_or_else(|| StateError::Unbound { name: s.name.clone() })?,
                StateInit::Zeros => Tensor::full(s.ty.dtype, s.ty.static_shape(), 0.0),
            };
            Ok((s.name.clone(), value))
        })
        .collect()
}

/// Runs one step of a stateful graph in the interpreter: the outputs from `inputs`, the
/// parameters that are not state (`frozen`) and `state`, which then holds the updated values.
/// A state variable without an update keeps its value.
pub fn eval_step(
    g: &Graph,
    inputs: HashMap<String, Tensor>,
    frozen: &HashMap<String, Tensor>,
    state: &mut HashMap<String, Tensor>,
) -> Result<Vec<(String, Tensor)>, EvalError> {
    // The updates become extra outputs after the real ones (output names cannot collide:
    // they are only positions here).
    let mut with_updates = g.clone();
    let updated: Vec<&StateVar> = g.state.iter().filter(|s| s.update.is_some()).collect();
    for s in &updated {
        if let Some(u) = s.update {
            with_updates.add_output(format!("{}\u{0}update", s.name), u);
        }
    }
    let mut params = frozen.clone();
    params.extend(state.iter().map(|(k, v)| (k.clone(), v.clone())));
    let mut outputs = eval(&with_updates, &Bindings { inputs, params })?;
    let news = outputs.split_off(g.outputs.len());
    for (s, (_, value)) in updated.into_iter().zip(news) {
        state.insert(s.name.clone(), value);
    }
    Ok(outputs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::op::BinaryOp;
    use crate::print::{to_text, TextOptions};
    use crate::DType;

    /// `w ← w − 0.5·x`, `n ← n + 1`, output `y = w·x`: the smallest train step.
    fn counter() -> Graph {
        let mut g = Graph::new("counter");
        let x = g
            .add(Op::Input { name: "x".into(), dtype: DType::F32, shape: crate::dtype::dims(&[2]) }, &[])
            .unwrap();
        let n = g
            .add(Op::Input { name: "n".into(), dtype: DType::F32, shape: crate::dtype::dims(&[]) }, &[])
            .unwrap();
        let w = g
            .add(
                Op::Param {
                    name: "w".into(),
                    dtype: DType::F32,
                    shape: crate::dtype::dims(&[2]),
                    init: Init::Zeros,
                },
                &[],
            )
            .unwrap();
        let y = g.add(Op::Binary(BinaryOp::Mul), &[w, x]).unwrap();
        let half =
            g.add(Op::Full { value: 0.5, dtype: DType::F32, shape: crate::dtype::dims(&[]) }, &[]).unwrap();
        let d = g.add(Op::Binary(BinaryOp::Mul), &[x, half]).unwrap();
        let w2 = g.add(Op::Binary(BinaryOp::Sub), &[w, d]).unwrap();
        let one =
            g.add(Op::Full { value: 1.0, dtype: DType::F32, shape: crate::dtype::dims(&[]) }, &[]).unwrap();
        let n2 = g.add(Op::Binary(BinaryOp::Add), &[n, one]).unwrap();
        g.add_output("y", y);
        g.add_output("param.w", w2);
        g.add_output("n", n2);
        g.declare_state("w", StateInit::Weights, Some("param.w")).unwrap();
        g.declare_state("n", StateInit::Zeros, Some("n")).unwrap();
        g
    }

    #[test]
    fn a_stateful_graph_prints_its_state_and_updates() {
        let g = counter();
        crate::verify(&g).unwrap();
        assert_eq!(
            to_text(&g, TextOptions::default()),
            "graph counter {
  %0 = input {name = \"x\"} : f32[2]
  %1 = param {name = \"n\", init = zeros} : f32[]
  %2 = param {name = \"w\", init = zeros} : f32[2]
  %3 = mul(%2, %0) : f32[2]
  %4 = full {value = 0.5} : f32[]
  %5 = mul(%0, %4) : f32[2]
  %6 = sub(%2, %5) : f32[2]
  %7 = full {value = 1.0} : f32[]
  %8 = add(%1, %7) : f32[]
  output y = %3
  state w : f32[2] = weights <- %6
  state n : f32[] = zeros <- %8
}
"
        );
    }

    #[test]
    fn steps_update_the_state_and_read_the_old_values() {
        let g = counter();
        let params = HashMap::from([("w".to_string(), Tensor::from_f32(vec![2], vec![1.0, 2.0]).unwrap())]);
        let mut state = initial_state(&g, &params).unwrap();
        assert_eq!(state["n"], Tensor::from_f32(Vec::<usize>::new(), vec![0.0]).unwrap());
        let x = Tensor::from_f32(vec![2], vec![2.0, 4.0]).unwrap();
        let mut ys = Vec::new();
        for _ in 0..3 {
            let out =
                eval_step(&g, HashMap::from([("x".into(), x.clone())]), &HashMap::new(), &mut state).unwrap();
            ys.push(out[0].1.to_f64_vec());
        }
        // w: [1, 2] → [0, 0] → [-1, -2]; y reads w before each update.
        assert_eq!(ys, [vec![2.0, 8.0], vec![0.0, 0.0], vec![-2.0, -8.0]]);
        assert_eq!(state["w"].to_f64_vec(), [-2.0, -4.0]);
        assert_eq!(state["n"].to_f64_vec(), [3.0]);
        // The inputs that became state are gone from the interface.
        assert_eq!(g.inputs.len(), 1);
        assert_eq!(g.outputs.len(), 1);
    }

    #[test]
    fn bad_declarations_are_refused_with_their_reason() {
        let mut g = counter();
        assert_eq!(g.declare_state("w", StateInit::Zeros, None), Err(StateError::Duplicate("w".into())));
        assert_eq!(
            g.declare_state("nothing", StateInit::Zeros, None),
            Err(StateError::Unknown("nothing".into()))
        );
        assert_eq!(
            g.declare_state("x", StateInit::Zeros, Some("param.x")),
            Err(StateError::NoOutput { name: "x".into(), output: "param.x".into() })
        );
        let n2 = g.state[1].update.unwrap();
        g.add_output("wrong", n2);
        assert_eq!(
            g.declare_state("x", StateInit::Zeros, Some("wrong")).unwrap_err().to_string(),
            "state `x`: its update `wrong` is f32[], the state is f32[2]"
        );
        let mut g = counter();
        let n = g.node_ids().find(|&n| matches!(&g.node(n).op, Op::Binary(BinaryOp::Add))).unwrap();
        g.state[0].update = Some(n);
        assert_eq!(
            crate::verify(&g).unwrap_err().to_string(),
            "state: state `w` is f32[2] but its update is f32[]"
        );
        assert_eq!(initial_state(&counter(), &HashMap::new()), Err(StateError::Unbound { name: "w".into() }));
    }
}
