"""Model plumbing: what the loop needs to know about a vision-language model, in one folder.

- `families.py`: what differs per model family (Qwen2.5-VL, Qwen3-VL, Qwen3.5, InternVL, Gemma),
  one table; each family's chat template and image-only processor.
- `load.py`: a checkpoint folder in (model + processor), a `save_pretrained` folder out.
- `tiny.py`: a tiny Qwen2.5-VL with its own tokenizer, built offline.
- `inputs.py`: prompts encoded for the model (`Prompt`), batches of them with their completions
  (`collate`), and one sequence per prompt group for shared-prefix training (`collate_groups`).
- `prompt_cache.py`: cache rows of any layer kind; Qwen3.5's shared prefix through its cache.
- `logprobs.py`: the training forward: per-token log-probs of sampled completions.
"""
