"""The training core shared by supervised training (``cxrvit.training``) and pre-training (``cxrvit.ssl``).

``distributed`` (device + DDP), ``optim`` (parameter groups, AdamW, the warm-up + cosine schedule),
``checkpoint`` (one file name, one resume rule, every generator saved per rank), ``runlog``
(``metrics.jsonl``) and ``core.Engine``, which holds them together for one run. A training loop
keeps only what is its own: its data, its loss, its views, its teacher.
"""
