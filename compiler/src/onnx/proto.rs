//! The subset of the ONNX protobuf schema the exporter writes, as prost messages.
//!
//! Hand-written from the official schema `onnx/onnx.proto3` of the ONNX project (github.com/onnx/onnx,
//! MIT licence): message names, field names and **field numbers** follow that file exactly, so the bytes
//! are standard ONNX. Only what the exporter emits is declared (prost skips unknown fields on decode):
//! `ModelProto`, `GraphProto`, `NodeProto`, `AttributeProto`, `TensorProto` (with external data),
//! `ValueInfoProto`, `TypeProto` (tensor types only), `TensorShapeProto`, `OperatorSetIdProto` and
//! `StringStringEntryProto`. Enumerations are plain `i32` fields with the schema's values as constants.

/// `TensorProto.DataType` values used here.
pub mod data_type {
    /// `FLOAT` (f32).
    pub const FLOAT: i32 = 1;
    /// `UINT8`.
    pub const UINT8: i32 = 2;
    /// `INT64`.
    pub const INT64: i32 = 7;
    /// `BOOL` (one byte per element in `raw_data`).
    pub const BOOL: i32 = 9;
    /// `DOUBLE` (f64).
    pub const DOUBLE: i32 = 11;
}

/// `AttributeProto.AttributeType` values used here.
pub mod attribute_type {
    /// `FLOAT`.
    pub const FLOAT: i32 = 1;
    /// `INT`.
    pub const INT: i32 = 2;
    /// `STRING`.
    pub const STRING: i32 = 3;
    /// `TENSOR`.
    pub const TENSOR: i32 = 4;
    /// `GRAPH`.
    pub const GRAPH: i32 = 5;
    /// `INTS`.
    pub const INTS: i32 = 7;
}

/// `TensorProto.DataLocation.EXTERNAL`.
pub const DATA_LOCATION_EXTERNAL: i32 = 1;

/// `ModelProto`: the top-level container.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ModelProto {
    /// IR version (field 1).
    #[prost(int64, tag = "1")]
    pub ir_version: i64,
    /// Operator sets the graph binds against (field 8).
    #[prost(message, repeated, tag = "8")]
    pub opset_import: Vec<OperatorSetIdProto>,
    /// Producer tool name (field 2).
    #[prost(string, tag = "2")]
    pub producer_name: String,
    /// Producer tool version (field 3).
    #[prost(string, tag = "3")]
    pub producer_version: String,
    /// Reverse-domain namespace (field 4).
    #[prost(string, tag = "4")]
    pub domain: String,
    /// Model version (field 5).
    #[prost(int64, tag = "5")]
    pub model_version: i64,
    /// Documentation (field 6).
    #[prost(string, tag = "6")]
    pub doc_string: String,
    /// The graph (field 7).
    #[prost(message, optional, tag = "7")]
    pub graph: Option<GraphProto>,
    /// Named metadata (field 14).
    #[prost(message, repeated, tag = "14")]
    pub metadata_props: Vec<StringStringEntryProto>,
}

/// `StringStringEntryProto`: a key/value pair.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StringStringEntryProto {
    /// Field 1.
    #[prost(string, tag = "1")]
    pub key: String,
    /// Field 2.
    #[prost(string, tag = "2")]
    pub value: String,
}

/// `OperatorSetIdProto`: an (domain, version) operator set.
#[derive(Clone, PartialEq, prost::Message)]
pub struct OperatorSetIdProto {
    /// Empty for the default `ai.onnx` domain (field 1).
    #[prost(string, tag = "1")]
    pub domain: String,
    /// Opset version (field 2).
    #[prost(int64, tag = "2")]
    pub version: i64,
}

/// `GraphProto`: nodes in topological order plus inputs, outputs and initializers.
#[derive(Clone, PartialEq, prost::Message)]
pub struct GraphProto {
    /// Field 1.
    #[prost(message, repeated, tag = "1")]
    pub node: Vec<NodeProto>,
    /// Field 2.
    #[prost(string, tag = "2")]
    pub name: String,
    /// Field 5.
    #[prost(message, repeated, tag = "5")]
    pub initializer: Vec<TensorProto>,
    /// Field 10.
    #[prost(string, tag = "10")]
    pub doc_string: String,
    /// Field 11.
    #[prost(message, repeated, tag = "11")]
    pub input: Vec<ValueInfoProto>,
    /// Field 12.
    #[prost(message, repeated, tag = "12")]
    pub output: Vec<ValueInfoProto>,
    /// Field 13.
    #[prost(message, repeated, tag = "13")]
    pub value_info: Vec<ValueInfoProto>,
}

