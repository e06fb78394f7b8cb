"""Integrations with other frameworks. Nothing is imported here: each submodule needs its own extra.

* :mod:`sapa.integrations.openmmlab` - sapa's upsamplers in mmengine's ``MODELS`` registry under
  ``sapa.<name>`` with the OpenMMLab argument names, an mmdet FPN neck and mmseg decode heads
  (the ``openmmlab`` extra; ``custom_imports=dict(imports=['sapa.integrations.openmmlab'])``).
* :mod:`sapa.integrations.huggingface` - sapa's SegFormer head inside ``transformers`` models.

See docs/INTEGRATIONS.md.
"""
