//! Where kernel entry points come from: `kernels.so` ([`SharedLibrary`]) or a JIT's own
//! [`KernelSource`]. The model owns its source, so the code stays mapped while it can be called.

use std::path::{Path, PathBuf};

use crate::error::RuntimeError;

/// A kernel entry: `bufs` points to the step's argument pointers in order, `syms` to the run's
/// symbol values (one `i64` per symbol of the manifest, in its order; read only by kernels
/// whose extents depend on them); the call computes iterations `[begin, end)` of the kernel's
/// outer parallel loop.
pub type KernelFn = unsafe extern "C" fn(bufs: *const *mut u8, syms: *const i64, begin: i64, end: i64);

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
    /// Declared before `_memory`: unloaded before the file it was loaded from is closed.
    library: libloading::Library,
    path: PathBuf,
    /// The in-memory file [`SharedLibrary::from_bytes`] loaded from, kept open while the
    /// library is loaded so that its `/proc/self/fd/N` name cannot be reused by another load
    /// (the dynamic loader would hand back this library for the same name).
    _memory: Option<std::fs::File>,
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
        Ok(SharedLibrary { library, path, _memory: None })
    }

    /// Loads a shared object from bytes already in memory (and already checked against the
    /// manifest's size and crc32), so the code that runs is exactly the code that was checked:
    /// nothing can replace or truncate the file between the check and the load. On Linux the
    /// bytes go into a sealed anonymous file (`memfd_create`, then `F_SEAL_WRITE|SHRINK|GROW`)
    /// that is loaded as `/proc/self/fd/N` (Linux, the runtime's platform). `origin` names the
    /// bytes in errors (the artifact's `kernels.so`).
    ///
    /// # Safety
    ///
    /// As [`SharedLibrary::open`]: the bytes must be a Kiln `kernels.so`.
    pub unsafe fn from_bytes(bytes: &[u8], origin: &Path) -> Result<SharedLibrary, RuntimeError> {
        let fail = |message: String| RuntimeError::LoadKernels { path: origin.to_path_buf(), message };
        check_elf(bytes).map_err(|problem| fail(format!("not a whole shared object: {problem}")))?;
        let memory = sealed_file(bytes)
            .map_err(|e| fail(format!("cannot hold the checked kernels in memory: {e}")))?;
        let name = PathBuf::from(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&memory)));
        // SAFETY: the caller vouches for the bytes (see above).
        let library = unsafe { libloading::Library::new(&name) }.map_err(|e| fail(e.to_string()))?;
        Ok(SharedLibrary { library, path: origin.to_path_buf(), _memory: Some(memory) })
    }

    /// The file loaded.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The `u64` the library exports as `symbol` (a data symbol), if it exports one.
    pub(crate) fn data_u64(&self, symbol: &str) -> Option<u64> {
        // SAFETY: only the address is taken; the 8 bytes read are the exported object's (the
        // compiler emits it as an i64 constant) and `read_unaligned` needs no alignment.
        unsafe {
            let found = self.library.get::<*const [u8; 8]>(symbol.as_bytes()).ok()?;
            let ptr: *const [u8; 8] = *found;
            (!ptr.is_null()).then(|| u64::from_le_bytes(ptr.read_unaligned()))
        }
    }
}

/// Checks that `bytes` are a 64-bit little-endian ELF file whose program headers and
/// segments all lie inside it. The dynamic loader maps segments without comparing them with
/// the file's size, so a truncated object would fault (SIGBUS) on first touch instead of
/// failing to load.
fn check_elf(bytes: &[u8]) -> Result<(), String> {
    let word = |at: usize, n: usize| -> Option<u64> {
        let b = bytes.get(at..at.checked_add(n)?)?;
        Some(b.iter().rev().fold(0u64, |acc, &x| (acc << 8) | u64::from(x)))
    };
    if bytes.get(..6) != Some(&[0x7f, b'E', b'L', b'F', 2, 1][..]) {
        return Err("it is not a 64-bit little-endian ELF file".into());
    }
    let header = (|| Some((word(32, 8)?, word(54, 2)?, word(56, 2)?)))();
    let (phoff, phentsize, phnum) = header.ok_or("its ELF header is cut short")?;
    if phentsize < 56 {
        return Err(format!("its program headers are {phentsize} bytes (56 expected)"));
    }
    for i in 0..phnum {
        let at =
            usize::try_from(phoff + i * phentsize).map_err(|_| "its program headers lie past the end")?;
        let segment = (|| Some((word(at + 8, 8)?, word(at + 32, 8)?)))();
        let (offset, size) = segment.ok_or(format!("program header {i} lies past the end of the file"))?;
        let end = offset.checked_add(size).ok_or(format!("segment {i} overflows"))?;
        if end > bytes.len() as u64 {
            return Err(format!(
                "segment {i} (bytes {offset}..{end}) extends past the end of the file ({} bytes): it is truncated",
                bytes.len()
            ));
        }
    }
    Ok(())
}

/// An anonymous in-memory file holding `bytes`, sealed against any change.
fn sealed_file(bytes: &[u8]) -> std::io::Result<std::fs::File> {
    use std::io::Write;
    use std::os::fd::FromRawFd;
    let create = |flags: libc::c_uint| {
        // SAFETY: a valid NUL-terminated name and flags; the returned descriptor is checked.
        unsafe { libc::memfd_create(c"kiln-kernels.so".as_ptr(), flags) }
    };
    let flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
    // Ask for an executable memfd explicitly: kernels with `vm.memfd_noexec` set refuse to map
    // code from one created without `MFD_EXEC`; kernels older than 6.3 do not know the flag
    // (EINVAL) and allow execution anyway.
    let mut fd = create(flags | libc::MFD_EXEC);
    if fd < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
        fd = create(flags);
    }
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor this function owns.
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.write_all(bytes)?;
    let seals = libc::F_SEAL_WRITE | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: fcntl on a descriptor we own, with a valid command and argument.
    if unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, seals) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(file)
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
