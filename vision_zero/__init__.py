"""Vision-Zero's "who is the spy" self-play (arXiv 2509.25541), the project's second method.

- `rules.py`: the game's rules as the paper states them: seats, prompts, parsing, rewards,
  Role-Advantage Estimation, Iterative-SPO's stage switch. Pure functions of text and numbers.
- `train.py`: playing a step's games, scoring them and training the active stage (VisPlay's
  sampler, GRPO update, checkpoints and evaluation); `run_game` is the whole run.
- `warmup.py`: the embedded default's image pairs and game base (the toy base taught the game's
  format; shipped in `embedded_game_base/` with its checksums).
- `claim.py`: the measurement of docs/vision_zero.md over seeds.
"""
