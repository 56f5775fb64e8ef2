"""The embedded default: a toy world where VisPlay's gain can be measured on a CPU, offline.

- `world.py`: shape scenes, questions with exact answers, the splits (pretraining scenes, the
  unlabeled pool, the labeled held-out benchmark), and the spy game's image pairs.
- `base.py`: the tiny base model that perceives the world (built, pretrained, shipped in
  `embedded_base/` with its checksums) and a run's embedded files.
- `gates.py`, `oracle.py`, `claim.py`: the measurements of docs/toyworld.md: the base's
  perception and premise, the ceiling with true labels, and the claim over seeds with ablations.
"""
