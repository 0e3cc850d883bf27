"""The serve-step benchmark's accounting: which profiler rows count as which part of a step,
and which linears a decode step runs."""

from __future__ import annotations

import pytest

from benchmarks.serve_step import PARTS, linear_shapes, part_of, split_profile
from model import MicroTransformer


def test_profiler_rows_are_split_into_the_parts_of_a_step() -> None:
    rows = [("aoti_torch_cpu__mkl_linear", 2000.0), ("aoti_torch_cpu_mm_out", 500.0),
            ("graph_0_cpp_fused__softmax__unsafe_view_add_1", 1000.0),
            ("graph_0_cpp_fused_addmm_gelu_native_layer_norm_3", 100.0),
            ("## Call CompiledFxGraph abc ##", 300.0), ("TorchDynamo Cache Lookup", 100.0)]
    parts = split_profile(rows, calls=10)  # ms per step
    assert set(parts) == set(PARTS)
    assert parts["linears"] == pytest.approx(0.25)
    assert parts["attention kernels"] == pytest.approx(0.1)
    assert parts["other fused kernels"] == pytest.approx(0.01)
    assert parts["Python and dynamo"] == pytest.approx(0.04)
    assert part_of("aten::addmm") == "linears"
    assert part_of("graph_1_cpp_fused_embedding_0") == "other fused kernels"


def test_linear_shapes_are_the_blocks_and_the_head() -> None:
    model = MicroTransformer(vocab_size=97, max_seq_len=16, embed_dim=32, num_heads=4,
                             num_layers=3, ff_dim=64, dropout=0.0)
    shapes = linear_shapes(model)
    assert len(shapes) == 4 * 3 + 1
    assert shapes[-1] == (32, 97)
    assert (32, 96) in shapes and (64, 32) in shapes


@pytest.mark.parametrize(("argv", "message"), [
    (["--rows", "1,x"], "--rows '1,x': expected comma-separated integers"),
    (["--rows", "0,8"], "--rows 0 is out of range: use 1 or more"),
    (["--cols", "600"], "--cols 600 is out of range: use 1..512"),
    (["--rounds", "0"], "--rounds 0 is out of range: use 1 or more"),
])
def test_bad_options_get_one_line_and_exit_2(argv: list[str], message: str, capsys) -> None:
    from benchmarks.serve_step import main

    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    assert message in capsys.readouterr().err
