//! Printers: stable text (for snapshots and `kiln inspect`), Graphviz DOT, and JSON.
//!
//! All three number nodes `%0, %1, …` in [`Graph::topo_order`], so the same graph always
//! prints the same way, whatever the node indices inside petgraph are.

use crate::graph::{Graph, NodeId};
use std::collections::HashMap;
use std::fmt::Write;

fn numbering(g: &Graph) -> (Vec<NodeId>, HashMap<NodeId, usize>) {
    let order = g.topo_order();
    let num = order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    (order, num)
}

/// Options for the text printer.
#[derive(Clone, Copy, Debug, Default)]
pub struct TextOptions {
    /// Append each node's source position (`# file:line:col`).
    pub origins: bool,
}

/// The stable text form, one node per line:
/// `%3 = matmul(%1, %2) : f32[2, 4]  # name`, then the outputs and the state
/// (`state NAME : TYPE = zeros|weights <- %N`, the update when it has one).
pub fn to_text(g: &Graph, opts: TextOptions) -> String {
    let (order, num) = numbering(g);
    let mut s = String::new();
    let _ = writeln!(s, "graph {} {{", g.name);
    for d in &g.symbols {
        let _ = writeln!(s, "  symbol {} : {}, hint {}", d.name, crate::graph::describe(d), d.hint);
    }
    for &id in &order {
        let n = g.node(id);
        let args: Vec<String> = g.operands(id).iter().map(|o| format!("%{}", num[o])).collect();
        let attrs: Vec<String> = n.op.attrs().into_iter().map(|(k, v)| format!("{k} = {v}")).collect();
        let _ = write!(s, "  %{} = {}", num[&id], n.op.name());
        if !args.is_empty() {
            let _ = write!(s, "({})", args.join(", "));
        }
        if !attrs.is_empty() {
            let _ = write!(s, " {{{}}}", attrs.join(", "));
        }
        let _ = write!(s, " : {}", n.ty);
        let mut notes = Vec::new();
        if let Some(name) = &n.name {
            notes.push(name.clone());
        }
        if opts.origins {
            if let Some(o) = &n.origin {
                notes.push(o.to_string());
            }
        }
        if !notes.is_empty() {
            let _ = write!(s, "  # {}", notes.join(" "));
        }
        s.push('\n');
    }
    for (name, id) in &g.outputs {
        let _ = writeln!(s, "  output {name} = %{}", num[id]);
    }
    for v in &g.state {
        let _ = write!(s, "  state {} : {} = {}", v.name, v.ty, v.init.name());
        match v.update {
            Some(u) => {
                let _ = writeln!(s, " <- %{}", num[&u]);
            }
            None => s.push('\n'),
        }
    }
    s.push_str("}\n");
    s
}

fn dot_escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// Graphviz DOT: inputs and params as ellipses, ops as boxes (fused ops filled gold),
/// outputs as double octagons.
pub fn to_dot(g: &Graph) -> String {
    let (order, num) = numbering(g);
    let mut s = String::new();
    let _ = writeln!(s, "digraph \"{}\" {{", dot_escape(&g.name));
    let _ = writeln!(s, "  rankdir=TB;\n  node [fontname=\"monospace\", fontsize=10];");
    for &id in &order {
        let n = g.node(id);
        let (shape, color) = match n.op {
            crate::op::Op::Input { .. } => ("ellipse", "lightblue"),
            crate::op::Op::Param { .. } => ("ellipse", "lightgrey"),
            _ if n.op.is_leaf() => ("ellipse", "white"),
            // Fused ops stand out, so an optimized graph shows at a glance what fused.
            _ if n.op.is_fused() => ("box", "gold"),
            _ => ("box", "white"),
        };
        let mut label = format!("%{} {}", num[&id], n.op.name());
        for (k, v) in n.op.attrs() {
            let _ = write!(label, "\n{k}={v}");
        }
        let _ = write!(label, "\n{}", n.ty);
        let _ = writeln!(
            s,
            "  n{} [label=\"{}\", shape={shape}, style=filled, fillcolor={color}];",
            num[&id],
            dot_escape(&label)
        );
    }
    for &id in &order {
        for (i, o) in g.operands(id).iter().enumerate() {
            let _ = writeln!(s, "  n{} -> n{} [label=\"{i}\"];", num[o], num[&id]);
        }
    }
    for (name, id) in &g.outputs {
        let _ = writeln!(s, "  \"out:{0}\" [label=\"{0}\", shape=doubleoctagon];", dot_escape(name));
        let _ = writeln!(s, "  n{} -> \"out:{}\";", num[id], dot_escape(name));
    }
    s.push_str("}\n");
    s
}

/// JSON: `{"name", "nodes": [{"id", "op", "attrs", "operands", "dtype", "shape", "name",
/// "origin"}], "inputs", "outputs"}`.
pub fn to_json(g: &Graph) -> serde_json::Value {
    use serde_json::json;
    let (order, num) = numbering(g);
    let nodes: Vec<_> = order
        .iter()
        .map(|&id| {
            let n = g.node(id);
            let attrs: serde_json::Map<String, serde_json::Value> =
                n.op.attrs().into_iter().map(|(k, v)| (k.to_string(), json_attr(&v))).collect();
            json!({
                "id": num[&id],
                "op": n.op.name(),
                "attrs": attrs,
                "operands": g.operands(id).iter().map(|o| num[o]).collect::<Vec<_>>(),
                "dtype": n.ty.dtype,
                "shape": n.ty.shape,
                "name": n.name,
                "origin": n.origin.as_ref().map(|o| o.to_string()),
            })
        })
        .collect();
    json!({
        "name": g.name,
        "nodes": nodes,
        "inputs": g.inputs.iter().map(|i| num[i]).collect::<Vec<_>>(),
        "outputs": g.outputs.iter().map(|(n, i)| json!({"name": n, "node": num[i]})).collect::<Vec<_>>(),
    })
}

/// An attribute as JSON: quoted names become plain strings, everything else stays as printed.
fn json_attr(v: &str) -> serde_json::Value {
    match serde_json::from_str::<String>(v) {
        Ok(s) => serde_json::Value::String(s),
        Err(_) => serde_json::Value::String(v.to_string()),
    }
}
