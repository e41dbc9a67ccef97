"""Experiments: strategies ("arms") trained and scored side by side on the same patients (issue 21).

The layer above training, SSL and evaluation: it drives them, nothing below imports it.

- :mod:`~cxrvit.experiments.plan` - the arms file (``bench/arms/*.yaml``) read, checked and resolved;
- :mod:`~cxrvit.experiments.identity` - what makes a finished arm reusable: its resolved config,
  defaults left out;
- :mod:`~cxrvit.experiments.crossval` - protocol, patient-wise folds, one fold's train + predict, pooling;
- :mod:`~cxrvit.experiments.arms` - the runner (``cxrvit bench arms`` / ``cxrvit bench recipes``):
  per-fold pre-training stages, resume, two workers on one OUT;
- :mod:`~cxrvit.experiments.arms_table` - pooled, seed-stacked scores with paired CIs: the table.
"""
