"""Test set-up: 8 host CPU devices (for the sharding tests), CPU only, float32 matmuls exact."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def _trainer_cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("jaxcache"))


@pytest.fixture(scope="module")
def trainer_compile_cache(_trainer_cache_dir):
    """A persistent compilation cache shared by the Trainer test modules (the demo's step
    functions compile once per session, not once per Trainer or per module); off again after
    the module."""
    import jax
    old = (jax.config.jax_compilation_cache_dir,
           jax.config.jax_persistent_cache_min_compile_time_secs)
    jax.config.update("jax_compilation_cache_dir", _trainer_cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    yield
    jax.config.update("jax_compilation_cache_dir", old[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])
