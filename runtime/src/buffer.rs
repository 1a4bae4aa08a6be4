//! `AlignedBuf`: a zeroed, 64-byte aligned heap buffer. Kernels may use aligned vector loads on
//! the arena, outputs and copied inputs, and a `Vec<u8>` only promises 1-byte alignment.

use std::alloc::{self, Layout};
use std::ptr::NonNull;

use crate::error::RuntimeError;

/// The alignment of the arena and of every buffer the runtime allocates.
pub const ALIGN: usize = 64;

/// A zero-initialised byte buffer whose start is [`ALIGN`]-byte aligned.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>; shared references only
// hand out `&[u8]`, so sending or sharing it across threads is as safe as for Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: see `Send` above.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes; `what` names it in the error if memory runs out.
    pub fn zeroed(len: u64, what: &str) -> Result<AlignedBuf, RuntimeError> {
        let fail = || RuntimeError::Alloc { what: what.to_string(), bytes: len };
        let len_usize = usize::try_from(len).map_err(|_| fail())?;
        if len_usize == 0 {
            // A dangling pointer with the right alignment: never read or written through.
            let ptr = NonNull::new(ALIGN as *mut u8).ok_or_else(fail)?;
            return Ok(AlignedBuf { ptr, len: 0 });
        }
        let layout = Layout::from_size_align(len_usize, ALIGN).map_err(|_| fail())?;
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).ok_or_else(fail)?;
        Ok(AlignedBuf { ptr, len: len_usize })
    }

    /// An aligned copy of `bytes`.
    pub fn copy_of(bytes: &[u8], what: &str) -> Result<AlignedBuf, RuntimeError> {
        let mut buf = AlignedBuf::zeroed(bytes.len() as u64, what)?;
        buf.as_mut_slice().copy_from_slice(bytes);
        Ok(buf)
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len initialised bytes (or dangling and aligned with len 0).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// The start, for kernels to write through.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: allocated in `zeroed` with exactly this layout, which was valid then.
            unsafe { alloc::dealloc(self.ptr.as_ptr(), Layout::from_size_align_unchecked(self.len, ALIGN)) }
        }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

impl Clone for AlignedBuf {
    fn clone(&self) -> AlignedBuf {
        let mut buf = AlignedBuf::zeroed(self.len as u64, "copy").unwrap_or_else(|e| panic!("{e}"));
        buf.as_mut_slice().copy_from_slice(self.as_slice());
        buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_zeroed() {
        for len in [0u64, 1, 63, 64, 1000] {
            let mut buf = AlignedBuf::zeroed(len, "test").unwrap();
            assert_eq!(buf.as_mut_ptr() as usize % ALIGN, 0);
            assert_eq!(buf.as_slice().len() as u64, len);
            assert!(buf.as_slice().iter().all(|&b| b == 0));
        }
        let copy = AlignedBuf::copy_of(&[1, 2, 3], "test").unwrap();
        assert_eq!(copy.clone().as_slice(), &[1, 2, 3]);
    }

    #[test]
    fn impossible_size_is_an_error() {
        let err = AlignedBuf::zeroed(u64::MAX, "arena").unwrap_err();
        assert!(err.to_string().contains("arena"), "{err}");
    }
}
