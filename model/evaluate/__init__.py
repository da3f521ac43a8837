"""`fer eval` and `fer eval-retrieval`: the paper's tables (UAR/WAR per prompt set, confusion matrices,
per-class feature variance, retrieval precision) on a user's own labelled data.

Modules: `data` reads the labelled set, `features` encodes every item once per model (both the plain-CLIP
and the projected feature from one encoder pass), `metrics` holds the numbers as pure functions, `plots`
the figures, `run` / `retrieval` tie them together and write the outputs (`fer eval` is cli/evaluate.py).
"""
