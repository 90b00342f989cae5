"""Prediction: CT -> vertebra centroids and label mask, and the model bundles it runs.

``inputs`` (a CT's normalised volume per stage), ``sliding_window`` (the jitted window along z),
``predict`` (the three stage predictors and ``predict_case``), ``candidates`` and ``sequence``
(landmark peaks and the exact anatomical sequence), ``confidence`` (the labelling against its
one-level alternatives), ``fusion`` (largest component, label fusion), ``statistics``
(per-vertebra statistics), ``batch`` (many cases: shards, reading ahead), ``bundle`` (export and
load of trained stages). The predictors take ``models.registry.StageNetwork``s (network,
parameters, stage definition); a loaded bundle's stages are such networks.
"""
