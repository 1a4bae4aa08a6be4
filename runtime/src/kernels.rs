//! Where kernel entry points come from: `kernels.so` ([`SharedLibrary`]) or a JIT's own
//! [`KernelSource`]. The model owns its source, so the code stays mapped while it can be called.

use std::path::{Path, PathBuf};

use crate::error::RuntimeError;

/// A kernel entry: `bufs` points to the step's argument pointers in order; the call computes
/// iterations `[begin, end)` of the kernel's outer parallel loop.
pub type KernelFn = unsafe extern "C" fn(bufs: *const *mut u8, begin: i64, end: i64);

/// Resolves entry symbols to kernels. A [`crate::Model`] owns its source and calls the
/// functions it returned only while it holds the source, so an implementation keeps the code
/// (a loaded library, a JIT engine) alive for as long as it lives itself.
pub trait KernelSource: Send + Sync {
    /// The kernel exported as `symbol`, or `None` if there is none.
    fn lookup(&self, symbol: &str) -> Option<KernelFn>;
}

/// Kernels from a shared object, loaded once; unloaded when dropped.
#[derive(Debug)]
pub struct SharedLibrary {
    library: libloading::Library,
    path: PathBuf,
}

impl SharedLibrary {
    /// Loads the shared object at `path`.
    ///
    /// # Safety
    ///
    /// Loading runs the object's initialisers, and every symbol looked up is taken to be a
    /// [`KernelFn`]: the file must be a Kiln `kernels.so` (or a library honouring that ABI).
    pub unsafe fn open(path: impl AsRef<Path>) -> Result<SharedLibrary, RuntimeError> {
        let path = path.as_ref();
        // A path without a slash would make the dynamic loader search the system paths.
        let path = std::path::absolute(path).map_err(|e| RuntimeError::io(path, e))?;
        // SAFETY: the caller vouches for the file (see above).
        let library = unsafe { libloading::Library::new(&path) }
            .map_err(|e| RuntimeError::LoadKernels { path: path.clone(), message: e.to_string() })?;
        Ok(SharedLibrary { library, path })
    }

    /// The file loaded.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl KernelSource for SharedLibrary {
    fn lookup(&self, symbol: &str) -> Option<KernelFn> {
        // SAFETY: `open`'s contract makes every exported kernel symbol a KernelFn. The copied
        // function pointer outlives the `Symbol` guard, which is why `Model` keeps this library
        // alive beside the pointers it resolved.
        let found = unsafe { self.library.get::<KernelFn>(symbol.as_bytes()) };
        found.ok().map(|f| *f)
    }
}
