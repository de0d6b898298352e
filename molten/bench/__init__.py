"""`molten bench`: the benchmark command, measuring Molten and its peers side by side.

Every figure it reports comes from one run on one machine, so results are read as
ratios (Molten against transformers and llama.cpp, the HTTP door against the engine,
a measurement against the machine's own copy-bandwidth and matrix-product ceilings).

Layout: `workloads.py` builds the request lists. The doors run them
(`door_engine.py`, `door_serve.py`), and so do the peers (`peer_transformers.py`,
`peer_llamacpp.py`). One module per workload plans its measurements and turns the
results into tables (`single.py`, `concurrent.py`, `shared_prefix.py`,
`long_context.py`, `disagg.py`). `runner.py` orders and runs the measurements,
`targets.py` checks the goals and `report.py` writes the page.
"""
