//! Just enough of SPIR-V to check a module against the manifest before the driver sees it: the
//! header, the capabilities it declares, its GLCompute entry points with their workgroup size,
//! and the storage buffers each entry point uses with their declared sizes. A driver handed a
//! module that contradicts the manifest may crash, and a shader whose buffer is larger than
//! what is bound reads and writes out of bounds; this reader lets the loader refuse both.

use std::collections::{HashMap, HashSet};

/// The first word of every SPIR-V module.
pub(crate) const MAGIC: u32 = 0x0723_0203;

const OP_ENTRY_POINT: u32 = 15;
const OP_EXECUTION_MODE: u32 = 16;
const OP_CAPABILITY: u32 = 17;
const OP_TYPE_BOOL: u32 = 20;
const OP_TYPE_INT: u32 = 21;
const OP_TYPE_FLOAT: u32 = 22;
const OP_TYPE_VECTOR: u32 = 23;
const OP_TYPE_ARRAY: u32 = 28;
const OP_TYPE_RUNTIME_ARRAY: u32 = 29;
const OP_TYPE_STRUCT: u32 = 30;
const OP_TYPE_POINTER: u32 = 32;
const OP_CONSTANT: u32 = 43;
const OP_CONSTANT_COMPOSITE: u32 = 44;
const OP_SPEC_CONSTANT: u32 = 50;
const OP_SPEC_CONSTANT_COMPOSITE: u32 = 51;
const OP_FUNCTION: u32 = 54;
const OP_FUNCTION_END: u32 = 56;
const OP_FUNCTION_CALL: u32 = 57;
const OP_VARIABLE: u32 = 59;
const OP_LOAD: u32 = 61;
const OP_STORE: u32 = 62;
const OP_COPY_MEMORY: u32 = 63;
const OP_COPY_MEMORY_SIZED: u32 = 64;
const OP_ACCESS_CHAIN: u32 = 65;
const OP_IN_BOUNDS_ACCESS_CHAIN: u32 = 66;
const OP_PTR_ACCESS_CHAIN: u32 = 67;
const OP_ARRAY_LENGTH: u32 = 68;
const OP_IN_BOUNDS_PTR_ACCESS_CHAIN: u32 = 70;
const OP_DECORATE: u32 = 71;
const OP_MEMBER_DECORATE: u32 = 72;
const OP_COPY_OBJECT: u32 = 83;
const OP_ATOMIC_LOAD: u32 = 227;
const OP_ATOMIC_STORE: u32 = 228;
const OP_ATOMIC_XOR: u32 = 242;

const EXECUTION_MODEL_GLCOMPUTE: u32 = 5;
const MODE_LOCAL_SIZE: u32 = 17;
const MODE_LOCAL_SIZE_ID: u32 = 38;
const DECORATION_BLOCK: u32 = 2;
const DECORATION_BUFFER_BLOCK: u32 = 3;
const DECORATION_ARRAY_STRIDE: u32 = 6;
const DECORATION_BUILTIN: u32 = 11;
const DECORATION_BINDING: u32 = 33;
const DECORATION_DESCRIPTOR_SET: u32 = 34;
const DECORATION_OFFSET: u32 = 35;
const BUILTIN_WORKGROUP_SIZE: u32 = 25;
const STORAGE_UNIFORM: u32 = 2;
const STORAGE_WORKGROUP: u32 = 4;
const STORAGE_BUFFER: u32 = 12;

/// What the runtime needs to know about one module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ModuleInfo {
    /// SPIR-V version as `(major, minor)`.
    pub version: (u32, u32),
    /// Capability numbers of its `OpCapability` instructions.
    pub capabilities: Vec<u32>,
    /// GLCompute entry points by name.
    pub entries: HashMap<String, EntryInfo>,
}

/// One GLCompute entry point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EntryInfo {
    /// Its workgroup size: the `WorkgroupSize` built-in if the module has one, else its literal
    /// `LocalSize` (`None` when neither gives one, e.g. `LocalSizeId`).
    pub local_size: Option<[u32; 3]>,
    /// The buffer variables its code (through the functions it calls) uses, sorted.
    pub buffers: Vec<BufferVar>,
    /// Bytes of workgroup (shared) memory its variables take, when every size is known.
    pub shared_bytes: Option<u64>,
}