/// `NodeProto`: one operator application.
#[derive(Clone, PartialEq, prost::Message)]
pub struct NodeProto {
    /// Field 1.
    #[prost(string, repeated, tag = "1")]
    pub input: Vec<String>,
    /// Field 2.
    #[prost(string, repeated, tag = "2")]
    pub output: Vec<String>,
    /// Field 3.
    #[prost(string, tag = "3")]
    pub name: String,
    /// Field 4.
    #[prost(string, tag = "4")]
    pub op_type: String,
    /// Field 7.
    #[prost(string, tag = "7")]
    pub domain: String,
    /// Field 5.
    #[prost(message, repeated, tag = "5")]
    pub attribute: Vec<AttributeProto>,
    /// Field 6.
    #[prost(string, tag = "6")]
    pub doc_string: String,
}

/// `AttributeProto`: a named attribute; `type` says which value field is used.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AttributeProto {
    /// Field 1.
    #[prost(string, tag = "1")]
    pub name: String,
    /// Discriminator, an [`attribute_type`] value (field 20).
    #[prost(int32, tag = "20")]
    pub r#type: i32,
    /// Field 2.
    #[prost(float, tag = "2")]
    pub f: f32,
    /// Field 3.
    #[prost(int64, tag = "3")]
    pub i: i64,
    /// Field 4.
    #[prost(bytes = "vec", tag = "4")]
    pub s: Vec<u8>,
    /// Field 5.
    #[prost(message, optional, tag = "5")]
    pub t: Option<TensorProto>,
    /// Field 6.
    #[prost(message, optional, tag = "6")]
    pub g: Option<GraphProto>,
    /// Field 7.
    #[prost(float, repeated, tag = "7")]
    pub floats: Vec<f32>,
    /// Field 8.
    #[prost(int64, repeated, tag = "8")]
    pub ints: Vec<i64>,
}

/// `TensorProto`: a tensor value, inline (`raw_data`) or in an external file.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TensorProto {
    /// Field 1.
    #[prost(int64, repeated, tag = "1")]
    pub dims: Vec<i64>,
    /// A [`data_type`] value (field 2).
    #[prost(int32, tag = "2")]
    pub data_type: i32,
    /// Field 8.
    #[prost(string, tag = "8")]
    pub name: String,
    /// Field 12.
    #[prost(string, tag = "12")]
    pub doc_string: String,
    /// Little-endian element bytes (field 9).
    #[prost(bytes = "vec", tag = "9")]
    pub raw_data: Vec<u8>,
    /// `location`, `offset`, `length` of external data (field 13).
    #[prost(message, repeated, tag = "13")]
    pub external_data: Vec<StringStringEntryProto>,
    /// 0 = DEFAULT, [`DATA_LOCATION_EXTERNAL`] (field 14).
    #[prost(int32, tag = "14")]
    pub data_location: i32,
}

/// `ValueInfoProto`: a named, typed value (graph input or output).
#[derive(Clone, PartialEq, prost::Message)]
pub struct ValueInfoProto {
    /// Field 1.
    #[prost(string, tag = "1")]
    pub name: String,
    /// Field 2.
    #[prost(message, optional, tag = "2")]
    pub r#type: Option<TypeProto>,
    /// Field 3.
    #[prost(string, tag = "3")]
    pub doc_string: String,
}

/// `TypeProto` with only its tensor alternative.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TypeProto {
    /// The `value` oneof (field 1 = `tensor_type`).
    #[prost(oneof = "type_proto::Value", tags = "1")]
    pub value: Option<type_proto::Value>,
}

/// Nested types of [`TypeProto`].
pub mod type_proto {
    /// `TypeProto.Tensor`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Tensor {
        /// A `data_type` value (field 1).
        #[prost(int32, tag = "1")]
        pub elem_type: i32,
        /// Field 2.
        #[prost(message, optional, tag = "2")]
        pub shape: Option<super::TensorShapeProto>,
    }

    /// The `value` oneof.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Value {
        /// `tensor_type = 1`.
        #[prost(message, tag = "1")]
        TensorType(Tensor),
    }
}

/// `TensorShapeProto`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TensorShapeProto {
    /// Field 1.
    #[prost(message, repeated, tag = "1")]
    pub dim: Vec<tensor_shape_proto::Dimension>,
}

/// Nested types of [`TensorShapeProto`].
pub mod tensor_shape_proto {
    /// `TensorShapeProto.Dimension`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Dimension {
        /// The `value` oneof (1 = `dim_value`, 2 = `dim_param`).
        #[prost(oneof = "dimension::Value", tags = "1, 2")]
        pub value: Option<dimension::Value>,
    }

    /// Nested types of [`Dimension`].
    pub mod dimension {
        /// A fixed size or a symbolic name.
        #[derive(Clone, PartialEq, prost::Oneof)]
        pub enum Value {
            /// `dim_value = 1`.
            #[prost(int64, tag = "1")]
            DimValue(i64),
            /// `dim_param = 2`.
            #[prost(string, tag = "2")]
            DimParam(String),
        }
    }
}
