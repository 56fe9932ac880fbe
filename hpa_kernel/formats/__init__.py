"""File formats: one reader and one writer per format, no stage logic.

* :mod:`~hpa_kernel.formats.images`: the Kaggle test layout (``sample_submission.csv``,
  ``test/<ID>_<channel>.png``) and the RGBY reader.
* :mod:`~hpa_kernel.formats.rle`: the competition's mask strings (the codec only).
* :mod:`~hpa_kernel.formats.submission`: ``submission.csv`` rows: the one parser, the
  atomic writer, the validator and the shard-part merge.
* :mod:`~hpa_kernel.formats.overlay`: the debugging PNG with cell outlines.

May import :mod:`hpa_kernel.classes` and :mod:`hpa_kernel.stages.labels` (label-image
arrays), never the other stages, :mod:`hpa_kernel.run` or :mod:`hpa_kernel.tools`.
"""