/// A buffer variable an entry point uses.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct BufferVar {
    pub set: u32,
    pub binding: u32,
    /// A storage buffer (`false`: a uniform buffer, which Kiln never binds).
    pub storage: bool,
    /// Bytes the declared type spans (a runtime array counts for nothing), if computable.
    pub bytes: Option<u64>,
}

enum Type {
    Scalar(u64),
    Vector(u32, u64),
    Array(u32, u32),
    RuntimeArray,
    Struct(Vec<u32>),
    Pointer(u32),
}

/// Reads the module's words (little-endian, as the compiler writes them). Errors are messages
/// for `RuntimeError::Spirv`.
pub(crate) fn parse(words: &[u32]) -> Result<ModuleInfo, String> {
    if words.len() < 5 {
        return Err(format!("{} words is shorter than a SPIR-V header (5 words)", words.len()));
    }
    if words[0] != MAGIC {
        return Err(format!("it starts with {:#010x}, not the SPIR-V magic number {MAGIC:#010x}", words[0]));
    }
    let version = ((words[1] >> 16) & 0xff, (words[1] >> 8) & 0xff);
    let mut capabilities = Vec::new();
    let mut entry_ids: Vec<(u32, String)> = Vec::new();
    let mut sizes: HashMap<u32, Option<[u32; 3]>> = HashMap::new();
    let mut decorations: HashMap<u32, Vec<(u32, u32)>> = HashMap::new();
    let mut offsets: HashMap<(u32, u32), u64> = HashMap::new();
    let mut types: HashMap<u32, Type> = HashMap::new();
    let mut constants: HashMap<u32, u64> = HashMap::new();
    let mut composites: HashMap<u32, Vec<u32>> = HashMap::new();
    let mut variables: HashMap<u32, (u32, u32)> = HashMap::new();
    let mut uses: HashMap<u32, HashSet<u32>> = HashMap::new();
    let mut calls: HashMap<u32, Vec<u32>> = HashMap::new();
    let mut function: Option<u32> = None;
    let mut at = 5;
    while at < words.len() {
        let count = (words[at] >> 16) as usize;
        let opcode = words[at] & 0xffff;
        if count == 0 || at + count > words.len() {
            return Err(format!(
                "the instruction at word {at} has word count {count}, past the module's end"
            ));
        }
        let ops = &words[at + 1..at + count];
        let op = |i: usize| ops.get(i).copied();
        match (opcode, ops.len()) {
            (OP_CAPABILITY, 1..) => capabilities.push(ops[0]),
            (OP_ENTRY_POINT, 3..) if ops[0] == EXECUTION_MODEL_GLCOMPUTE => {
                entry_ids.push((ops[1], literal_string(&ops[2..])?));
            }
            (OP_EXECUTION_MODE, 5..) if ops[1] == MODE_LOCAL_SIZE => {
                sizes.insert(ops[0], Some([ops[2], ops[3], ops[4]]));
            }
            (OP_EXECUTION_MODE, 2..) if ops[1] == MODE_LOCAL_SIZE_ID => {
                sizes.insert(ops[0], None);
            }
            (OP_DECORATE, 2..) => {
                decorations.entry(ops[0]).or_default().push((ops[1], op(2).unwrap_or(0)));
            }
            (OP_MEMBER_DECORATE, 4..) if ops[2] == DECORATION_OFFSET => {
                offsets.insert((ops[0], ops[1]), u64::from(ops[3]));
            }
            (OP_TYPE_BOOL, 1..) => {
                types.insert(ops[0], Type::Scalar(4));
            }
            (OP_TYPE_INT | OP_TYPE_FLOAT, 2..) => {
                types.insert(ops[0], Type::Scalar(u64::from(ops[1] / 8)));
            }
            (OP_TYPE_VECTOR, 3..) => {
                types.insert(ops[0], Type::Vector(ops[1], u64::from(ops[2])));
            }
            (OP_TYPE_ARRAY, 3..) => {
                types.insert(ops[0], Type::Array(ops[1], ops[2]));
            }
            (OP_TYPE_RUNTIME_ARRAY, 2..) => {
                types.insert(ops[0], Type::RuntimeArray);
            }
            (OP_TYPE_STRUCT, 1..) => {
                types.insert(ops[0], Type::Struct(ops[1..].to_vec()));
            }
            (OP_TYPE_POINTER, 3..) => {
                types.insert(ops[0], Type::Pointer(ops[2]));
            }
            (OP_CONSTANT | OP_SPEC_CONSTANT, 3..) => {
                let high = op(3).map_or(0, u64::from) << 32;
                constants.insert(ops[1], high | u64::from(ops[2]));
            }
            (OP_CONSTANT_COMPOSITE | OP_SPEC_CONSTANT_COMPOSITE, 2..) => {
                composites.insert(ops[1], ops[2..].to_vec());
            }
            (OP_VARIABLE, 3..) if function.is_none() => {
                variables.insert(ops[1], (ops[2], ops[0]));
            }
            (OP_FUNCTION, 2..) => function = Some(ops[1]),
            (OP_FUNCTION_END, _) => function = None,
            _ => {}
        }
        if let Some(f) = function {
            // The operands that hold a pointer: a global variable used here appears in one.
            let pointers: &[usize] = match opcode {
                OP_LOAD
                | OP_ACCESS_CHAIN
                | OP_IN_BOUNDS_ACCESS_CHAIN
                | OP_PTR_ACCESS_CHAIN
                | OP_IN_BOUNDS_PTR_ACCESS_CHAIN
                | OP_ARRAY_LENGTH
                | OP_COPY_OBJECT => &[2],
                OP_STORE | OP_ATOMIC_STORE => &[0],
                OP_COPY_MEMORY | OP_COPY_MEMORY_SIZED => &[0, 1],
                OP_ATOMIC_LOAD..=OP_ATOMIC_XOR => &[2],
                _ => &[],
            };
            let used = uses.entry(f).or_default();
            used.extend(pointers.iter().filter_map(|&i| op(i)));
            if opcode == OP_FUNCTION_CALL && ops.len() >= 3 {
                calls.entry(f).or_default().push(ops[2]);
                used.extend(&ops[3..]);
            }
        }
        at += count;
    }

    // A WorkgroupSize built-in overrides every entry point's LocalSize.
    let builtin_size = decorations
        .iter()
        .find(|(_, d)| d.contains(&(DECORATION_BUILTIN, BUILTIN_WORKGROUP_SIZE)))
        .map(|(id, _)| {
            let parts = composites.get(id).ok_or("the WorkgroupSize built-in is not a constant composite")?;
            match parts[..] {
                [x, y, z] => match (constants.get(&x), constants.get(&y), constants.get(&z)) {
                    (Some(&x), Some(&y), Some(&z)) => Ok([x as u32, y as u32, z as u32]),
                    _ => Err("the WorkgroupSize built-in has a non-constant part"),
                },
                _ => Err("the WorkgroupSize built-in does not have 3 parts"),
            }
        })
        .transpose()?;
    let decoration =
        |id: u32, kind: u32| decorations.get(&id).and_then(|d| d.iter().find(|d| d.0 == kind)).map(|d| d.1);
    let has = |id: u32, kind: u32| decorations.get(&id).is_some_and(|d| d.iter().any(|d| d.0 == kind));
    let types = Types { types: &types, constants: &constants, offsets: &offsets, decoration: &decoration };

    let mut entries = HashMap::new();
    for (id, name) in entry_ids {
        // Every function the entry point reaches, and the global variables they use.
        let mut seen = HashSet::from([id]);
        let mut todo = vec![id];
        let mut used = HashSet::new();
        while let Some(f) = todo.pop() {
            used.extend(uses.get(&f).into_iter().flatten().copied());
            for &callee in calls.get(&f).into_iter().flatten() {
                if seen.insert(callee) {
                    todo.push(callee);
                }
            }
        }
        let mut buffers: Vec<BufferVar> = used
            .iter()
            .filter_map(|var| {
                let &(class, pointer) = variables.get(var)?;
                let pointee = match types.types.get(&pointer) {
                    Some(Type::Pointer(t)) => *t,
                    _ => return None,
                };
                let storage = match class {
                    STORAGE_BUFFER => true,
                    STORAGE_UNIFORM => {
                        has(pointee, DECORATION_BUFFER_BLOCK) || !has(pointee, DECORATION_BLOCK)
                    }
                    _ => return None,
                };
                Some(BufferVar {
                    set: decoration(*var, DECORATION_DESCRIPTOR_SET).unwrap_or(0),
                    binding: decoration(*var, DECORATION_BINDING)?,
                    storage,
                    bytes: types.size(pointee, 0),
                })
            })
            .collect();
        buffers.sort();
        let shared_bytes = used
            .iter()
            .filter_map(|var| match variables.get(var) {
                Some(&(STORAGE_WORKGROUP, pointer)) => Some(pointer),
                _ => None,
            })
            .try_fold(0u64, |total, pointer| match types.types.get(&pointer) {
                Some(Type::Pointer(t)) => total.checked_add(types.size(*t, 0)?),
                _ => None,
            });
        let local_size = builtin_size.or_else(|| sizes.get(&id).copied().flatten());
        if entries.insert(name.clone(), EntryInfo { local_size, buffers, shared_bytes }).is_some() {
            return Err(format!("two GLCompute entry points are named {name:?}"));
        }
    }
    Ok(ModuleInfo { version, capabilities, entries })
}

