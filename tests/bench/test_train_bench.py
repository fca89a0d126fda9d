"""bench/train.py's column choice (the timing itself needs a GPU)."""

import argparse

from bench.train import COLUMNS, columns, time_graphed


def test_the_trainers_default_path_has_a_column_packed_rows_compiled_layers_in_graphs():
    args = argparse.Namespace(packed_docs=4, graphs=True, compile_layers=True, settings=None)
    chosen = {name: (fn, kw) for name, fn, kw in columns(args)}
    assert list(chosen) == [c for c in COLUMNS if c in chosen] and set(chosen) == set(COLUMNS)
    assert chosen["ours_compiled_graphs_packed"] == (time_graphed, dict(compile=True, packed_docs=4))
    args.packed_docs = 0
    assert not any(name.endswith("_packed") for name, _, _ in columns(args))
