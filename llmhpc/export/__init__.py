"""Converters from any llmhpc weight source to deployable formats (`llmhpc convert`).

- `source.py`: `open_source(path)` reads an llmhpc checkpoint (any parallel layout), an HF directory or a .gguf
  file tensor by tensor, with its config, tokenizer, chat template and lineage.
- `hf.py`: Hugging Face directory (what transformers, vLLM, SGLang and TensorRT-LLM's PyTorch backend load).
- `trtllm.py`: TensorRT-LLM checkpoint (config.json + rank{N}.safetensors), optional engine build.
- `gguf.py`: GGUF file for llama.cpp / Ollama, with a Modelfile.
- `quantize.py`: fp8 weights and calibrated activation scales, and the weight-only int8 / int4 rule that
  trtllm-build applies (to report its error).
- `gguf_quants.py`: GGUF block quantization (q8_0, q4_0, q4_k); `ollama.py`: the Modelfile.
- `output.py`: the atomic write of an output, its summary and its lineage record.
"""
