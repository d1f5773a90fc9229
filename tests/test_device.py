"""``ssdd.device``: ``device_batches`` gives exactly the consecutive slices, on the device asked for; and the recorded
device says whether amp ran in bf16."""

from __future__ import annotations

import platform

import pytest
import torch

from ssdd.device import device_batches


def _data(n: int) -> torch.Tensor:
    return torch.arange(n * 3 * 2 * 2, dtype=torch.uint8).reshape(n, 3, 2, 2)


@pytest.mark.parametrize("n, batch_size", [(10, 4), (8, 4), (3, 8), (0, 4)])
def test_batches_are_the_consecutive_slices(n: int, batch_size: int) -> None:
    data = _data(n)
    batches = list(device_batches(data, batch_size, "cpu"))
    assert [b.shape[0] for b in batches] == [min(batch_size, n - s) for s in range(0, n, batch_size)]
    assert all(torch.equal(b, data[i * batch_size : (i + 1) * batch_size]) for i, b in enumerate(batches))
    if n:
        assert torch.equal(torch.cat(batches), data)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the pinned staging path needs a CUDA device")
def test_cuda_batches_through_pinned_staging_are_the_slices() -> None:
    data = _data(1000)
    batches = []
    for batch in device_batches(data, 96, "cuda"):
        assert batch.device.type == "cuda"
        batches.append(batch.float() * 1)  # work on each batch while the next one is copied
    assert torch.equal(torch.cat(batches).cpu(), data.float())


def test_a_cpu_result_records_whether_amp_ran_in_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same command gives different numbers in bf16 and in float32, so the recorded device says which."""
    from ssdd import environment

    for native, shown in ((True, "native bf16"), (False, "float32")):
        monkeypatch.setattr(environment, "bf16_native_on_cpu", lambda native=native: native)
        name = environment.device_name(torch.device("cpu"))
        assert name == f"cpu ({platform.machine()}, {torch.get_num_threads()} threads, {shown})"


# ---- precision: --precision float32 turns every amp setting off ---------------------------------------------------


def test_float32_precision_turns_autocast_off_even_where_bf16_is_native(monkeypatch: pytest.MonkeyPatch) -> None:
    from ssdd import device as device_module
    from ssdd.environment import device_name

    monkeypatch.setattr(device_module, "bf16_native_on_cpu", lambda: True)
    monkeypatch.setattr("ssdd.environment.bf16_native_on_cpu", lambda: True)  # as on a bf16 machine, on any CPU
    monkeypatch.setenv("SSDD_PRECISION", "amp")  # restored after the test, whatever set_precision writes
    cpu = torch.device("cpu")
    with device_module.autocast(cpu, True):
        assert torch.is_autocast_enabled("cpu")
    assert "native bf16" in device_name(cpu)
    device_module.set_precision("float32")
    with device_module.autocast(cpu, True):
        assert not torch.is_autocast_enabled("cpu")
    assert device_name(cpu).endswith("float32 (--precision float32))")
    x = torch.ones(2, dtype=torch.bfloat16)
    assert device_module.at_least_float32(x).dtype == torch.float32
    assert device_module.at_least_float32(x.double()).dtype == torch.float64


def test_an_unknown_precision_is_refused_with_the_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    from ssdd.device import precision, set_precision
    from ssdd.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^unknown precision 'half'; use one of amp, float32$"):
        set_precision("half")
    monkeypatch.setenv("SSDD_PRECISION", "half")
    with pytest.raises(ConfigError, match=r"^SSDD_PRECISION='half': use one of amp, float32$"):
        precision()
