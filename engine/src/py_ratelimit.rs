//! appliance_engine.TokenBuckets: ratelimit::Buckets for Python, with the
//! API of appliance/node/ratelimit.py's TokenBuckets. The worker charges
//! one of these from Python and from the hit path alike.

use std::sync::Arc;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::ratelimit::Buckets;
use crate::store::monotonic;

#[pyclass(module = "appliance_engine", name = "TokenBuckets", frozen)]
pub struct PyTokenBuckets {
    pub inner: Arc<Buckets>,
    /// A clock other than time.monotonic (tests); the hit path reads
    /// CLOCK_MONOTONIC, so buckets with one are never charged there.
    pub clock: Option<PyObject>,
}

#[pymethods]
impl PyTokenBuckets {
    #[new]
    #[pyo3(signature = (rate, burst, *, clock=None, max_clients=100_000))]
    fn new(
        py: Python<'_>,
        rate: f64,
        burst: f64,
        clock: Option<PyObject>,
        max_clients: usize,
    ) -> PyResult<Self> {
        let inner = Buckets::new(rate, burst, max_clients).map_err(PyValueError::new_err)?;
        let monotonic_fn = py.import("time")?.getattr("monotonic")?;
        Ok(PyTokenBuckets {
            inner: Arc::new(inner),
            clock: clock.filter(|c| !c.bind(py).is(&monotonic_fn)),
        })
    }

    /// 0.0 when the call may go ahead, charged `cost` tokens; else the
    /// seconds until it may.
    #[pyo3(signature = (key, cost=1.0))]
    fn take(&self, py: Python<'_>, key: &str, cost: f64) -> PyResult<f64> {
        let now = match &self.clock {
            None => monotonic(),
            Some(clock) => clock.call0(py)?.extract(py)?,
        };
        Ok(self.inner.take(key, cost, now))
    }

    #[getter]
    fn rate(&self) -> f64 {
        self.inner.rate
    }

    #[getter]
    fn burst(&self) -> f64 {
        self.inner.burst
    }

    #[getter]
    fn max_clients(&self) -> usize {
        self.inner.max_clients
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }
}
