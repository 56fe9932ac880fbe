"""``python -m hpa_kernel.tools.synthetic``: see :func:`hpa_kernel.tools.synthetic.main`."""

from hpa_kernel.tools.synthetic import main

raise SystemExit(main())
