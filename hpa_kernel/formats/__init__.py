"""File formats: one reader and one writer per format, no stage logic.

* :mod:`~hpa_kernel.formats.images`: the Kaggle test layout (``sample_submission.csv``,
  ``test/<ID>_<channel>.png``), the RGBY reader and the channel writer.
* :mod:`~hpa_kernel.formats.rle`: the competition's mask strings (the codec only).
* :mod:`~hpa_kernel.formats.submission`: ``submission.csv`` rows: the one parser, the
  atomic writer, the validator and the shard-part merge.
* :mod:`~hpa_kernel.formats.truth`: the truth folder (``labels/<ID>.png`` + ``cells.csv``, per-cell
  ground truth of synthetic data) and the image labels' writer (``train.csv``).
* :mod:`~hpa_kernel.formats.overlay`: the debugging PNG with cell outlines.
* :mod:`~hpa_kernel.formats.csvfile`: the one CSV reading rule (UTF-8 with or without a
  byte-order mark, no per-field cap) for every CSV reader above; imported here, so the
  rule holds whichever module of the package is used first.

May import :mod:`hpa_kernel.classes` and :mod:`hpa_kernel.stages.labels` (label-image
arrays), never the other stages, :mod:`hpa_kernel.run` or :mod:`hpa_kernel.tools`.
"""

from hpa_kernel.formats import csvfile as _csvfile  # noqa: E402,F401  (the CSV rule, see above)
