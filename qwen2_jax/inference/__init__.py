"""Inference: from a model to tokens. ``sampling`` (HF's sampling semantics as jittable functions),
``generate`` (prefill, then one jitted decode loop over a donated cache), ``tokenizer`` (Qwen's BPE and chat
template), and ``serving`` (the continuous-batching engine and the OpenAI-compatible server)."""
