"""hpa_kernel: offline inference kernel for HPA single-cell classification."""

__version__ = "0.1.0"
