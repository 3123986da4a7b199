"""Ray Train entrypoints for BREEN's three training stages.

- `jobs.train`: the entrypoint (``python -m jobs.train --stage stage1|stage2|stage3|all ...``) and the
  workers' step loop (`jobs.train.run_worker`).
- `jobs.launch`: its command line (configs resolved and checked before torch or Ray is imported).
- `jobs.driver`: input and resume-config checks, the stage plan, Ray Train start, restarts after a fault.
- `jobs.model_init`: the model a worker starts from (ZeRO-3 partitioned safetensors loading).
- `jobs.config`: typed stage configs (stage 2 = stage 1 plus changes), profiles, dotted overrides.
- `jobs.ingest`: Ray Data ingest (read + decode + tokenise on CPU, deterministic per-worker order).
- `jobs.checkpoint`: ZeRO-3 checkpoints with client state, resume, consolidated Hugging Face export.
- `jobs.metrics`: step statistics (`StepStats`, summed over ranks), rank-0 step summaries, JSONL and
  TensorBoard, MFU estimate.
- `jobs.deepspeed_config`: the DeepSpeed ZeRO-3 config.
- `jobs.tiny`: a tiny random BREEN + offline tokenizer (demo and tests).
"""
