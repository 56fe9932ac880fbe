"""Run machinery: what turns the stages into a resumable, budgeted run over a folder.

* :mod:`~hpa_kernel.run.options`: :class:`RunOptions`, the command-line options and their
  one serialisation (used to build ``--parallel`` shard command lines).
* :mod:`~hpa_kernel.run.pipeline`: the loop over images, top to bottom in pipeline order.
* :mod:`~hpa_kernel.run.journal`: the resume journal (format, fingerprint).
* :mod:`~hpa_kernel.run.lock`: one run per ``--out`` (``<out>.lock``).
* :mod:`~hpa_kernel.run.budget`: the time-budget policy (degradation levels).
* :mod:`~hpa_kernel.run.summary`: the run's report and stage timing.
* :mod:`~hpa_kernel.run.parallel`: one shard process per device, and the join.
* :mod:`~hpa_kernel.run.device`, :mod:`~hpa_kernel.run.prefetch`: device choice, read-ahead threads.

May import stages and formats; never :mod:`hpa_kernel.tools` (developer tools).
"""
