//! kvmmmu._core: the PyO3 bindings of kvmmmu-core. Types, errors and GIL
//! release only; no MMU logic lives here.

mod memory;
mod vcpu_mmu;
mod vm_mmu;

use kvmmmu_core::errno::Errno;
use kvmmmu_core::kvm::{self, KvmFile};
use kvmmmu_core::uaccess::{ProcessVm, UserBuf};
use kvmmmu_core::uapi;
use pyo3::buffer::PyBuffer;
use pyo3::exceptions::{PyBufferError, PyOSError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyInt};

use memory::{GuestMemory, MemoryPin};
use vcpu_mmu::VcpuMmu;
use vm_mmu::VmMmu;

/// fcntl.ioctl's copy buffer size for buffer arguments.
const IOCTL_ARG_COPY: usize = 1024;

/// The one place a core errno becomes a Python exception: OSError(errno, strerror),
/// which Python turns into the matching subclass (FileExistsError for EEXIST, ...).
pub(crate) fn os_error(e: Errno) -> PyErr {
    PyOSError::new_err((e.0, e.desc()))
}

pub(crate) trait IntoPy<T> {
    fn py_err(self) -> PyResult<T>;
}
impl<T> IntoPy<T> for Result<T, Errno> {
    fn py_err(self) -> PyResult<T> {
        self.map_err(os_error)
    }
}

/// The software /dev/kvm: `open`, `ioctl`, `close` on simulated file descriptors.
#[pyclass(frozen, module = "kvmmmu._core")]
struct SimKvm {
    inner: kvm::SimKvm,
}

#[pymethods]
impl SimKvm {
    #[new]
    fn new() -> Self {
        SimKvm {
            inner: kvm::SimKvm::new(),
        }
    }

    /// open("/dev/kvm"): a new system file descriptor.
    fn open(&self) -> PyResult<i32> {
        self.inner.open().py_err()
    }

    /// close(fd) for a simulated descriptor.
    fn close(&self, fd: i32) -> PyResult<()> {
        self.inner.close(fd).py_err()
    }

    /// ioctl(fd, request, arg) with fcntl.ioctl's argument rules: an int is passed
    /// as is (a value or a pointer); a buffer is passed by address and written back.
    #[pyo3(signature = (fd, request, arg = None))]
    fn ioctl(
        &self,
        py: Python<'_>,
        fd: i32,
        request: u64,
        arg: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<i64> {
        // An int is tested for first: a failed extract builds an exception, which
        // costs more than the rest of a short ioctl.
        let Some(arg) = arg.filter(|a| !a.is_instance_of::<PyInt>()) else {
            let v = match arg {
                None => 0,
                Some(a) => match a.extract::<i64>() {
                    Ok(v) => v as u64,
                    Err(_) => a.extract::<u64>()?,
                },
            };
            let r = py.detach(|| self.inner.ioctl(fd, request, v, &mut ProcessVm));
            if request == uapi::KVM_RUN {
                // A Python signal handler that raised while KVM_RUN ran (Ctrl-C's
                // KeyboardInterrupt) stopped it with EINTR: raise the handler's error.
                if let Some(e) = PyErr::take(py) {
                    return Err(e);
                }
            }
            return r.py_err();
        };
        let buf = PyBuffer::<u8>::get(arg)?;
        if !buf.is_c_contiguous() {
            return Err(PyBufferError::new_err("ioctl buffer must be C-contiguous"));
        }
        // As fcntl.ioctl does, the argument is copied into a buffer of at least 1024
        // bytes, so a request whose struct is larger than the Python buffer writes into
        // the copy, never past the end of the caller's object; only the caller's length
        // is copied back. Up to 1024 bytes the copy lives on the stack.
        let len = buf.len_bytes();
        let mut small = [0u8; IOCTL_ARG_COPY];
        let mut large;
        let data: &mut [u8] = if len <= IOCTL_ARG_COPY {
            buf.copy_to_slice(py, &mut small[..len])?;
            &mut small
        } else {
            large = buf.to_vec(py)?;
            &mut large
        };
        let base = buf.buf_ptr() as u64;
        let r = py.detach(|| {
            let mut ua = UserBuf {
                base,
                data: &mut *data,
            };
            self.inner.ioctl(fd, request, base, &mut ua)
        });
        if !buf.readonly() {
            buf.copy_from_slice(py, &data[..len])?;
        }
        r.py_err()
    }

    /// What a simulated descriptor refers to: "system", "vm", "vcpu" or "stats".
    fn kind(&self, fd: i32) -> PyResult<&'static str> {
        Ok(match self.inner.file(fd).py_err()? {
            KvmFile::System => "system",
            KvmFile::Vm(_) => "vm",
            KvmFile::Vcpu(_) => "vcpu",
            KvmFile::Stats => "stats",
        })
    }

