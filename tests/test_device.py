"""Device and dtype policy (pure functions, tested for every device on any machine). Case C03."""

import pytest

from dallecli.engine.device import choose_dtype, normalize_dtype, pick_device
from dallecli.errors import DeviceUnavailableError, UsageError


@pytest.mark.parametrize(
    ("device", "bf16", "expected"),
    [("cpu", False, "float32"), ("cuda", True, "bfloat16"), ("cuda:1", True, "bfloat16"),
     ("cuda", False, "float16"), ("mps", False, "float32"), ("mps", True, "float32")],
)
def test_auto_dtype_per_device(device, bf16, expected):
    assert choose_dtype(device, None, cuda_bf16=bf16).dtype == expected
    assert choose_dtype(device, "auto", cuda_bf16=bf16).dtype == expected


def test_mps_without_dtype_is_float32_case_c03():
    choice = choose_dtype("mps")
    assert choice.dtype == "float32"
    assert "MPS" in choice.reason


@pytest.mark.parametrize(("spelling", "name"), [("fp16", "float16"), ("BF16", "bfloat16"), ("float32", "float32")])
def test_explicit_dtype_wins(spelling, name):
    assert choose_dtype("mps", spelling).dtype == name
    assert choose_dtype("cpu", spelling).dtype == name


def test_unknown_dtype_is_usage_error():
    with pytest.raises(UsageError, match="float8"):
        normalize_dtype("float8")


def test_auto_device_order():
    assert pick_device("auto", cuda=True, mps=True) == "cuda"
    assert pick_device(None, cuda=False, mps=True) == "mps"
    assert pick_device("auto", cuda=False, mps=False) == "cpu"


def test_unavailable_device_is_usage_error():
    with pytest.raises(DeviceUnavailableError) as info:
        pick_device("cuda", cuda=False, mps=False)
    assert info.value.exit_code == 2
    with pytest.raises(DeviceUnavailableError):
        pick_device("cuda:3", cuda=True, mps=False, cuda_count=2)
    with pytest.raises(DeviceUnavailableError):
        pick_device("mps", cuda=False, mps=False)
    with pytest.raises(UsageError, match="tpu"):
        pick_device("tpu", cuda=False, mps=False)
    assert pick_device("cuda:1", cuda=True, mps=False, cuda_count=2) == "cuda:1"
