"""Developer tools, each a command line (``python -m hpa_kernel.tools.<name>``):

* :mod:`~hpa_kernel.tools.metric`: local mAP@0.6 of a submission against per-cell truth.
* :mod:`~hpa_kernel.tools.synthetic`: synthetic HPA-like images with per-cell truth.
* :mod:`~hpa_kernel.tools.validate`: check a submission file against the sample.

Tools may import stages and formats, never :mod:`hpa_kernel.run`; nothing but
:mod:`hpa_kernel.submit` (dry run and report) imports a tool at run time.
"""