    /// Open simulated descriptors.
    fn fds(&self) -> Vec<i32> {
        self.inner.fds()
    }

    /// Vcpu::kick on a vCPU descriptor: a running or about-to-run KVM_RUN returns
    /// EINTR, as the signal a VMM sends to the vCPU thread does on the device.
    fn kick(&self, fd: i32) -> PyResult<()> {
        match self.inner.file(fd).py_err()? {
            KvmFile::Vcpu(vcpu) => {
                vcpu.kick();
                Ok(())
            }
            _ => Err(os_error(Errno::EINVAL)),
        }
    }

    /// The simulator-only MMU surface of a vCPU descriptor.
    fn vcpu_mmu(&self, fd: i32) -> PyResult<VcpuMmu> {
        match self.inner.file(fd).py_err()? {
            KvmFile::Vcpu(vcpu) => Ok(VcpuMmu { vcpu }),
            _ => Err(os_error(Errno::EINVAL)),
        }
    }

    /// The simulator-only view of a VM descriptor's shadow MMU.
    fn vm_mmu(&self, fd: i32) -> PyResult<VmMmu> {
        match self.inner.file(fd).py_err()? {
            KvmFile::Vm(vm) => Ok(VmMmu { vm }),
            _ => Err(os_error(Errno::EINVAL)),
        }
    }
}

/// Struct sizes by C name, from the kvm-bindings types.
#[pyfunction]
fn struct_sizes(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    for (k, v) in uapi::STRUCT_SIZES {
        d.set_item(k, v)?;
    }
    Ok(d)
}

/// Request numbers by kernel name.
#[pyfunction]
fn ioctl_numbers(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    for (k, v) in uapi::IOCTL_NUMBERS {
        d.set_item(k, v)?;
    }
    Ok(d)
}

/// The simulator's non-zero KVM_CHECK_EXTENSION answers: {cap: value}.
#[pyfunction]
fn supported_capabilities(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    for (k, v) in kvm::supported_capabilities() {
        d.set_item(k, v)?;
    }
    Ok(d)
}

/// enable_mmio_caching, KVM's module parameter (process-wide; on by default): whether
/// the shadow MMU caches MMIO translations in MMIO SPTEs.
#[pyfunction]
fn set_mmio_caching(on: bool) {
    kvmmmu_core::mmu::fault::set_mmio_caching(on);
}

/// The current enable_mmio_caching.
#[pyfunction]
fn mmio_caching() -> bool {
    kvmmmu_core::mmu::fault::slots_mmio_caching()
}

/// The simulator's KVM_RUN asks this between instruction batches: on the main thread,
/// at most every 20 ms, run Python's pending signal handlers, as a signal interrupts a
/// device KVM_RUN. A handler that raised leaves its error set for the ioctl wrapper;
/// other threads never take the GIL here.
fn python_signal_pending() -> bool {
    use std::cell::Cell;
    use std::time::{Duration, Instant};
    thread_local! {
        static LAST: Cell<Option<Instant>> = const { Cell::new(None) };
    }
    if MAIN_THREAD.get() != Some(&std::thread::current().id()) {
        return false;
    }
    let now = Instant::now();
    if LAST
        .with(|l| l.get())
        .is_some_and(|t| now.duration_since(t) < Duration::from_millis(20))
    {
        return false;
    }
    LAST.with(|l| l.set(Some(now)));
    Python::attach(|py| match py.check_signals() {
        Ok(()) => false,
        Err(e) => {
            e.restore(py);
            true
        }
    })
}

static MAIN_THREAD: std::sync::OnceLock<std::thread::ThreadId> = std::sync::OnceLock::new();

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // Python runs signal handlers on its main thread; the module is imported there
    // (if a program imports it first from another thread, no check is installed).
    let threading = m.py().import("threading")?;
    let main = threading.call_method0("main_thread")?;
    if main.is(&threading.call_method0("current_thread")?) {
        let _ = MAIN_THREAD.set(std::thread::current().id());
        kvmmmu_core::vcpu::run::set_signal_check(python_signal_pending);
    }
    m.add_class::<SimKvm>()?;
    m.add_class::<GuestMemory>()?;
    m.add_class::<MemoryPin>()?;
    m.add_class::<VcpuMmu>()?;
    m.add_class::<VmMmu>()?;
    m.add_function(wrap_pyfunction!(vm_mmu::decode_role, m)?)?;
    m.add_function(wrap_pyfunction!(set_mmio_caching, m)?)?;
    m.add_function(wrap_pyfunction!(mmio_caching, m)?)?;
    m.add_function(wrap_pyfunction!(struct_sizes, m)?)?;
    m.add_function(wrap_pyfunction!(ioctl_numbers, m)?)?;
    m.add_function(wrap_pyfunction!(supported_capabilities, m)?)?;
    m.add("VCPU_MMAP_SIZE", kvmmmu_core::vcpu::VCPU_MMAP_SIZE)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
