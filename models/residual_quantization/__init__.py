"""Stage 1: the Combiner and the modality-decoupled residual quantizer.

quantizer.py (EMA codebooks, modality level, residual quantization), model.py (Combiner, RQModel,
rq.pt files), official.py (the released rq_clip_large.pth), code_stats.py (usage and collision
statistics), train.py (genius train-rq), assign_codes.py (genius assign-codes).
"""
