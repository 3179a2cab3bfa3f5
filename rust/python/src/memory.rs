//! GuestMemory: anonymous guest memory owned by the core, with the buffer protocol.

use std::ffi::c_int;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use kvmmmu_core::errno::Errno;
use kvmmmu_core::hostmem::HostRegion;
use pyo3::exceptions::{PyBufferError, PyValueError};
use pyo3::prelude::*;

use crate::{os_error, IntoPy};

/// Guest memory: an anonymous MAP_NORESERVE mapping owned by the core.
#[pyclass(module = "kvmmmu._core")]
pub struct GuestMemory {
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
pub struct MemoryPin {
    _region: Arc<HostRegion>,
}

#[pymethods]
impl GuestMemory {
    /// `size` bytes of zeroed memory. `hugepages=True` asks the host for transparent
    /// huge pages (madvise MADV_HUGEPAGE), which is what lets the MMU map 2 MiB guest
    /// pages with 2 MiB SPTEs (KVM's host_pfn_mapping_level).
    #[new]
    #[pyo3(signature = (size, hugepages = false))]
    fn new(size: u64, hugepages: bool) -> PyResult<Self> {
        let region = HostRegion::new(size).py_err()?;
        if hugepages {
            region.set_thp(true).py_err()?;
        }
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

    /// Whether the memory asked for transparent huge pages.
    #[getter]
    fn hugepages(&self) -> PyResult<bool> {
        Ok(self.region()?.thp())
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
            Some(r) if r.thp() => format!(
                "GuestMemory(address={:#x}, size={:#x}, hugepages=True)",
                r.addr(),
                r.size()
            ),
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
