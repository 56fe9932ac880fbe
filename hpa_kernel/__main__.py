"""``python -m hpa_kernel`` is ``python -m hpa_kernel.submit``."""

import sys

from .submit import main

sys.exit(main())
