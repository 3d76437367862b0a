//! Python's view of the engine's stores: `Store` has the API of
//! `appliance.cache.store.Store` (the same unit tests run on both), and
//! `HitGroup` is what Python takes back from hits the server answered.

use std::any::Any;
use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyString};

use crate::hits;
use crate::store::{self, monotonic, Key, Policy};

/// A key's bytes: UTF-8, with lone surrogates kept (surrogatepass), as
/// the Python store counts them.
fn key_bytes<'a>(key: &'a Bound<'_, PyAny>) -> PyResult<Cow<'a, [u8]>> {
    let s = key.downcast::<PyString>()?;
    match s.to_str() {
        Ok(text) => Ok(Cow::Borrowed(text.as_bytes())),
        Err(_) => {
            let encoded = s.call_method1("encode", ("utf-8", "surrogatepass"))?;
            Ok(Cow::Owned(
                encoded.downcast::<PyBytes>()?.as_bytes().to_vec(),
            ))
        }
    }
}

pub fn key_object<'py>(py: Python<'py>, key: &[u8]) -> PyResult<Bound<'py, PyAny>> {
    match std::str::from_utf8(key) {
        Ok(text) => Ok(PyString::new(py, text).into_any()),
        Err(_) => PyBytes::new(py, key).call_method1("decode", ("utf-8", "surrogatepass")),
    }
}

/// A Python bytes object's buffer as `Bytes`, without a copy: immutable,
/// and alive while this holds the object (dropped off the GIL, PyO3
/// defers the decref to the next holder of the GIL).
struct Held {
    _object: Arc<dyn Any + Send + Sync>,
    ptr: *const u8,
    len: usize,
}

// SAFETY: a bytes object's buffer never changes or moves while it lives,
// and `_object` keeps it alive.
unsafe impl Send for Held {}
unsafe impl Sync for Held {}

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: see Send/Sync above.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

/// (bytes sharing `data`'s buffer, the handle that gives `data` back);
/// anything but an exact bytes object is copied into one first.
fn hold(data: &Bound<'_, PyAny>) -> PyResult<(Bytes, Arc<dyn Any + Send + Sync>)> {
    let object: Bound<'_, PyBytes> = match data.downcast_exact::<PyBytes>() {
        Ok(b) => b.clone(),
        Err(_) => {
            let buffer = pyo3::buffer::PyBuffer::<u8>::get(data)?;
            PyBytes::new(data.py(), &buffer.to_vec(data.py())?)
        }
    };
    let view = object.as_bytes();
    let (ptr, len) = (view.as_ptr(), view.len());
    let handle: Arc<dyn Any + Send + Sync> = Arc::new(object.unbind());
    let bytes = Bytes::from_owner(Held {
        _object: handle.clone(),
        ptr,
        len,
    });
    Ok((bytes, handle))
}

#[pyclass(module = "appliance_engine", name = "Store")]
pub struct PyStore {
    pub inner: Arc<Mutex<store::Store>>,
    /// A clock other than time.monotonic (tests); the server's hit path
    /// reads CLOCK_MONOTONIC, so a store with one is never served from.
    pub clock: Option<PyObject>,
    entry: PyObject,
    #[pyo3(get)]
    policy: String,
    #[pyo3(get)]
    max_bytes: usize,
}

impl PyStore {
    fn now(&self, py: Python<'_>) -> PyResult<f64> {
        match &self.clock {
            None => Ok(monotonic()),
            Some(clock) => clock.call0(py)?.extract(py),
        }
    }

    /// The Entry Python sees, on the very bytes object it stored.
    fn entry_object(&self, py: Python<'_>, e: &store::Entry) -> PyResult<PyObject> {
        let data = match e
            .handle
            .as_ref()
            .and_then(|h| h.downcast_ref::<Py<PyBytes>>())
        {
            Some(object) => object.clone_ref(py).into_any(),
            None => PyBytes::new(py, &e.data).into_any().unbind(),
        };
        self.entry.call1(py, (data, e.expires, e.size, e.offset))
    }
}

#[pymethods]
impl PyStore {
    /// `entry`: the class of what get() returns, called as
    /// entry(data, expires, size, offset).
    #[new]
    #[pyo3(signature = (policy, max_bytes, clock=None, *, entry))]
    fn new(
        py: Python<'_>,
        policy: &str,
        max_bytes: i64,
        clock: Option<PyObject>,
        entry: PyObject,
    ) -> PyResult<Self> {
        let Some(parsed) = Policy::parse(policy) else {
            return Err(PyValueError::new_err(format!(
                "unknown eviction policy {policy:?}; expected one of lru, lfu, fifo"
            )));
        };
        if max_bytes < 0 {
            return Err(PyValueError::new_err("max_bytes must be >= 0"));
        }
        let monotonic_fn = py.import("time")?.getattr("monotonic")?;
        let clock = clock.filter(|c| !c.bind(py).is(&monotonic_fn));
        Ok(PyStore {
            inner: Arc::new(Mutex::new(store::Store::new(parsed, max_bytes as usize))),
            clock,
            entry,
            policy: policy.to_string(),
            max_bytes: max_bytes as usize,
        })
    }