/// Sizes of declared types, as laid out by their `Offset` and `ArrayStride` decorations.
struct Types<'a> {
    types: &'a HashMap<u32, Type>,
    constants: &'a HashMap<u32, u64>,
    offsets: &'a HashMap<(u32, u32), u64>,
    decoration: &'a dyn Fn(u32, u32) -> Option<u32>,
}

impl Types<'_> {
    /// Bytes spanned by type `id`; `None` when unknown (or nested absurdly deep).
    fn size(&self, id: u32, depth: u32) -> Option<u64> {
        if depth > 32 {
            return None;
        }
        match self.types.get(&id)? {
            Type::Scalar(bytes) => Some(*bytes),
            Type::Vector(elem, n) => self.size(*elem, depth + 1)?.checked_mul(*n),
            Type::Array(elem, length) => {
                let length = *self.constants.get(length)?;
                let stride = match (self.decoration)(id, DECORATION_ARRAY_STRIDE) {
                    Some(stride) => u64::from(stride),
                    None => self.size(*elem, depth + 1)?,
                };
                length.checked_mul(stride)
            }
            Type::RuntimeArray => Some(0),
            Type::Struct(members) => members.iter().enumerate().try_fold(0u64, |end, (i, &member)| {
                let offset = *self.offsets.get(&(id, i as u32))?;
                Some(end.max(offset.checked_add(self.size(member, depth + 1)?)?))
            }),
            Type::Pointer(_) => None,
        }
    }
}

