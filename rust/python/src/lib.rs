//! kvmmmu._core: the PyO3 bindings of kvmmmu-core. Types, errors and GIL
//! release only; no MMU logic lives here.

use std::ffi::c_int;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use kvmmmu_core::errno::Errno;
use kvmmmu_core::hostmem::HostRegion;
use kvmmmu_core::kvm::{self, KvmFile};
use kvmmmu_core::paging::{Access, PagingMode, WalkError};
use kvmmmu_core::uaccess::{ProcessVm, UserBuf};
use kvmmmu_core::uapi;
use kvmmmu_core::vcpu::Vcpu;
use numpy::{PyArray1, PyReadonlyArray1};
use pyo3::buffer::PyBuffer;
use pyo3::exceptions::{PyBufferError, PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

/// fcntl.ioctl's copy buffer size for buffer arguments.
const IOCTL_ARG_COPY: usize = 1024;

/// The one place a core errno becomes a Python exception: OSError(errno, strerror),
/// which Python turns into the matching subclass (FileExistsError for EEXIST, ...).
fn os_error(e: Errno) -> PyErr {
    PyOSError::new_err((e.0, e.desc()))
}

trait IntoPy<T> {
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
        let Some(arg) = arg else {
            return py
                .detach(|| self.inner.ioctl(fd, request, 0, &mut ProcessVm))
                .py_err();
        };
        if let Ok(v) = arg.extract::<i64>() {
            return py
                .detach(|| self.inner.ioctl(fd, request, v as u64, &mut ProcessVm))
                .py_err();
        }
        if let Ok(v) = arg.extract::<u64>() {
            return py
                .detach(|| self.inner.ioctl(fd, request, v, &mut ProcessVm))
                .py_err();
        }
        let buf = PyBuffer::<u8>::get(arg)?;
        if !buf.is_c_contiguous() {
            return Err(PyBufferError::new_err("ioctl buffer must be C-contiguous"));
        }
        // As fcntl.ioctl does, the argument is copied into a buffer of at least 1024
        // bytes, so a request whose struct is larger than the Python buffer writes into
        // the copy, never past the end of the caller's object; only the caller's length
        // is copied back.
        let len = buf.len_bytes();
        let mut data = buf.to_vec(py)?;
        data.resize(len.max(IOCTL_ARG_COPY), 0);
        let base = buf.buf_ptr() as u64;
        let r = py.detach(|| {
            let mut ua = UserBuf {
                base,
                data: &mut data,
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

    /// The simulator-only MMU surface of a vCPU descriptor.
    fn vcpu_mmu(&self, fd: i32) -> PyResult<VcpuMmu> {
        match self.inner.file(fd).py_err()? {
            KvmFile::Vcpu(vcpu) => Ok(VcpuMmu { vcpu }),
            _ => Err(os_error(Errno::EINVAL)),
        }
    }
}

/// Simulator-only access to a vCPU's MMU: walks through its current paging state.
#[pyclass(frozen, module = "kvmmmu._core")]
struct VcpuMmu {
    vcpu: Arc<Vcpu>,
}

fn access(write: bool, user: bool, fetch: bool, implicit: bool) -> Access {
    Access {
        write,
        user,
        fetch,
        implicit,
    }
}

#[pymethods]
impl VcpuMmu {
    /// Walk `gva`: (True, gpa, level, page_size, access, pkey, dirty, gptes) or
    /// (False, vector, error_code, address).
    #[pyo3(signature = (gva, write = false, user = false, fetch = false, implicit = false))]
    fn walk<'py>(
        &self,
        py: Python<'py>,
        gva: u64,
        write: bool,
        user: bool,
        fetch: bool,
        implicit: bool,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let r = py
            .detach(|| self.vcpu.walk(gva, access(write, user, fetch, implicit)))
            .py_err()?;
        match r {
            Ok(w) => {
                let gptes: Vec<(u8, u64, u64)> = w.gptes.to_vec();
                (
                    true,
                    w.gpa,
                    w.level,
                    w.page_size,
                    w.access,
                    w.pkey,
                    w.dirty,
                    gptes,
                )
                    .into_pyobject(py)
            }
            Err(e) => {
                let address = match e {
                    WalkError::PageFault { address, .. } => address,
                    WalkError::GeneralProtection { .. } => gva,
                };
                (false, e.vector(), e.error_code(), address).into_pyobject(py)
            }
        }
    }

    /// Walk every gva of a uint64 array: (gpas, vectors, error_codes) arrays; a fault
    /// gives gpa 2**64-1 and its vector and error code, a success vector 0.
    #[pyo3(signature = (gvas, write = false, user = false, fetch = false, implicit = false))]
    #[allow(clippy::type_complexity)]
    fn walk_many<'py>(
        &self,
        py: Python<'py>,
        gvas: PyReadonlyArray1<'py, u64>,
        write: bool,
        user: bool,
        fetch: bool,
        implicit: bool,
    ) -> PyResult<(
        Bound<'py, PyArray1<u64>>,
        Bound<'py, PyArray1<u8>>,
        Bound<'py, PyArray1<u32>>,
    )> {
        let input: Vec<u64> = match gvas.as_slice() {
            Ok(s) => s.to_vec(),
            Err(_) => gvas.as_array().iter().copied().collect(),
        };
        let n = input.len();
        let (mut g, mut v, mut e) = (vec![0u64; n], vec![0u8; n], vec![0u32; n]);
        py.detach(|| {
            self.vcpu.walk_many(
                &input,
                access(write, user, fetch, implicit),
                &mut g,
                &mut v,
                &mut e,
            )
        })
        .py_err()?;
        Ok((
            PyArray1::from_vec(py, g),
            PyArray1::from_vec(py, v),
            PyArray1::from_vec(py, e),
        ))
    }

    /// MOV to CR0/CR3/CR4 or WRMSR EFER as the guest does it: None, or the fault
    /// (vector, error_code) it raises (#GP).
    fn write_control(&self, reg: &str, value: u64) -> PyResult<Option<(u8, u32)>> {
        use kvmmmu_core::vcpu::guest_ops::ControlReg;
        let reg = match reg {
            "cr0" => ControlReg::Cr0,
            "cr3" => ControlReg::Cr3,
            "cr4" => ControlReg::Cr4,
            "efer" => ControlReg::Efer,
            _ => {
                return Err(PyValueError::new_err(format!(
                    "no control register {reg:?}"
                )))
            }
        };
        let r = self.vcpu.guest_write_control(reg, value).py_err()?;
        Ok(r.err().map(|e| (e.vector(), e.error_code())))
    }

    /// PKRU, the protection-key rights register the walker checks.
    #[getter]
    fn get_pkru(&self) -> u32 {
        self.vcpu.state().pkru
    }

    #[setter]
    fn set_pkru(&self, value: u32) {
        self.vcpu.state().pkru = value;
    }

    /// The PAE PDPTE registers.
    #[getter]
    fn pdptrs(&self) -> [u64; 4] {
        self.vcpu.state().pdptrs
    }

    /// The paging mode: "none", "32-bit", "pae", "4-level" or "5-level".
    #[getter]
    fn mode(&self) -> &'static str {
        match self.vcpu.state().walk_ctx().mode() {
            PagingMode::None => "none",
            PagingMode::Bits32 => "32-bit",
            PagingMode::Pae => "pae",
            PagingMode::Long4 => "4-level",
            PagingMode::Long5 => "5-level",
        }
    }
}

/// Guest memory: an anonymous MAP_NORESERVE mapping owned by the core.
#[pyclass(module = "kvmmmu._core")]
struct GuestMemory {
    region: Option<Arc<HostRegion>>,
    exports: AtomicUsize,
}

impl GuestMemory {
    fn region(&self) -> PyResult<&Arc<HostRegion>> {
        self.region
            .as_ref()
            .ok_or_else(|| PyValueError::new_err("GuestMemory is closed"))
    }
}

/// Holds guest memory alive while a memory slot (on either backend) uses it.
#[pyclass(frozen, module = "kvmmmu._core")]
struct MemoryPin {
    _region: Arc<HostRegion>,
}

#[pymethods]
impl GuestMemory {
    #[new]
    fn new(size: u64) -> PyResult<Self> {
        let region = HostRegion::new(size).py_err()?;
        Ok(GuestMemory {
            region: Some(region),
            exports: AtomicUsize::new(0),
        })
    }

    /// The host virtual address of the first byte (a KVM `userspace_addr`).
    #[getter]
    fn address(&self) -> PyResult<u64> {
        Ok(self.region()?.addr())
    }

    #[getter]
    fn size(&self) -> PyResult<usize> {
        Ok(self.region()?.size())
    }

    #[getter]
    fn closed(&self) -> bool {
        self.region.is_none()
    }

    fn __len__(&self) -> PyResult<usize> {
        self.size()
    }

    /// Copy `length` bytes at `offset` out of guest memory.
    fn read(&self, offset: usize, length: usize) -> PyResult<Vec<u8>> {
        let mut v = vec![0u8; length];
        self.region()?
            .read(offset, &mut v)
            .map_err(|_| PyValueError::new_err("out of range"))?;
        Ok(v)
    }

    /// Copy bytes into guest memory at `offset`.
    fn write(&self, offset: usize, data: &[u8]) -> PyResult<()> {
        self.region()?
            .write(offset, data)
            .map_err(|_| PyValueError::new_err("out of range"))
    }

    /// Pin the memory for a memory slot: it cannot be closed while a pin lives.
    fn _pin(&self) -> PyResult<MemoryPin> {
        Ok(MemoryPin {
            _region: self.region()?.clone(),
        })
    }

    /// Unmap the memory. Refused while buffer views exist (BufferError) or while a
    /// memory slot or pin still uses it (OSError EBUSY).
    fn close(&mut self) -> PyResult<()> {
        if self.exports.load(Ordering::Acquire) > 0 {
            return Err(PyBufferError::new_err(
                "GuestMemory has exported buffer views",
            ));
        }
        if let Some(r) = &self.region {
            if Arc::strong_count(r) > 1 {
                return Err(os_error(Errno::EBUSY));
            }
        }
        self.region = None;
        Ok(())
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __exit__(
        &mut self,
        _t: Option<&Bound<'_, PyAny>>,
        _v: Option<&Bound<'_, PyAny>>,
        _tb: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        self.close()
    }

    fn __repr__(&self) -> String {
        match &self.region {
            Some(r) => format!("GuestMemory(address={:#x}, size={:#x})", r.addr(), r.size()),
            None => "GuestMemory(closed)".to_string(),
        }
    }

    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut pyo3::ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        let (ptr, len) = {
            let me = slf.borrow();
            let r = me.region()?;
            me.exports.fetch_add(1, Ordering::AcqRel);
            (r.as_ptr(), r.size())
        };
        let len = isize::try_from(len).map_err(|_| PyBufferError::new_err("too large"))?;
        // SAFETY: `view` is the Py_buffer Python passed to bf_getbuffer; ptr/len
        // describe the live mapping, which close() refuses to unmap while
        // `exports` > 0 (decremented in __releasebuffer__). The view holds a
        // strong reference to `slf`.
        let rc =
            unsafe { pyo3::ffi::PyBuffer_FillInfo(view, slf.as_ptr(), ptr.cast(), len, 0, flags) };
        if rc != 0 {
            slf.borrow().exports.fetch_sub(1, Ordering::AcqRel);
            return Err(PyErr::fetch(slf.py()));
        }
        Ok(())
    }

    unsafe fn __releasebuffer__(&self, _view: *mut pyo3::ffi::Py_buffer) {
        self.exports.fetch_sub(1, Ordering::AcqRel);
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

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<SimKvm>()?;
    m.add_class::<GuestMemory>()?;
    m.add_class::<MemoryPin>()?;
    m.add_class::<VcpuMmu>()?;
    m.add_function(wrap_pyfunction!(struct_sizes, m)?)?;
    m.add_function(wrap_pyfunction!(ioctl_numbers, m)?)?;
    m.add_function(wrap_pyfunction!(supported_capabilities, m)?)?;
    m.add("VCPU_MMAP_SIZE", kvmmmu_core::vcpu::VCPU_MMAP_SIZE)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
