"""Install: see README.md (torch/torchvision are pinned there, fairseq comes from fairseq-fixed)."""
import re
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = re.search(r'__version__ = "([^"]+)"', (here / "encouraging_loss" / "__init__.py").read_text()).group(1)

fairseq_deps = [
    # upstream fairseq 0.12.2 does not import on Python 3.11; fairseq-fixed is the
    # same code base with that fixed. It compiles C++/Cython extensions against the
    # installed torch, so it is installed with --no-build-isolation (see README).
    "fairseq-fixed==0.12.3.1",
    "sacrebleu>=2.0",
    "sacremoses",
    "subword-nmt",
    "sentencepiece",
]
timm_deps = ["timm>=1.0.20", "torchvision", "scikit-learn"]
# the attacks (el-analyze --attack, timm-el-train --adv-train) use torchattacks 3.5.1, which scripts/install.sh
# installs with --no-deps: its metadata pins requests~=2.25.1 (hence idna<3, which breaks huggingface_hub), yet
# it never imports requests; these are the dependencies it does import
robustness_deps = ["scipy", "tqdm"]
# PyTorch Geometric 2.x is pure Python on our torch (no compiled extensions needed for GCNConv / SAGPooling)
graph_deps = ["torch-geometric>=2.6"]
# Trainer(compute_loss_func=...) and num_items_in_batch came with transformers 4.46; checked with 5.25
transformers_deps = ["transformers>=4.46", "accelerate>=1.1"]
dev_deps = ["pytest>=7", "pytest-timeout", "pytest-xdist>=3.6", "ruff>=0.6"]

setup(
    name="encouraging-loss",
    version=version,
    description="Encouraging Loss (Zhao et al., AAAI 2022) for fairseq, timm, PyTorch Geometric and transformers",
    long_description=(here / "README.md").read_text() if (here / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["encouraging_loss*", "fairseq_el*", "timm_el*", "pyg_el*", "transformers_el*"]),
    install_requires=["torch>=2.6", "numpy", "matplotlib"],
    extras_require={
        "fairseq": fairseq_deps,
        "timm": timm_deps,
        "robustness": timm_deps + robustness_deps,
        "graph": graph_deps,
        "transformers": transformers_deps,
        "dev": dev_deps,
        "all": fairseq_deps + timm_deps + robustness_deps + graph_deps + transformers_deps + dev_deps,
    },
    entry_points={
        "console_scripts": [
            "timm-el-train = timm_el.train:main",
            "timm-el-launch = timm_el.launch:main",
            "el-quickstart = timm_el.quickstart:main",
            "el-analyze = timm_el.analyze:main",
            "el-data = encouraging_loss.tools.data:main",
            "el-results = encouraging_loss.tools.results:main",
            "el-benchmark = encouraging_loss.tools.benchmark:main",
            "el-kernel-sass = encouraging_loss.tools.kernel_sass:main",
        ],
    },
    license="MIT",
)
