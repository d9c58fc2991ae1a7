//! All PyO3 glue for the `dynaexq._core` extension module.

use pyo3::prelude::*;

#[pymodule(name = "_core")]
fn core_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
