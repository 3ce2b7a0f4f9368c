//! A small ONNX graph builder: unique value names, nodes pushed in topological order, nested scopes for
//! `If` branches, deduplicated small constants (kept as inline initializers), and a registry of the large
//! tensors (weights, RoPE tables) that the writer later emits inline or as external data.

use super::proto::{
    attribute_type, data_type, tensor_shape_proto, type_proto, AttributeProto, GraphProto, NodeProto, TensorProto,
    TensorShapeProto, TypeProto, ValueInfoProto,
};
use std::collections::HashMap;

/// One dimension of a declared input/output shape.
#[derive(Debug, Clone)]
pub enum Dim {
    /// A fixed size.
    Fixed(usize),
    /// A symbolic (dynamic) size, e.g. `seq` or `capacity`.
    Sym(&'static str),
}

/// A typed, shaped value declaration (graph input, graph output, branch output).
pub fn value_info(name: &str, elem: i32, dims: &[Dim]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| tensor_shape_proto::Dimension {
            value: Some(match d {
                Dim::Fixed(n) => tensor_shape_proto::dimension::Value::DimValue(*n as i64),
                Dim::Sym(s) => tensor_shape_proto::dimension::Value::DimParam((*s).to_string()),
            }),
        })
        .collect();
    ValueInfoProto {
        name: name.to_string(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: elem,
                shape: Some(TensorShapeProto { dim }),
            })),
        }),
        doc_string: String::new(),
    }
}

/// An `INT` attribute.
pub fn attr_i(name: &str, i: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: attribute_type::INT,
        i,
        ..Default::default()
    }
}

/// An `INTS` attribute.
pub fn attr_ints(name: &str, ints: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: attribute_type::INTS,
        ints: ints.to_vec(),
        ..Default::default()
    }
}

/// A `TENSOR` attribute.
pub fn attr_t(name: &str, t: TensorProto) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: attribute_type::TENSOR,
        t: Some(t),
        ..Default::default()
    }
}

/// A `GRAPH` attribute (an `If` branch).
pub fn attr_g(name: &str, g: GraphProto) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: attribute_type::GRAPH,
        g: Some(g),
        ..Default::default()
    }
}

/// A tensor with inline little-endian bytes.
pub fn raw_tensor(name: &str, elem: i32, dims: &[i64], raw: Vec<u8>) -> TensorProto {
    TensorProto {
        dims: dims.to_vec(),
        data_type: elem,
        name: name.to_string(),
        raw_data: raw,
        ..Default::default()
    }
}

/// The element type of every floating-point tensor of an exported model pair (weights, RoPE tables,
/// constants, activations, caches, logits, router logits).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Elem {
    /// IEEE binary32: the deployment type.
    #[default]
    F32,
    /// IEEE binary64: a verification type. Compared with the runtime computing in f64, it shows that the
    /// lowering itself is exact, below the f32 summation-order noise of real models.
    F64,
}

impl Elem {
    /// The ONNX `TensorProto.DataType`.
    pub fn onnx(self) -> i32 {
        match self {
            Elem::F32 => data_type::FLOAT,
            Elem::F64 => data_type::DOUBLE,
        }
    }

    /// The candle dtype of the same precision.
    pub fn dtype(self) -> candle_core::DType {
        match self {
            Elem::F32 => candle_core::DType::F32,
            Elem::F64 => candle_core::DType::F64,
        }
    }

    /// Bytes per element.
    pub fn size(self) -> u64 {
        match self {
            Elem::F32 => 4,
            Elem::F64 => 8,
        }
    }

    /// `f32` or `f64`.
    pub fn as_str(self) -> &'static str {
        match self {
            Elem::F32 => "f32",
            Elem::F64 => "f64",
        }
    }

    /// Little-endian bytes of `v` in this type (rounded to nearest for f32).
    pub fn bytes(self, v: &[f64]) -> Vec<u8> {
        match self {
            Elem::F32 => v.iter().flat_map(|&x| (x as f32).to_le_bytes()).collect(),
            Elem::F64 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }
}

/// Little-endian bytes of i64 values.
pub fn i64_bytes(v: &[i64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Where a registered large tensor's values come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// The checkpoint tensor of this (HF) name, converted to the export's [`Elem`].
    Checkpoint,
    /// Values computed by the exporter (RoPE tables), written in the export's [`Elem`].
    Generated(Vec<f64>),
}

/// A large floating-point tensor an exported model references by name.
#[derive(Debug, Clone)]
pub struct TensorSpec {
    /// Initializer name (the HF name for checkpoint tensors).
    pub name: String,
    /// Shape.
    pub dims: Vec<usize>,
    /// Values.
    pub source: Source,
}

impl TensorSpec {
    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.dims.iter().product::<usize>() as u64
    }
}

