"""KV transport through the Ray object store, engine-agnostic.

An engine hands over one request's per-layer KV as torch tensors (CPU or CUDA) and gets them back
on the other side; nothing here knows the reference engine, the batcher or vLLM, so the vLLM KV
connector's workers can call the same functions. `transport` moves the bytes, `directory` is the
named actor through which the two sides meet, `accounting` is the typed per-transfer record (the
transfers.parquet row) and its Ray metrics, `spec` the config section. Import the submodules
themselves: the config loads `spec` without pulling in torch or Ray.
"""