/// A nul-terminated UTF-8 string packed four bytes a word, low byte first.
fn literal_string(words: &[u32]) -> Result<String, String> {
    let mut bytes = Vec::new();
    for word in words {
        for byte in word.to_le_bytes() {
            if byte == 0 {
                return String::from_utf8(bytes).map_err(|_| "an entry point name is not UTF-8".to_string());
            }
            bytes.push(byte);
        }
    }
    Err("an entry point name is not nul-terminated".to_string())
}

/// The name of a SPIR-V capability number, for the ones a Kiln kernel may declare.
pub(crate) fn capability_name(number: u32) -> Option<&'static str> {
    Some(match number {
        0 => "Matrix",
        1 => "Shader",
        9 => "Float16",
        10 => "Float64",
        11 => "Int64",
        22 => "Int16",
        39 => "Int8",
        61 => "GroupNonUniform",
        62 => "GroupNonUniformVote",
        63 => "GroupNonUniformArithmetic",
        64 => "GroupNonUniformBallot",
        65 => "GroupNonUniformShuffle",
        4433 => "StorageBuffer16BitAccess",
        4448 => "StorageBuffer8BitAccess",
        _ => return None,
    })
}

/// Splits `kernels.spv` bytes into words; the caller has checked the length is a multiple of 4.
pub(crate) fn words(bytes: &[u8]) -> Vec<u32> {
    bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn string_words(s: &str) -> Vec<u32> {
        let mut bytes = s.as_bytes().to_vec();
        bytes.push(0);
        while !bytes.len().is_multiple_of(4) {
            bytes.push(0);
        }
        words(&bytes)
    }

    fn module(body: &[Vec<u32>]) -> Vec<u32> {
        let mut w = vec![MAGIC, 0x0001_0300, 0, 10, 0];
        for inst in body {
            w.push(((inst.len() as u32) << 16) | inst[0]);
            w.extend(&inst[1..]);
        }
        w
    }

    #[test]
    fn reads_entries_sizes_and_capabilities() {
        let mut entry = vec![OP_ENTRY_POINT, EXECUTION_MODEL_GLCOMPUTE, 4];
        entry.extend(string_words("main_kernel"));
        let w = module(&[
            vec![OP_CAPABILITY, 1],
            vec![OP_CAPABILITY, 11],
            entry,
            vec![OP_EXECUTION_MODE, 4, MODE_LOCAL_SIZE, 64, 2, 1],
        ]);
        let info = parse(&w).unwrap();
        assert_eq!(info.version, (1, 3));
        assert_eq!(info.capabilities, vec![1, 11]);
        let entry = &info.entries["main_kernel"];
        assert_eq!(entry.local_size, Some([64, 2, 1]));
        assert!(entry.buffers.is_empty());
        assert_eq!(entry.shared_bytes, Some(0));
        assert_eq!(capability_name(11), Some("Int64"));
        assert_eq!(capability_name(5345), None);
    }

    #[test]
    fn workgroup_size_builtin_and_buffer_sizes() {
        let mut entry = vec![OP_ENTRY_POINT, EXECUTION_MODEL_GLCOMPUTE, 4];
        entry.extend(string_words("k"));
        // %20 = u32, %21 = 16, %22 = f32[16] (stride 4), %23 = struct { pad @0, f32[16] @16 },
        // %24 = pointer, %25 = the variable at set 0, binding 3; %30 = (8, 2, 1) as WorkgroupSize.
        let w = module(&[
            entry,
            vec![OP_EXECUTION_MODE, 4, MODE_LOCAL_SIZE, 64, 1, 1],
            vec![OP_DECORATE, 22, DECORATION_ARRAY_STRIDE, 4],
            vec![OP_MEMBER_DECORATE, 23, 0, DECORATION_OFFSET, 0],
            vec![OP_MEMBER_DECORATE, 23, 1, DECORATION_OFFSET, 16],
            vec![OP_DECORATE, 23, DECORATION_BLOCK],
            vec![OP_DECORATE, 25, DECORATION_DESCRIPTOR_SET, 0],
            vec![OP_DECORATE, 25, DECORATION_BINDING, 3],
            vec![OP_DECORATE, 30, DECORATION_BUILTIN, BUILTIN_WORKGROUP_SIZE],
            vec![OP_TYPE_INT, 20, 32, 0],
            vec![OP_CONSTANT, 20, 21, 16],
            vec![OP_CONSTANT, 20, 26, 8],
            vec![OP_CONSTANT, 20, 27, 2],
            vec![OP_CONSTANT, 20, 28, 1],
            vec![OP_CONSTANT_COMPOSITE, 29, 30, 26, 27, 28],
            vec![OP_TYPE_ARRAY, 22, 20, 21],
            vec![OP_TYPE_STRUCT, 23, 20, 22],
            vec![OP_TYPE_POINTER, 24, STORAGE_BUFFER, 23],
            vec![OP_VARIABLE, 24, 25, STORAGE_BUFFER],
            vec![OP_FUNCTION, 1, 4, 0, 3],
            vec![OP_ACCESS_CHAIN, 31, 32, 25, 21],
            vec![OP_FUNCTION_END],
        ]);
        let info = parse(&w).unwrap();
        let entry = &info.entries["k"];
        assert_eq!(entry.local_size, Some([8, 2, 1]));
        assert_eq!(entry.buffers, vec![BufferVar { set: 0, binding: 3, storage: true, bytes: Some(80) }]);
        assert_eq!(entry.shared_bytes, Some(0));
    }

    #[test]
    fn refuses_malformed_modules() {
        assert!(parse(&[MAGIC, 0, 0]).unwrap_err().contains("shorter than a SPIR-V header"));
        assert!(parse(&[0x1234, 0, 0, 0, 0]).unwrap_err().contains("not the SPIR-V magic number"));
        let mut w = module(&[vec![OP_CAPABILITY, 1]]);
        w.push(9 << 16 | OP_CAPABILITY);
        assert!(parse(&w).unwrap_err().contains("past the module's end"), "{w:?}");
        let mut w = module(&[]);
        w.push(0);
        assert!(parse(&w).unwrap_err().contains("word count 0"));
        let w = module(&[vec![OP_ENTRY_POINT, EXECUTION_MODEL_GLCOMPUTE, 4, u32::from_le_bytes(*b"abcd")]]);
        assert!(parse(&w).unwrap_err().contains("not nul-terminated"));
    }
}
