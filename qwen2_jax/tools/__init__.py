"""Tools built on the public API: ``aot`` (compile a step for an accelerator this machine lacks) with
``hlo_cost`` (what a compiled program moves and computes) and ``plan`` (a mesh's memory and collectives),
``parity`` (op-by-op against transformers), ``bench`` (against transformers on the same weights, with
``bench_hf_runner``), ``demo``. Nothing in the model or inference path imports them."""
