//! Just enough of SPIR-V to check a module against the manifest before the driver sees it: the
//! header, the capabilities it declares, its GLCompute entry points and their `LocalSize`.
//! A driver handed a module that contradicts the manifest may crash; this reader refuses it.

use std::collections::HashMap;

/// The first word of every SPIR-V module.
pub(crate) const MAGIC: u32 = 0x0723_0203;

const OP_CAPABILITY: u32 = 17;
const OP_ENTRY_POINT: u32 = 15;
const OP_EXECUTION_MODE: u32 = 16;
const EXECUTION_MODEL_GLCOMPUTE: u32 = 5;
const MODE_LOCAL_SIZE: u32 = 17;
const MODE_LOCAL_SIZE_ID: u32 = 38;

/// What the runtime needs to know about one module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ModuleInfo {
    /// SPIR-V version as `(major, minor)`.
    pub version: (u32, u32),
    /// Capability numbers of its `OpCapability` instructions.
    pub capabilities: Vec<u32>,
    /// GLCompute entry points by name, with their workgroup size (`None` if the module gives
    /// none as a literal `LocalSize`).
    pub entries: HashMap<String, Option<[u32; 3]>>,
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
    let mut at = 5;
    while at < words.len() {
        let count = (words[at] >> 16) as usize;
        let opcode = words[at] & 0xffff;
        if count == 0 || at + count > words.len() {
            return Err(format!(
                "the instruction at word {at} has word count {count}, past the module's end"
            ));
        }
        let operands = &words[at + 1..at + count];
        match opcode {
            OP_CAPABILITY => capabilities.push(*operands.first().ok_or("OpCapability without operand")?),
            OP_ENTRY_POINT if operands.len() >= 3 && operands[0] == EXECUTION_MODEL_GLCOMPUTE => {
                entry_ids.push((operands[1], literal_string(&operands[2..])?));
            }
            OP_EXECUTION_MODE if operands.len() >= 2 => match operands[1] {
                MODE_LOCAL_SIZE if operands.len() >= 5 => {
                    sizes.insert(operands[0], Some([operands[2], operands[3], operands[4]]));
                }
                MODE_LOCAL_SIZE_ID => {
                    sizes.insert(operands[0], None);
                }
                _ => {}
            },
            _ => {}
        }
        at += count;
    }
    let mut entries = HashMap::new();
    for (id, name) in entry_ids {
        let size = sizes.get(&id).copied().flatten();
        if entries.insert(name.clone(), size).is_some() {
            return Err(format!("two GLCompute entry points are named {name:?}"));
        }
    }
    Ok(ModuleInfo { version, capabilities, entries })
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
        assert_eq!(info.entries.get("main_kernel"), Some(&Some([64, 2, 1])));
        assert_eq!(capability_name(11), Some("Int64"));
        assert_eq!(capability_name(5345), None);
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
