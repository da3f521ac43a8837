"""Offline retraining of the projection W from an LLM teacher (docs/method.md).

Two stages, so the expensive teacher runs once per image and W can be refitted in minutes:
- `extract`: unlabelled face images -> (raw CLIP image embedding, BLIP-2 Flan-T5 encoder feature)
  pairs, cached on disk in shards (see `model.train.cache` for the format);
- `fit`: the symmetric InfoNCE between L2(W clip) and the teacher feature, trained on the cache,
  saved with `model.projection.save_projection` so `FER_PROJECTION=<file>` serves it.
`fer train extract|fit|run` (cli/train.py) drives both.
"""