/// The large tensors of a model pair, in first-use order, each name once.
#[derive(Debug, Default)]
pub struct Registry {
    /// Element type the tensors are stored in, and the graphs compute in.
    pub elem: Elem,
    /// Specs in first-use order.
    pub specs: Vec<TensorSpec>,
    index: HashMap<String, usize>,
}

impl Registry {
    /// An empty registry for a model pair in `elem`.
    pub fn new(elem: Elem) -> Self {
        Registry {
            elem,
            ..Default::default()
        }
    }

    /// Registers (or re-uses) a tensor; returns its name.
    pub fn add(&mut self, spec: TensorSpec) -> String {
        if let Some(&i) = self.index.get(&spec.name) {
            debug_assert_eq!(self.specs[i].dims, spec.dims, "tensor `{}` registered twice", spec.name);
            return spec.name;
        }
        let name = spec.name.clone();
        self.index.insert(name.clone(), self.specs.len());
        self.specs.push(spec);
        name
    }

    /// Total bytes of every registered tensor.
    pub fn total_bytes(&self) -> u64 {
        self.specs.iter().map(TensorSpec::numel).sum::<u64>() * self.elem.size()
    }
}

/// Builds one graph (and its `If` sub-graphs) node by node.
#[derive(Debug, Default)]
pub struct Builder {
    /// Element type of the graph's floating-point values.
    pub elem: Elem,
    scopes: Vec<Vec<NodeProto>>,
    counter: usize,
    /// Prefix of generated value names (e.g. `l3.`), for readable graphs.
    pub prefix: String,
    consts: Vec<TensorProto>,
    const_names: HashMap<(i32, Vec<i64>, Vec<u8>), String>,
}

impl Builder {
    /// An empty builder with one (top-level) scope, for a graph computing in `elem`.
    pub fn new(elem: Elem) -> Self {
        Builder {
            elem,
            scopes: vec![Vec::new()],
            ..Default::default()
        }
    }

    /// A fresh value name `{prefix}{hint}_{n}`.
    pub fn fresh(&mut self, hint: &str) -> String {
        self.counter += 1;
        format!("{}{}_{}", self.prefix, hint, self.counter)
    }

    /// Appends a node with explicit output names to the innermost scope.
    pub fn node(&mut self, op: &str, inputs: &[&str], outputs: &[&str], attrs: Vec<AttributeProto>) {
        self.counter += 1;
        let node = NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            name: format!("{}{}_{}", self.prefix, op, self.counter),
            op_type: op.to_string(),
            attribute: attrs,
            ..Default::default()
        };
        self.scopes.last_mut().expect("a scope is always open").push(node);
    }

    /// Appends a single-output node and returns its fresh output name.
    pub fn op(&mut self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>) -> String {
        let out = self.fresh(op);
        self.node(op, inputs, &[&out], attrs);
        out
    }

    /// Opens a nested scope (an `If` branch body).
    pub fn push_scope(&mut self) {
        self.scopes.push(Vec::new());
    }

    /// Closes the innermost scope and returns its nodes.
    pub fn pop_scope(&mut self) -> Vec<NodeProto> {
        debug_assert!(self.scopes.len() > 1, "pop_scope without push_scope");
        self.scopes.pop().unwrap_or_default()
    }

    /// Takes the top-level nodes and the small constants (initializers) when the graph is done.
    pub fn finish(self) -> (Vec<NodeProto>, Vec<TensorProto>) {
        debug_assert_eq!(self.scopes.len(), 1, "unclosed scope");
        let nodes = self.scopes.into_iter().next().unwrap_or_default();
        (nodes, self.consts)
    }

    fn constant(&mut self, elem: i32, dims: &[i64], raw: Vec<u8>) -> String {
        let key = (elem, dims.to_vec(), raw);
        if let Some(n) = self.const_names.get(&key) {
            return n.clone();
        }
        let name = format!("const_{}", self.consts.len());
        self.consts.push(raw_tensor(&name, elem, dims, key.2.clone()));
        self.const_names.insert(key, name.clone());
        name
    }

    /// A 1-D int64 constant.
    pub fn ints(&mut self, v: &[i64]) -> String {
        self.constant(data_type::INT64, &[v.len() as i64], i64_bytes(v))
    }

    /// An int64 constant of the given shape.
    pub fn ints_shaped(&mut self, v: &[i64], dims: &[i64]) -> String {
        self.constant(data_type::INT64, dims, i64_bytes(v))
    }

    /// A 0-D int64 constant.
    pub fn scalar_i64(&mut self, v: i64) -> String {
        self.constant(data_type::INT64, &[], i64_bytes(&[v]))
    }

    /// A 0-D floating-point constant in the graph's [`Elem`].
    pub fn scalar(&mut self, v: f64) -> String {
        self.constant(self.elem.onnx(), &[], self.elem.bytes(&[v]))
    }
}
