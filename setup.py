import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "hpa_kernel" / "__init__.py").read_text()).group(1)

setup(
    name="hpa_kernel",
    version=VERSION,
    description="Offline inference kernel for the Human Protein Atlas single-cell classification task",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["hpa_kernel", "hpa_kernel.*"]),
    package_data={"hpa_kernel": ["data/*", "data/**/*"]},
    include_package_data=True,
    python_requires=">=3.10",
    # torch is deliberately unpinned: Kaggle images bring their own build.
    install_requires=[
        "torch",
        "timm",
        "numpy",
        "pandas",
        "opencv-python-headless",
        "pycocotools",
        "joblib",
        "scikit-image",
        "scipy",
        "tqdm",
    ],
    extras_require={
        "train": ["albumentations>=2.0", "iterative-stratification", "pyyaml", "matplotlib"],
        "test": ["pytest", "pyarrow", "albumentations>=2.0", "iterative-stratification", "pyyaml", "matplotlib"],
    },
    entry_points={
        "console_scripts": [
            "hpa-submit=hpa_kernel.submit:main",
            "hpa-validate=hpa_kernel.tools.validate:main",
            "hpa-metric=hpa_kernel.tools.metric:main",
        ]
    },
)
