//! Compiled kernels loaded into this process: the quickest way to run generated code in tests
//! and benchmarks without writing an artifact.

use crate::{build, kernel::Kernel, target::Target, CodegenError};

/// A kernel entry as the runtime calls it: buffers, symbol values, begin, end.
pub type EntryFn = unsafe extern "C" fn(*const *mut u8, *const i64, i64, i64);

/// Kernels compiled for the host, linked into a private shared object and loaded.
pub struct KernelLibrary {
    library: libloading::Library,
    // Keeps the shared object's directory alive as long as the library is loaded.
    _dir: tempfile::TempDir,
    /// What was compiled (MLIR, LLVM IR, object), for inspection.
    pub compiled: build::Compiled,
}

impl KernelLibrary {
    /// Compiles `kernels` for `target` (which must run here), links and loads them.
    pub fn build(kernels: &[Kernel], target: &dyn Target) -> Result<KernelLibrary, CodegenError> {
        if !target.runs_here() {
            return Err(CodegenError::Target(format!(
                "target `{}` cannot run on this machine",
                target.name()
            )));
        }
        let compiled = build::compile(kernels, target)?;
        let dir = tempfile::tempdir().map_err(|e| CodegenError::Link(e.to_string()))?;
        let path = dir.path().join("kernels.so");
        build::link_shared(&compiled.object, target, &path)?;
        // SAFETY: the library is our own generated code; its initializers do nothing.
        let library =
            unsafe { libloading::Library::new(&path) }.map_err(|e| CodegenError::Link(e.to_string()))?;
        Ok(KernelLibrary { library, _dir: dir, compiled })
    }

    /// The entry of kernel `symbol`.
    pub fn entry(&self, symbol: &str) -> Result<EntryFn, CodegenError> {
        let name = Kernel::entry(symbol);
        // SAFETY: every entry the build adds has the `EntryFn` signature.
        let f = unsafe { self.library.get::<EntryFn>(name.as_bytes()) }
            .map_err(|_| CodegenError::SymbolNotFound(name.clone()))?;
        Ok(*f)
    }

    /// Runs kernel `symbol` over `[begin, end)` of its range (kernels of static shapes: no
    /// symbol values).
    ///
    /// # Safety
    /// `bufs` must hold one pointer per kernel argument, each to a buffer of the argument's
    /// size, suitably aligned for its element type.
    pub unsafe fn call(
        &self,
        symbol: &str,
        bufs: &[*mut u8],
        begin: usize,
        end: usize,
    ) -> Result<(), CodegenError> {
        self.call_with_symbols(symbol, bufs, &[], begin, end)
    }

    /// [`KernelLibrary::call`] for a kernel over run-time sizes, given the run's symbol values.
    ///
    /// # Safety
    /// As for [`KernelLibrary::call`], with buffers sized for these values, and `syms` holding
    /// every symbol the kernel reads.
    pub unsafe fn call_with_symbols(
        &self,
        symbol: &str,
        bufs: &[*mut u8],
        syms: &[i64],
        begin: usize,
        end: usize,
    ) -> Result<(), CodegenError> {
        let f = self.entry(symbol)?;
        f(bufs.as_ptr(), syms.as_ptr(), begin as i64, end as i64);
        Ok(())
    }
}
