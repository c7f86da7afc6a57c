"""The weights interchange file and the Flax <-> torch mapping."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file as torch_load_file

from hetcore import interchange
from hetcore.errors import UsageError


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_file_round_trip_is_bit_exact(tmp_path, small_state, dtype):
    state = small_state(width=8, depth=3, dtype=dtype)
    path = str(tmp_path / "w.safetensors")
    interchange.write(path, state)
    back = interchange.read_weights(path, 8, 3, dtype)
    assert list(back) == interchange.names(3)
    for n in state:
        assert back[n].dtype == state[n].dtype
        np.testing.assert_array_equal(back[n], state[n], err_msg=n)


def test_a_plain_lecture_module_loads_the_file_strictly(tmp_path):
    from tests.lecture_code import run_lecture

    net_class = run_lecture(epochs=0)["NormalModel"]
    path = str(tmp_path / "w.safetensors")
    interchange.write(path, interchange.lecture_weights())
    net = net_class()
    net.load_state_dict(torch_load_file(path), strict=True)
    assert torch.equal(net.state_dict()["layers.2.weight"],
                       torch.from_numpy(interchange.lecture_weights()["layers.2.weight"]))


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_flax_mapping_round_trip_is_bit_exact(small_state, depth):
    from jaxhet.weights import abstract_model, from_state_dict, to_state_dict

    state = small_state(width=5, depth=depth)
    _, abstract = abstract_model(5, depth, "float32")
    params = from_state_dict(state, abstract)
    # The kernel is the transposed weight: (in, out) in Flax, (out, in) in torch.
    np.testing.assert_array_equal(params["layers"]["layers"][0]["kernel"][...],
                                  state["layers.0.weight"].T)
    back = to_state_dict(params)
    assert list(back) == list(state)
    for n in state:
        np.testing.assert_array_equal(back[n], state[n], err_msg=n)


def test_flax_mapping_names_the_misfit_tensor(small_state):
    from jaxhet.weights import abstract_model, from_state_dict

    _, abstract = abstract_model(5, 2, "float32")
    state = small_state(width=5, depth=2)
    with pytest.raises(UsageError, match="'layers.2.weight' has shape \\(5, 4\\)"):
        from_state_dict({**state, "layers.2.weight": np.ones((5, 4), np.float32)}, abstract)
    with pytest.raises(UsageError, match="missing tensor 'var_head.bias'"):
        from_state_dict({n: a for n, a in state.items() if n != "var_head.bias"}, abstract)
    with pytest.raises(UsageError, match="unexpected tensor 'extra'"):
        from_state_dict({**state, "extra": np.ones(1, np.float32)}, abstract)


def test_check_names_the_offending_tensor(small_state):
    state = small_state(width=8, depth=2)
    interchange.check(state, 8, 2, "float32")
    cases = [
        ({n: a for n, a in state.items() if n != "mean_head.bias"}, "missing tensor 'mean_head.bias'"),
        ({**state, "layers.4.weight": np.ones((8, 8), np.float32)}, "unexpected tensor 'layers.4.weight'"),
        ({**state, "layers.0.weight": np.ones((9, 1), np.float32)}, "'layers.0.weight' has shape \\(9, 1\\)"),
        ({**state, "var_head.weight": np.ones((1, 8))}, "'var_head.weight' is float64, expected float32"),
        ({**state, "layers.2.bias": np.full(8, np.nan, np.float32)}, "'layers.2.bias' holds non-finite"),
    ]
    for bad, message in cases:
        with pytest.raises(UsageError, match=message):
            interchange.check(bad, 8, 2, "float32")
    with pytest.raises(UsageError, match="width 16"):
        interchange.check(state, 16, 2, "float32")


@pytest.mark.parametrize("opening", [b"\x80", b"PK"])
def test_a_header_length_that_opens_like_a_pickle_or_zip_is_read(tmp_path, small_state,
                                                                   opening):
    # The header's length comes first: 128 + 256k bytes open with 0x80 as a pickle does,
    # 0x4B50 + 65536k with "PK" as a zip (torch.save) does. Such files are still safetensors.
    state = small_state()
    path = tmp_path / "w.safetensors"
    interchange.write(str(path), state, {"note": ""})
    start = int.from_bytes(path.read_bytes()[:8], "little")
    target = int.from_bytes(opening, "little")  # the header length's low byte(s)
    base = start + (target - start) % (256 ** len(opening))
    for pad in range(max(0, base - start - 16), base - start + 16):  # 8-byte alignment
        interchange.write(str(path), state, {"note": "x" * pad})
        if path.read_bytes()[:len(opening)] == opening:
            break
    else:
        pytest.fail(f"no padding opened the file with {opening!r}")
    back = interchange.read(str(path))
    for n, a in state.items():
        np.testing.assert_array_equal(back[n], a)


def test_read_refuses_pickles_and_garbage(tmp_path, small_state):
    pickle_path = tmp_path / "w.pt"
    torch.save({"a": torch.ones(1)}, pickle_path)
    with pytest.raises(UsageError, match="pickle"):
        interchange.read(str(pickle_path))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(UsageError, match="not a valid safetensors"):
        interchange.read(str(junk))
    good = tmp_path / "good.safetensors"
    interchange.write(str(good), small_state())
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(good.read_bytes()[:-10])
    with pytest.raises(UsageError, match="not a valid safetensors"):
        interchange.read(str(trunc))
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(UsageError, match="not a valid safetensors"):
        interchange.read(str(tmp_path / "empty.safetensors"))