    fn get(&self, py: Python<'_>, key: &Bound<'_, PyAny>) -> PyResult<Option<PyObject>> {
        let key = key_bytes(key)?;
        let now = self.now(py)?;
        let found = self.inner.lock().unwrap().get(&key, now);
        found.map(|e| self.entry_object(py, &e)).transpose()
    }

    fn __contains__(&self, py: Python<'_>, key: &Bound<'_, PyAny>) -> PyResult<bool> {
        let key = key_bytes(key)?;
        let now = self.now(py)?;
        Ok(self.inner.lock().unwrap().get(&key, now).is_some())
    }

    /// Live (key, entry) pairs, the one the policy would evict last first.
    fn ranked<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let now = self.now(py)?;
        let ranked = self.inner.lock().unwrap().ranked(now);
        let list = PyList::empty(py);
        for (key, entry) in ranked {
            list.append((key_object(py, &key)?, self.entry_object(py, &entry)?))?;
        }
        Ok(list)
    }

    fn fits(&self, size: usize) -> bool {
        self.inner.lock().unwrap().fits(size)
    }

    fn victim<'py>(&self, py: Python<'py>, size: usize) -> PyResult<Option<Bound<'py, PyAny>>> {
        let victim = self.inner.lock().unwrap().victim(size);
        victim.map(|k| key_object(py, &k)).transpose()
    }

    fn __len__(&self) -> usize {
        self.inner.lock().unwrap().len()
    }

    #[getter]
    fn bytes(&self) -> usize {
        self.inner.lock().unwrap().bytes()
    }

    #[getter]
    fn evictions(&self) -> u64 {
        self.inner.lock().unwrap().evictions
    }

    #[getter]
    fn expirations(&self) -> u64 {
        self.inner.lock().unwrap().expirations
    }

    #[pyo3(signature = (key, data, expires=0.0, offset=0))]
    fn set(
        &self,
        py: Python<'_>,
        key: &Bound<'_, PyAny>,
        data: &Bound<'_, PyAny>,
        expires: f64,
        offset: usize,
    ) -> PyResult<bool> {
        let key = key_bytes(key)?;
        let now = self.now(py)?;
        let (bytes, handle) = hold(data)?;
        let mut inner = self.inner.lock().unwrap();
        Ok(inner.set_held(&key, bytes, Some(handle), expires, offset, now))
    }

    fn remove(&self, key: &Bound<'_, PyAny>) -> PyResult<bool> {
        let key = key_bytes(key)?;
        Ok(self.inner.lock().unwrap().remove(&key))
    }

    fn evict_one(&self) -> bool {
        self.inner.lock().unwrap().evict_one()
    }

    fn clear(&self) {
        self.inner.lock().unwrap().clear();
    }

    #[pyo3(signature = (limit=64))]
    fn reclaim_expired(&self, py: Python<'_>, limit: usize) -> PyResult<usize> {
        let now = self.now(py)?;
        Ok(self.inner.lock().unwrap().reclaim_expired(limit, now))
    }
}

/// One group served by the engine's hit path (Front.serve_group).
#[pyclass(module = "appliance_engine", name = "HitGroup")]
pub struct PyHitGroup {
    pub inner: Arc<hits::HitGroup>,
}

#[pymethods]
impl PyHitGroup {
    /// (gets, main hits, hot hits, gets forwarded by peers, [(key, sampled
    /// main hits)], [(key, hot hits and misses forwarded from here)], gets
    /// answered by forwards made here, the calls to owners they took, those
    /// of the calls that brought a value) since the last take.
    #[allow(clippy::type_complexity)]
    fn take<'py>(
        &self,
        py: Python<'py>,
    ) -> PyResult<(
        u64,
        u64,
        u64,
        u64,
        Vec<(Bound<'py, PyAny>, u64)>,
        Vec<(Bound<'py, PyAny>, u64)>,
        i64,
        u64,
        u64,
    )> {
        let taken = self.inner.take();
        let keyed = |items: Vec<(Key, u64)>| -> PyResult<Vec<(Bound<'py, PyAny>, u64)>> {
            items
                .into_iter()
                .map(|(k, n)| Ok((key_object(py, &k)?, n)))
                .collect()
        };
        Ok((
            taken.gets,
            taken.main_hits,
            taken.hot_hits,
            taken.server_requests,
            keyed(taken.owned)?,
            keyed(taken.seen)?,
            taken.forward_gets,
            taken.fetches,
            taken.peer_loads,
        ))
    }

    /// The keys whose hits carry the owner's hot-key trailer.
    fn set_hot(&self, keys: Vec<Bound<'_, PyAny>>) -> PyResult<()> {
        let mut set = HashSet::with_capacity(keys.len());
        for key in &keys {
            set.insert(Key::from(&*key_bytes(key)?));
        }
        self.inner.set_hot(set);
        Ok(())
    }
}
