"""Ray Train entrypoints for BREEN's three training stages.

- `jobs.train`: the entrypoint (``python -m jobs.train --stage stage1|stage2|stage3|all ...``) and the
  worker step loop.
- `jobs.config`: typed stage configs (stage 2 = stage 1 plus changes), profiles, dotted overrides.
- `jobs.ingest`: Ray Data ingest (read + decode + tokenise on CPU, deterministic per-worker order).
- `jobs.checkpoint`: ZeRO-3 checkpoints with client state, resume, consolidated Hugging Face export.
- `jobs.metrics`: rank-0 step summaries, JSONL and TensorBoard, MFU estimate.
- `jobs.deepspeed_config`: the DeepSpeed ZeRO-3 config.
- `jobs.tiny`: a tiny random BREEN + offline tokenizer (demo and tests).
"""
