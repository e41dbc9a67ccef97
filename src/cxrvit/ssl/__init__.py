"""Self-supervised pre-training of the DINO ViT-S/16 on chest X-rays (issue 7).

- :func:`cxrvit.ssl.pretrain.pretrain` - the engine (``cxrvit pretrain``), with
  :mod:`~cxrvit.ssl.dino`, :mod:`~cxrvit.ssl.mae` and :mod:`~cxrvit.ssl.ijepa` as its objectives;
- :mod:`~cxrvit.ssl.config` - typed recipes (``ssl/recipes/*.yaml``) and ``--set`` overrides;
- :mod:`~cxrvit.ssl.probe` - k-NN / linear-probe AUROC on frozen features.

SSL-initialised vs from-scratch fine-tuning in cross-validation is an arms plan of the experiments
part (``bench/arms/ssl.yaml``, ``cxrvit bench arms``).
"""
